"""The example notebooks execute from top to bottom, stored without outputs."""
import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = ["01_masks_as_graphs.ipynb", "02_graph_attention.ipynb", "03_gnn_layer.ipynb"]


@pytest.fixture
def python3_kernel(tmp_path, monkeypatch):
    """A `python3` kernelspec that runs this interpreter, found first on JUPYTER_PATH (so a
    user-level python3 kernel of another environment is not picked up), importing this
    checkout's attngraph (not another one an editable install points at)."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (attngraph tests)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(EXAMPLES.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    spec = KernelSpecManager().get_kernel_spec("python3")
    assert spec.argv[0] == sys.executable
    return "python3"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, python3_kernel, tmp_path):
    path = EXAMPLES / name
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in nb.cells if c.cell_type == "code"), f"{name} is stored with outputs"
    client = nbclient.NotebookClient(nb, kernel_name=python3_kernel, timeout=300,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs)
    assert images, f"{name} drew no pictures"


@pytest.mark.slow
def test_import_is_quiet_and_a_plot_shows_once_in_a_kernel(python3_kernel, tmp_path,
                                                           monkeypatch):
    """No TqdmWarning from `import attngraph` (torch_geometric imports tqdm.auto, which warns
    in a kernel without ipywidgets), and `g.plot()` (it returns the Figure) shows one
    picture, as the cell's value or not."""
    import os

    # the kernel imports this checkout's attngraph
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(EXAMPLES.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code) for code in (
        "import attngraph as ag",
        "ag.masks.causal(8).plot()",
        "fig = ag.masks.causal(8).plot()",
    )])
    client = nbclient.NotebookClient(nb, kernel_name=python3_kernel, timeout=300,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    imported, value, assigned = nb.cells
    assert not imported.outputs, imported.outputs
    for cell in (value, assigned):
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert len(images) == 1, cell.outputs
