"""The layer rule and the import hygiene of docs/ARCHITECTURE.md, checked on every run.

The layers and the forbidden imports are import-linter contracts in pyproject.toml
(``[tool.importlinter]``, run by ``lint-imports``); the upward imports they allow are one-line
delegations on the core types, listed there by name and checked here to stay one call.
"""
import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "attngraph"

# Private names that one module still takes from another (none left).
KNOWN_PRIVATE_IMPORTS: set = set()


def _lint_imports() -> str:
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.skip("import-linter is not installed (pip install 'attngraph[test]')")
    return str(exe)


def test_import_contracts_are_kept():
    r = subprocess.run([_lint_imports()], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_import_contracts_catch_an_upward_import(tmp_path):
    """A core module that imports the operators breaks the contract."""
    exe = _lint_imports()
    shutil.copytree(PACKAGE, tmp_path / "attngraph",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.o"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    implicit = tmp_path / "attngraph" / "implicit.py"
    implicit.write_text(implicit.read_text() + "\n\ndef _upward():\n"
                        "    from attngraph.ops import chunked\n\n    return chunked\n")
    r = subprocess.run([exe], cwd=tmp_path, capture_output=True, text=True,
                       env={"PATH": str(Path(exe).parent), "PYTHONPATH": str(tmp_path)})
    assert r.returncode != 0, r.stdout
    assert "attngraph.implicit -> attngraph.ops.chunked" in r.stdout


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _imports(module: str, path: Path):
    """``(imported module, name or None)`` of every import in the module, nested ones too."""
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None
        elif isinstance(node, ast.ImportFrom):
            base = module.split(".") if is_pkg else module.split(".")[:-1]
            if node.level:
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for a in node.names:
                yield target, a.name


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_imports_another_modules_private_names():
    modules = dict(_modules())
    found = set()
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for target, name in _imports(module, path):
            if not target or not target.startswith("attngraph"):
                continue
            if name is not None and f"{target}.{name}" in modules:    # a submodule
                target, name = f"{target}.{name}", None
            if name is not None and _private(name) and target != module:
                found.add((module, target, name))
            owner = target.rpartition(".")[0]
            if any(_private(p) for p in target.split(".")) and not (
                    package == owner or package.startswith(owner + ".")):
                found.add((module, target, None))
    assert found - KNOWN_PRIVATE_IMPORTS == set()


# (module, function) of each upward import the contracts allow, and what it imports.
DELEGATIONS = {
    ("attngraph.graph", "tile_plan"): "attngraph.ops.plan",
    ("attngraph.graph", "to_block_mask"): "attngraph.flex",
    ("attngraph.graph", "from_block_mask"): "attngraph.flex",
    ("attngraph.graph", "from_ranges"): "attngraph.masks.rectangles",
    ("attngraph.graph", "plot"): "attngraph.viz",
    ("attngraph.graph", "_repr_png_"): "attngraph.viz",
    ("attngraph.stacked", "plot"): "attngraph.viz",
    ("attngraph.stacked", "_repr_png_"): "attngraph.viz",
}
UPPER = ("attngraph.ops", "attngraph.flex", "attngraph.viz", "attngraph.masks",
         "attngraph.nn", "attngraph.distributed", "attngraph.cli")


def _statements(fn: ast.FunctionDef):
    """The function's statements without its docstring; a ``try`` that only imports (an
    optional dependency) counts as its import plus the handler's ``return``."""
    body = list(fn.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    flat = []
    for st in body:
        if isinstance(st, ast.Try) and all(isinstance(s, ast.ImportFrom) for s in st.body):
            flat += st.body
        else:
            flat.append(st)
    return flat


def test_upward_imports_are_one_line_delegations():
    modules = dict(_modules())
    seen = set()
    for module in ("attngraph.graph", "attngraph.implicit", "attngraph.stacked",
                   "attngraph.runs", "attngraph.checks", "attngraph.chunks",
                   "attngraph.capabilities"):
        tree = ast.parse(modules[module].read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            ups = [st for st in ast.walk(fn) if isinstance(st, ast.ImportFrom)
                   and (st.module or "").startswith(UPPER)]
            if not ups:
                continue
            key = (module, fn.name)
            assert key in DELEGATIONS, f"{module}.{fn.name} imports {ups[0].module} upward"
            assert all(st.module == DELEGATIONS[key] for st in ups)
            body = _statements(fn)
            assert len(body) == 2 and isinstance(body[0], ast.ImportFrom), (
                f"{module}.{fn.name}: a delegation is an import and one call")
            call = body[1].value if isinstance(body[1], (ast.Return, ast.Expr)) else None
            assert isinstance(call, ast.Call), f"{module}.{fn.name}: not a single call"
            seen.add(key)
    assert seen == set(DELEGATIONS)
