"""Every Python example in README.md runs on its own, as a reader would run it: each fenced
```python block, found by pytest-codeblocks, in a fresh interpreter, in a scratch folder, in
seconds. A block marked ``<!-- pytest.mark.skip(reason=...) -->`` (pytest-codeblocks' marker
syntax) is skipped there; the context-parallel one is run here under
``torch.distributed.run --nproc_per_node 2``, as the README says to launch it."""
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

codeblocks = pytest.importorskip("pytest_codeblocks")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TIME_LIMIT = 120   # a block takes seconds; this only stops a hung one


def python_blocks():
    return [b for b in codeblocks.extract_from_file(README) if b.syntax == "python"]


def _marks(block):
    marks = [eval(m, {"sys": sys, "pytest": pytest}) for m in block.marks]
    # <!--pytest-codeblocks:importorskip(module)-->: a block for an optional dependency
    if block.importorskip and importlib.util.find_spec(block.importorskip) is None:
        marks.append(pytest.mark.skip(reason=f"{block.importorskip} is not installed"))
    return marks


def _env():
    env = dict(os.environ)
    # this checkout's attngraph, whichever is installed; pictures go to files
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["MPLBACKEND"] = "Agg"
    return env


def run_block(code: str, cwd: Path, args=()):
    script = cwd / "block.py"
    script.write_text(code)
    return subprocess.run([sys.executable, *args, str(script)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=TIME_LIMIT)


def _check(proc, block):
    assert proc.returncode == 0, (
        f"README.md line {block.lineno}: the block failed (line numbers below count from "
        f"the block's first line)\n{proc.stdout}\n{proc.stderr}")


def test_readme_has_python_examples():
    assert len(python_blocks()) >= 7


@pytest.mark.parametrize("block", [pytest.param(b, marks=_marks(b), id=f"line {b.lineno}")
                                   for b in python_blocks()])
def test_readme_block_runs_on_its_own(block, tmp_path):
    _check(run_block(block.code, tmp_path), block)


def test_a_failing_block_fails(tmp_path):
    """A block that raises fails its test (the check above can fail)."""
    block = codeblocks.main.extract_from_buffer(__import__("io").StringIO(
        "```python\nimport attngraph as ag\nag.masks.causal(-1)\n```\n"))[0]
    proc = run_block(block.code, tmp_path)
    assert proc.returncode != 0 and "ValueError" in proc.stderr
    with pytest.raises(AssertionError, match="README.md line 1"):
        _check(proc, block)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_context_parallel_block_under_torchrun(tmp_path):
    """The block the README launches with `torchrun --nproc_per_node 2 cp.py`, launched that
    way (torch.distributed.run, 2 CPU processes over gloo): each rank's rows equal one
    process's."""
    [block] = [b for b in python_blocks() if "torchrun" in b.code]
    assert "pytest.mark.skip" in " ".join(block.marks)
    assert block.code.startswith("# torchrun --nproc_per_node 2 cp.py")
    proc = run_block(block.code, tmp_path, args=(
        "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port())))
    _check(proc, block)
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("rank "))
    assert [line.split(":")[0] for line in lines] == ["rank 0", "rank 1"], proc.stdout
    for line in lines:
        assert float(line.rsplit(" ", 1)[1]) < 1e-5, line
