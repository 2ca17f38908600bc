"""Measure the package's import graph: the largest import cycle, private names imported
across modules, the largest files, and pairs of places that share six or more
same-shape lines.

Imports inside functions count (they are edges of the graph too). Usage:

    python benchmarks/import_graph.py [ROOT]     # ROOT: a checkout, default: this one

The cycle is given twice: over every import, and with the one-line delegations the import
contract allows (``ignore_imports`` of the ``layers`` contract in ROOT's pyproject.toml, or
``--delegations`` given as ``a.b -> c.d``) set aside.
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from collections import defaultdict
from pathlib import Path


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted((root / "attngraph").rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, mod: str, is_pkg: bool, level: int) -> str:
    if level == 0:
        return name
    base = mod.split(".")
    if not is_pkg:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports(mods: dict[str, Path]):
    """Yield (importer, imported module, imported name or None) for every import."""
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    yield mod, a.name, None
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(node.module or "", mod, is_pkg, node.level)
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in mods:
                        yield mod, sub, None
                    else:
                        yield mod, target, a.name


def graph(mods, ignore=()):
    g = defaultdict(set)
    for src, dst, _ in imports(mods):
        # `import a.b.c` names the deepest module that exists
        while dst and dst not in mods:
            dst = dst.rpartition(".")[0]
        if dst and dst != src and (src, dst) not in ignore:
            g[src].add(dst)
    return g


def delegations(root: Path):
    """The (importer, imported) pairs the layers contract of ``root`` lets through."""
    path = root / "pyproject.toml"
    if not path.exists():
        return set()
    import tomllib

    conf = tomllib.loads(path.read_text()).get("tool", {}).get("importlinter", {})
    pairs = set()
    for contract in conf.get("contracts", []):
        if contract.get("type") == "layers":
            for line in contract.get("ignore_imports", []):
                a, _, b = line.partition("->")
                pairs.add((a.strip(), b.strip()))
    return pairs


def largest_scc(nodes, g) -> list[str]:
    index, low, stack, on, comps = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            comps.append(comp)

    for v in nodes:
        if v not in index:
            visit(v)
    return sorted(max(comps, key=len))


def private_imports(mods):
    """Imports that take another module's private name, or a private module of another
    package (a package's own private modules are its business)."""
    found = []
    for src, dst, name in imports(mods):
        if not dst.startswith("attngraph"):
            continue
        if name is not None and name.startswith("_") and not name.startswith("__"):
            if dst != src:
                found.append(f"{src}: from {dst} import {name}")
        private_mod = [p for p in dst.split(".") if p.startswith("_") and not p.startswith("__")]
        if private_mod:
            pkg = dst.rpartition(".")[0]
            src_pkg = src if mods.get(src, Path()).name == "__init__.py" else src.rpartition(".")[0]
            if not (src_pkg == pkg or src_pkg.startswith(pkg + ".")):
                found.append(f"{src}: imports private module {dst}")
    return found


def duplicate_blocks(mods, width: int = 6):
    """Pairs of places sharing `width` consecutive same-shape lines (identifiers and
    numbers normalised; blank lines, comments, docstrings, imports and constants skipped)."""
    norm_re = re.compile(r"\b[A-Za-z_]\w*\b|\b\d+(\.\d+)?\b")
    keep = {"def", "return", "for", "in", "if", "else", "elif", "while", "with", "as", "not",
            "and", "or", "is", "None", "True", "False", "lambda", "yield", "raise", "import",
            "from", "class", "try", "except", "finally"}

    def shape(line):
        return norm_re.sub(lambda m: m.group(0) if m.group(0) in keep else "x", line.strip())

    def counted(s: str) -> bool:
        """Code lines: not blank, a comment, a docstring quote, an import or a constant."""
        return bool(s) and not s.startswith(("#", '"""', "'\'\'", "from ", "import ")) \
            and not re.match(r"^[A-Z_][A-Z0-9_]* = ", s)

    windows = defaultdict(list)
    for mod, path in mods.items():
        text = path.read_text()
        # docstrings and other bare strings are prose, not code
        prose = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) \
                    and isinstance(node.value.value, str):
                prose.update(range(node.lineno, node.end_lineno + 1))
        lines = []
        for no, raw in enumerate(text.splitlines(), 1):
            s = raw.strip()
            if no in prose or not counted(s):
                continue
            lines.append((no, shape(raw)))
        for i in range(len(lines) - width + 1):
            key = tuple(s for _, s in lines[i : i + width])
            if sum(len(s) for s in key) < 60:  # too trivial to count
                continue
            windows[key].append((mod, lines[i][0]))
    pairs = set()
    for places in windows.values():
        places = sorted(set(places))
        for a in range(len(places)):
            for b in range(a + 1, len(places)):
                pa, pb = places[a], places[b]
                if pa[0] == pb[0] and abs(pa[1] - pb[1]) < width:
                    continue
                pairs.add((pa, pb))
    # merge runs: one pair per (module, module, offset-diagonal) block
    merged = set()
    for (ma, la), (mb, lb) in sorted(pairs):
        if any(ma == x and mb == y and abs((la - lb) - (xa - yb)) == 0 and 0 <= la - xa <= 40
               for (x, xa), (y, yb) in [(k[0], k[1]) for k in merged]):
            continue
        merged.add(((ma, la), (mb, lb)))
    return sorted(merged)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--delegations", nargs="*", default=None,
                    help="allowed upward imports as 'a.b -> c.d' (default: ROOT's contract)")
    args = ap.parse_args(argv)
    root = Path(args.root)
    mods = modules(root)
    g = graph(mods)
    scc = largest_scc(list(mods), g)
    allowed = (delegations(root) if args.delegations is None else
               {tuple(x.strip() for x in d.split("->")) for d in args.delegations})
    scc_aside = largest_scc(list(mods), graph(mods, allowed))
    priv = private_imports(mods)
    sizes = sorted(((len(p.read_text().splitlines()), m) for m, p in mods.items()), reverse=True)
    dups = duplicate_blocks(mods)
    print(f"modules: {len(mods)}")
    print(f"largest import cycle: {len(scc)} modules"
          + (f" ({', '.join(scc)})" if len(scc) > 1 and args.verbose else ""))
    print(f"largest import cycle without the {len(allowed)} allowed delegations: "
          f"{len(scc_aside)} modules"
          + (f" ({', '.join(scc_aside)})" if len(scc_aside) > 1 and args.verbose else ""))
    print(f"private names imported across modules: {len(priv)}")
    if args.verbose:
        for p in priv:
            print("   ", p)
    print("five largest files (lines): " + ", ".join(f"{m} {n}" for n, m in sizes[:5]))
    print(f"pairs of places sharing >= 6 same-shape lines: {len(dups)}")
    if args.verbose:
        for a, b in dups:
            print(f"    {a[0]}:{a[1]}  ~  {b[0]}:{b[1]}")


if __name__ == "__main__":
    main()
