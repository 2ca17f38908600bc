"""The ``attngraph`` command line.

* ``attngraph demo`` — build a longformer graph, run :func:`attngraph.graph_attention` on
  it, check sampled rows against dense attention, time it against dense masked SDPA, and
  write pictures.
* ``attngraph show MASK [--n N] [mask parameters] --out FILE.png`` — draw any generator of
  :mod:`attngraph.masks`; its options are derived from the generators' signatures, so
  ``attngraph show --help`` lists every mask with its parameters.
* ``attngraph bench ...`` — the benchmark harness of a source checkout
  (``python -m benchmarks``).
"""
from __future__ import annotations

import argparse
import difflib
import importlib.util
import inspect
import math
import os
import runpy
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["main"]

# Tokens of `show` when --n is not given: the picture is then exact (one cell per pair).
DEFAULT_SHOW_N = 512

# Values the command line fills in for generator parameters that have no default.
# (Random inputs: --buckets K draws ids in [0, K); --keep-fraction F keeps a fraction F.)
_CLI_DEFAULTS = {"window": 16, "block": 16, "per_row": 8, "stride": 16, "dilation": 1,
                 "seed": 0, "q_buckets": 8, "keep_q": 0.5, "keep_k": 0.5, "prefix": 16,
                 "shape": (32, 32), "kernel": 7}
# Generator parameters that are the token count, given as --n.
_TOKEN_COUNT = ("n", "num_nodes")


# ---------------------------------------------------------------------------- options
def _int_list(text: str) -> List[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 0,5,9, got {text!r}") from None


def _int_or_ints(text: str):
    """'7' -> 7 (every axis), '7,5' -> [7, 5] (one per axis)."""
    values = _int_list(text)
    if not values:
        raise argparse.ArgumentTypeError(f"expected an integer or integers like 7,5, got "
                                         f"{text!r}")
    return values[0] if len(values) == 1 else values


def _range_list(text: str) -> List[Tuple[int, int]]:
    """'0:16,16:48' -> [(0, 16), (16, 48)]."""
    try:
        pairs = [tuple(int(v) for v in part.split(":"))
                 for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected start:end ranges separated by commas, "
                                         f"like 0:16,16:48; got {text!r}")
    return pairs


def _word_list(text: str):
    """'full' -> 'full' (for every item), 'full,causal' -> ['full', 'causal']."""
    words = [w for w in text.replace(" ", "").split(",") if w]
    return words[0] if len(words) == 1 else words


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        f = float(text)
    except ValueError:
        f = -1.0
    if not 0.0 <= f <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return f


def _layout(text: str):
    """'1100,0110,0011' -> int64 [3, 4] block layout."""
    import torch

    rows = [r for r in text.replace(" ", "").split(",") if r]
    if not rows or any(set(r) - {"0", "1"} for r in rows) or len({len(r) for r in rows}) != 1:
        raise argparse.ArgumentTypeError(
            f"expected rows of 0/1 of equal length separated by commas, like 110,011,001; "
            f"got {text!r}")
    return torch.tensor([[int(c) for c in r] for r in rows], dtype=torch.long)


@dataclass(frozen=True)
class _Option:
    """How one command-line option feeds generator parameters."""

    flag: str                       # e.g. "--global-indices"
    metavar: str
    help: str
    type: Optional[Callable] = None  # argparse type; None for on/off flags


# Parameters whose values are not plain numbers: the option that supplies them. Several
# parameters may share an option (hash_buckets' ids come from --buckets and --seed).
_GLOBAL = _Option("--global-indices", "I,J,..", "global token positions", _int_list)
_KEEP = _Option("--keep-fraction", "F", "random keep masks of queries and keys, each keeping "
                "a fraction F (with --seed)", _fraction)
_SPECIAL = {
    "indices": _GLOBAL,
    "global_indices": _GLOBAL,
    "lengths": _Option("--lengths", "L1,L2,..", "document lengths (N = their sum)",
                       _int_list),
    "q_buckets": _Option("--buckets", "K", "random bucket ids in [0, K) (with --seed)", int),
    "keep_q": _KEEP,
    "keep_k": _KEEP,
    "layout": _Option("--layout", "ROWS", "0/1 block layout rows, e.g. 110,011,001 "
                      "(N = columns x block)", _layout),
    "shape": _Option("--shape", "S1,S2,..", "grid shape (N = the product)", _int_list),
    "kernel": _Option("--kernel", "K|K1,K2,..", "odd window size, for every axis or per "
                      "axis", _int_or_ints),
    "q_ranges": _Option("--q-ranges", "A:B,..", "query ranges of the rectangles",
                        _range_list),
    "k_ranges": _Option("--k-ranges", "A:B,..", "key ranges of the rectangles", _range_list),
    "kinds": _Option("--kinds", "full|causal,..", "kind of every rectangle, or one for all",
                     _word_list),
}
_SEED = _Option("--seed", "INT", "random seed", int)
# Parameters built from random draws also take --seed.
_RANDOM_INPUTS = {"q_buckets", "keep_q", "keep_k"}


@dataclass
class _Param:
    name: str
    option: _Option
    default: object          # inspect.Parameter.empty when required
    kind: str                # "int" | "float" | "bool" | "special"


@dataclass
class _Mask:
    name: str
    fn: Callable
    takes_n: bool
    params: List[_Param]
    summary: str

    def options(self) -> Dict[str, _Option]:
        """Options this mask accepts, by argparse dest."""
        opts = {_dest(p.option.flag): p.option for p in self.params}
        if any(p.name in _RANDOM_INPUTS for p in self.params):
            opts["seed"] = _SEED
        if self.takes_n:
            opts["n"] = _Option("--n", "N", "number of tokens", int)
        return opts


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _kind(p: inspect.Parameter) -> Optional[str]:
    ann = p.annotation if isinstance(p.annotation, str) else getattr(
        p.annotation, "__name__", str(p.annotation))
    default = p.default
    if isinstance(default, bool) or ann == "bool":
        return "bool"
    if isinstance(default, int) or ann == "int":
        return "int"
    if isinstance(default, float) or ann == "float":
        return "float"
    return None


def _describe(fn: Callable) -> Optional[_Mask]:
    """The command-line view of a generator, or None when it takes an input the command
    line cannot give (it is then not offered)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    takes_n, params = False, []
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            return None
        if p.name in _TOKEN_COUNT:
            takes_n = True
            continue
        if p.name in _SPECIAL:
            params.append(_Param(p.name, _SPECIAL[p.name], p.default, "special"))
            continue
        kind = _kind(p)
        if kind is None:
            if p.default is p.empty:
                return None          # a required input the command line cannot supply
            continue                 # optional and not expressible: keep its default
        flag = "--" + p.name.replace("_", "-")
        if kind == "bool":
            opt = _Option(flag, "", "")
        else:
            opt = _Option(flag, kind.upper(), "", int if kind == "int" else float)
        params.append(_Param(p.name, opt, p.default, kind))
    if any(p.name in _RANDOM_INPUTS for p in params):
        takes_n = True               # random per-token inputs need a token count
    return _Mask(getattr(fn, "__name__", "?"), fn, takes_n, params, _summary(fn))


def _summary(fn: Callable) -> str:
    """First sentence of the docstring, without reST markup."""
    doc = (inspect.getdoc(fn) or "").strip()
    para = " ".join(doc.split("\n\n")[0].split())
    end = para.find(". ")
    return (para if end < 0 else para[:end + 1]).replace("``", "")


# helpers of attngraph.masks that combine graphs or hash inputs rather than build a mask
_NOT_MASKS = ("batch", "stack", "lsh_buckets")


def _masks() -> Dict[str, _Mask]:
    """Every generator of attngraph.masks the command line can build, by name."""
    from attngraph import masks

    out = {}
    for name in getattr(masks, "__all__", []):
        fn = getattr(masks, name, None)
        if not inspect.isfunction(fn) or name.startswith("_") or name in _NOT_MASKS:
            continue
        m = _describe(fn)
        if m is not None:
            out[name] = m
    return out


def _usage_of(m: _Mask) -> str:
    parts = [f"--n N [{DEFAULT_SHOW_N}]"] if m.takes_n else []
    seen = set()
    for p in m.params:
        flag = p.option.flag
        if flag in seen:
            continue
        seen.add(flag)
        if p.kind == "bool":
            parts.append(f"{flag}/--no-{flag[2:]} [{'on' if p.default else 'off'}]")
            continue
        default = p.default if p.default is not inspect.Parameter.empty else \
            _CLI_DEFAULTS.get(p.name, inspect.Parameter.empty)
        shown = "required" if default is inspect.Parameter.empty else (
            "" if default is None else (",".join(map(str, default)) or "none")
            if isinstance(default, (tuple, list)) else str(default))
        parts.append(f"{flag} {p.option.metavar}" + (f" [{shown}]" if shown else ""))
    if any(p.name in _RANDOM_INPUTS for p in m.params):
        parts.append("--seed INT [0]")
    return " ".join(parts)


def _masks_epilog(masks: Dict[str, _Mask]) -> str:
    lines = ["masks and their parameters ([default]):"]
    for name, m in masks.items():
        lines.append(f"  {name}")
        if m.summary:
            lines += textwrap.wrap(m.summary, 86, initial_indent="      ",
                                   subsequent_indent="      ")
        usage = _usage_of(m)
        if usage:
            lines += textwrap.wrap(usage, 86, initial_indent="      ",
                                   subsequent_indent="        ")
    if not masks:
        lines.append("  (none: attngraph.masks exports no generators)")
    lines += ["", "examples:",
              "  attngraph show longformer --n 4096 --window 64 --global-indices 0,2048 "
              "--out lf.png",
              "  attngraph show hash_buckets --n 256 --buckets 4 --sort-by-bucket --out hb.png"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- parser
def _build_parser(masks: Dict[str, _Mask]
                  ) -> Tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The top-level parser and the `show` subparser (whose errors name `show`)."""
    parser = argparse.ArgumentParser(
        prog="attngraph",
        description="Transformer attention as message passing on a token graph.",
        epilog=("masks for `show`: " + (", ".join(masks) or "none") +
                "\nrun `attngraph show --help` for their parameters"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{demo,show,bench}")
    sub.required = True

    demo = sub.add_parser("demo", help="run graph attention on a longformer graph, check "
                          "and time it, draw pictures", description=_DEMO_DOC,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_demo_arguments(demo)

    show = sub.add_parser(
        "show", help="draw a mask of attngraph.masks to a PNG file",
        usage="attngraph show MASK [--n N] [mask parameters] --out FILE.png [options]",
        description="Draw a mask (query i attends to key j: mask[i, j]) to a PNG file.",
        epilog=_masks_epilog(masks), formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("mask", metavar="MASK", help="mask generator: " + ", ".join(masks))
    show.add_argument("--out", required=True, metavar="FILE.png", help="PNG file to write")
    show.add_argument("--n", type=int, default=None, metavar="N",
                      help=f"number of tokens (default {DEFAULT_SHOW_N})")
    show.add_argument("--style", choices=("mask", "arcs"), default="mask",
                      help="mask image (default) or arc diagram (small graphs)")
    show.add_argument("--resolution", type=_positive_int, default=512,
                      help="largest image side in cells before binning (default 512)")
    show.add_argument("--sort-by-bucket", action="store_true",
                      help="hash_buckets: number tokens by (bucket, position) so buckets "
                      "become blocks")
    show.add_argument("--tiles", nargs="?", type=_positive_int, const=0, default=None,
                      metavar="BLOCK",
                      help="colour the edges that run on dense tiles and those that run "
                      "per edge (graph.tile_plan(); BLOCK: the tile size, default: chosen "
                      "by cost)")
    show.add_argument("--dpi", type=_positive_int, default=120,
                      help="PNG resolution (default 120)")
    flags: Dict[str, _Option] = {"seed": _SEED}
    users: Dict[str, List[str]] = {}
    for m in masks.values():
        for dest, opt in m.options().items():
            if dest != "n":
                flags.setdefault(dest, opt)
                users.setdefault(dest, []).append(m.name)
    group = show.add_argument_group("mask parameters (which ones a mask takes: see below)")
    for dest, opt in sorted(flags.items()):
        used = f"({', '.join(users.get(dest, []))})"
        if opt.type is None:
            group.add_argument(opt.flag, dest=dest, action=argparse.BooleanOptionalAction,
                               default=None, help=used)
        else:
            group.add_argument(opt.flag, dest=dest, type=opt.type, default=None,
                               metavar=opt.metavar, help=f"{opt.help} {used}".strip())

    bench = sub.add_parser("bench", help="run the benchmark harness of a source checkout "
                           "(python -m benchmarks); arguments are passed on", add_help=False)
    bench.add_argument("args", nargs=argparse.REMAINDER)
    return parser, show


# ---------------------------------------------------------------------------- show
_SHOW_OWN = ("command", "mask", "out", "style", "resolution", "sort_by_bucket", "tiles",
             "dpi")


def _mask_kwargs(m: _Mask, args: argparse.Namespace, error: Callable[[str], None]):
    """Keyword arguments of the generator from the parsed options, and the random inputs
    drawn for it (``{"buckets": ...}``)."""
    import torch

    given = {d for d, v in vars(args).items() if v is not None and d not in _SHOW_OWN}
    extra = sorted(given - set(m.options()))
    if extra:
        flags = ", ".join("--" + d.replace("_", "-") for d in extra)
        error(f"mask {m.name!r} does not take {flags}; it takes: "
              f"{_usage_of(m) or 'no parameters'}")
    if args.sort_by_bucket and not any(p.name == "q_buckets" for p in m.params):
        error(f"--sort-by-bucket applies to masks with hash buckets, not {m.name!r}")
    n = args.n if args.n is not None else DEFAULT_SHOW_N
    if n < 0:
        error(f"--n must be >= 0, got {n}")
    gen = torch.Generator().manual_seed(args.seed if args.seed is not None else 0)
    kw: Dict[str, object] = {}
    drawn: Dict[str, object] = {}
    for name in _TOKEN_COUNT:
        if name in inspect.signature(m.fn).parameters:
            kw[name] = n
    for p in m.params:
        value = getattr(args, _dest(p.option.flag))
        if p.name == "q_buckets":
            k = _CLI_DEFAULTS["q_buckets"] if value is None else value
            if k < 1:
                error(f"--buckets must be >= 1, got {k}")
            value = drawn["buckets"] = torch.randint(k, (n,), generator=gen)
        elif p.name in ("keep_q", "keep_k"):
            f = _CLI_DEFAULTS[p.name] if value is None else value
            value = torch.rand(n, generator=gen) < f
        elif value is None:
            if p.default is not inspect.Parameter.empty:
                continue
            if p.name not in _CLI_DEFAULTS:
                error(f"mask {m.name!r} needs {p.option.flag} {p.option.metavar}".rstrip())
            value = _CLI_DEFAULTS[p.name]
        kw[p.name] = value
    return kw, drawn


def _sort_by_bucket(graph, buckets):
    """Renumber tokens by (bucket, position)."""
    import torch

    return graph.permute(torch.sort(buckets, stable=True).indices)


def _show(args: argparse.Namespace, masks: Dict[str, _Mask],
          show_parser: argparse.ArgumentParser) -> int:
    error = show_parser.error
    if args.mask not in masks:
        close = difflib.get_close_matches(args.mask, list(masks), n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        error(f"unknown mask {args.mask!r}{hint} (choose from {', '.join(masks)})")
    m = masks[args.mask]
    kw, drawn = _mask_kwargs(m, args, error)
    try:
        graph = m.fn(**kw)
    except (TypeError, ValueError) as e:
        error(f"{m.name}: {e}")
    title = _call_text(m, kw)
    if args.sort_by_bucket:
        graph = _sort_by_bucket(graph, drawn["buckets"])
        title += ", tokens sorted by bucket"

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from attngraph import viz

    if args.style == "arcs":
        n = max(graph.num_src, graph.num_dst)
        fig = Figure(figsize=(max(6.0, 0.3 * n + 2), 4.2), layout="constrained")
        FigureCanvasAgg(fig)
        try:
            viz.plot_graph(graph, ax=fig.add_subplot(), title=title)
        except ValueError as e:
            error(str(e))
    else:
        fig = Figure(figsize=(5.6, 5.0), layout="constrained")
        FigureCanvasAgg(fig)
        tiles = None
        if args.tiles is not None:
            tiles = graph.tile_plan(args.tiles or None, order=None)
        viz.plot_mask(graph, ax=fig.add_subplot(), resolution=args.resolution, title=title,
                      tiles=tiles)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(args.out, dpi=args.dpi)
    print(f"{graph}\nwrote {args.out}")
    return 0


def _call_text(m: _Mask, kw) -> str:
    """'longformer(4096, window=64, global_indices=(0, 2048))' for the title."""
    import torch

    items = []
    for name, value in kw.items():
        if isinstance(value, torch.Tensor):
            items.append(f"{name}=<random>" if value.dim() == 1 else f"{name}=...")
            continue
        text = f"({', '.join(map(str, value))})" if isinstance(value, (list, tuple)) else (
            str(value))
        if len(text) > 40:
            text = text[:37] + "...)"
        items.append(text if name == "n" else f"{name}={text}")
    return f"{m.name}({', '.join(items)})"


# ---------------------------------------------------------------------------- demo
_DEMO_DOC = """\
Build a longformer graph (sliding window + evenly spaced global tokens) over N tokens, run
attngraph.graph_attention on random q/k/v with the best available backend, check sampled
query rows (global ones included) against dense attention computed for those rows only,
time it against dense masked scaled_dot_product_attention, and draw mask.png and
attention.png into the output folder."""

# Arc picture of the demo: the first tokens' subgraph.
_DEMO_ARC_TOKENS = 24
# Timed runs beyond the first _MIN_RUNS stop once a method has used this much time
# (seconds): keeps the CPU demo short on small machines while a GPU still gets several runs.
_DEMO_TIME_BUDGET = {"cpu": 6.0, "cuda": 5.0}
# Every timing is the median of at least this many runs, after one warm-up call.
_MIN_RUNS = 3


def _add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=None,
                   help="number of tokens (default 65536 on a GPU, 8192 on a CPU)")
    p.add_argument("--heads", type=int, default=8, help="attention heads H (default 8)")
    p.add_argument("--dim", type=int, default=64, help="head dim D (default 64)")
    p.add_argument("--window", type=int, default=128,
                   help="keys on each side of a query (default 128)")
    p.add_argument("--global-tokens", type=int, default=16,
                   help="evenly spaced global tokens (default 16)")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--runs", type=int, default=None,
                   help=f"timed runs per method after one warm-up call, at least {_MIN_RUNS} "
                   f"(default 10 on a GPU, {_MIN_RUNS} on a CPU; runs past {_MIN_RUNS} stop "
                   f"when a method has used its time budget)")
    p.add_argument("--no-dense", action="store_true",
                   help="skip the dense scaled_dot_product_attention comparison")
    p.add_argument("--seed", type=int, default=0, help="seed of q, k, v (default 0)")
    p.add_argument("--out", default="attngraph-demo", metavar="DIR",
                   help="folder for mask.png and attention.png (default attngraph-demo/)")


def _fmt_bytes(b: float) -> str:
    for unit, div in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if b >= div:
            return f"{b / div:.3g} {unit}"
    return f"{int(b)} B"


def _fmt_time(t: float) -> str:
    return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


def _runs(r: int) -> str:
    return f"{r} run" + ("s" if r != 1 else "")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, runs: int, budget: float, desc: str):
    """One untimed warm-up call of ``fn`` (first-call work: plans, caches, kernel builds),
    then ``runs`` timed calls; calls past the first ``_MIN_RUNS`` stop once ``budget``
    seconds are used. Returns (output of the warm-up call, median seconds, runs timed)."""
    import statistics
    import time

    from tqdm import tqdm      # text bars on stderr: tqdm.auto would want ipywidgets

    runs = max(runs, _MIN_RUNS)
    out = fn()
    _sync(device)
    times = []
    with tqdm(total=runs, desc=desc, unit="run", leave=False, file=sys.stderr) as bar:
        while len(times) < runs and (len(times) < _MIN_RUNS or sum(times) < budget):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
            bar.update()
    return out, statistics.median(times), len(times)


def _peak_memory(device) -> str:
    import resource

    import torch

    if device.type == "cuda":
        return _fmt_bytes(torch.cuda.max_memory_allocated(device))
    # ru_maxrss: kilobytes on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return _fmt_bytes(rss if sys.platform == "darwin" else rss * 1024) + " (process RSS)"


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _free_memory(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _dense_rows(q, k, v, graph, rows):
    """Dense attention of the given query rows over all keys (masked by the graph), in
    float64 on a CPU and float32 on a GPU -> ``[len(rows), H, D_v]``."""
    import torch

    dt = torch.float64 if q.device.type == "cpu" else torch.float32
    H, H_kv = q.size(1), k.size(1)
    kk = k.to(dt).repeat_interleave(H // H_kv, dim=1)            # [N, H, D]
    vv = v.to(dt).repeat_interleave(H // H_kv, dim=1)
    outs = []
    for i in rows:
        lo, hi = int(graph.ptr[i]), int(graph.ptr[i + 1])
        allowed = torch.zeros(graph.num_src, dtype=torch.bool, device=q.device)
        allowed[graph.src[lo:hi]] = True
        s = torch.einsum("hd,jhd->hj", q[i].to(dt), kk) / math.sqrt(q.size(-1))
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
        outs.append(torch.einsum("hj,jhd->hd", p, vv))
    return torch.stack(outs)


def _demo(args: argparse.Namespace) -> int:
    import time

    import torch

    import attngraph as ag
    from attngraph.ops.dispatch import Inputs, explain
    from attngraph.ops.record import recording

    def fail(message: str) -> int:
        print(f"attngraph demo: error: {message}", file=sys.stderr)
        return 2

    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            return fail(f"--device must be a torch device like cpu or cuda:0, got "
                        f"{args.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            return fail("--device cuda was given but torch sees no CUDA device")
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    n = args.n if args.n is not None else (65536 if gpu else 8192)
    for name, value, least in (("--n", n, 1), ("--heads", args.heads, 1),
                               ("--dim", args.dim, 1), ("--window", args.window, 0),
                               ("--global-tokens", args.global_tokens, 0)):
        if value < least:
            return fail(f"{name} must be >= {least}, got {value}")
    H, D = args.heads, args.dim
    runs = args.runs if args.runs is not None else (10 if gpu else _MIN_RUNS)
    if runs < _MIN_RUNS:
        return fail(f"--runs must be >= {_MIN_RUNS} (a median of fewer runs is not a "
                    f"timing), got {runs}")
    budget = _DEMO_TIME_BUDGET.get(device.type, 5.0)

    num_global = min(args.global_tokens, n)
    gidx = [g * n // num_global for g in range(num_global)] if num_global else []
    shown = ", ".join(map(str, gidx[:6])) + (", ..." if len(gidx) > 6 else "")
    print(f"attngraph demo on {device} ({str(dtype).replace('torch.', '')}): longformer mask "
          f"over N = {n} tokens, window {args.window} on each side, {num_global} global "
          f"tokens evenly spaced every {n // max(num_global, 1)} tokens ({shown})")

    t0 = time.perf_counter()
    graph = ag.masks.longformer(n, args.window, gidx).to(device)
    t_graph = time.perf_counter() - t0
    print(f"graph: {graph}  (built in {_fmt_time(t_graph)})")

    gen = torch.Generator(device=device).manual_seed(args.seed)
    q, k, v = (torch.randn(n, H, D, generator=gen, device=device).to(dtype) for _ in range(3))

    _reset_peak(device)
    with torch.no_grad(), recording() as ran:
        out, t_graph_attn, n_runs = _timed(
            lambda: ag.graph_attention(q, k, v, graph), device, runs, budget,
            "graph_attention")
    peak_graph = _peak_memory(device)
    # the backend that ran the calls (the dispatcher's record of them), and why auto took
    # it, asked with the very inputs of the calls
    backend = "/".join(dict.fromkeys(ran))
    print(f"backend: {backend} (ran {len(ran)} calls, chosen by backend='auto')\n"
          f"  {explain('auto', Inputs.of(q, k, v, graph))}")

    # Check sampled rows (two global ones among them) against dense attention of those rows.
    rgen = torch.Generator().manual_seed(args.seed + 1)
    rows = set(gidx[:1] + gidx[len(gidx) // 2:len(gidx) // 2 + 1] + [n - 1])
    rows |= set(torch.randint(n, (8,), generator=rgen).tolist())
    rows = sorted(rows)
    with torch.no_grad():
        ref = _dense_rows(q, k, v, graph, rows)
    err = (out[rows].to(ref.dtype) - ref).abs().max().item()
    tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
    ok = err <= tol
    glob = [str(r) for r in rows if r in gidx]
    print(f"check: {len(rows)} query rows" + (f" (global rows {', '.join(glob)})" if glob else "")
          + f" against dense attention of those rows: max |error| = {err:.2e} "
          f"({'ok' if ok else 'FAILED'}, tolerance {tol:g})")

    dense = _dense_sdpa(q, k, v, graph, rows, ref, device, dtype, runs, budget, args.no_dense)

    table = [("method", "backend", "device", "N", "edges", "density",
              "time (median of runs, after 1 warm-up)",
              "peak memory", "max error"),
             ("graph_attention", backend, str(device), str(n), f"{graph.num_edges:,}",
              f"{100 * graph.density:.3g}%", f"{_fmt_time(t_graph_attn)} ({_runs(n_runs)})",
              peak_graph, f"{err:.2e}")]
    if dense["time"] is not None:
        table.append(("dense masked SDPA", "torch", str(device), str(n), f"{n * n:,}",
                      "100%", f"{_fmt_time(dense['time'])} ({_runs(dense['runs'])})",
                      dense["peak"], f"{dense['err']:.2e}"))
    widths = [max(len(r[c]) for r in table) for c in range(len(table[0]))]
    print()
    for r, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if r == 0:
            print("  ".join("-" * w for w in widths))
    if dense["time"] is None:
        print(f"dense masked SDPA: {dense['skipped']}")
    else:
        print(f"speed-up of graph_attention over dense masked SDPA: "
              f"{dense['time'] / t_graph_attn:.3g}x (the graph holds "
              f"{100 * graph.density:.3g}% of the N^2 scores)")

    paths = _demo_pictures(args.out, graph, q, k, args.window, gidx)
    print()
    for path in paths:
        print(f"wrote {path}")
    return 0 if ok else 1


def _dense_sdpa(q, k, v, graph, rows, ref, device, dtype, runs, budget, disabled):
    """Time dense masked scaled_dot_product_attention on the same input, when it fits."""
    import torch
    import torch.nn.functional as F

    res = {"time": None, "runs": 0, "peak": "", "err": float("nan"), "skipped": ""}
    n, H = q.size(0), q.size(1)
    if disabled:
        res["skipped"] = "skipped (--no-dense)"
        return res
    elem = torch.finfo(dtype).bits // 8
    mask_bytes = n * n
    # the bool mask, its additive float form, and on a CPU the math path's scores and
    # probabilities (H x N x N each)
    need = mask_bytes * (1 + elem) + (2 * H * n * n * 4 if device.type == "cpu" else 0)
    free = _free_memory(device)
    if need > 0.7 * free:
        res["skipped"] = (f"skipped (mask would need {_fmt_bytes(mask_bytes)}, about "
                          f"{_fmt_bytes(need)} in all; {_fmt_bytes(free)} free)")
        return res
    with torch.no_grad():
        mask = graph.to_dense()
        qt, kt, vt = (t.transpose(0, 1) for t in (q, k, v))            # [H, N, D]
        _reset_peak(device)
        out, t, r = _timed(lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask),
                           device, runs, budget, "dense SDPA")
        res["peak"] = _peak_memory(device)
        res["err"] = (out.transpose(0, 1)[rows].to(ref.dtype) - ref).abs().max().item()
    res["time"], res["runs"] = t, r
    return res


def _demo_pictures(out_dir: str, graph, q, k, window: int, gidx) -> List[str]:
    """mask.png of the whole graph; attention.png: arcs among the first tokens, weighted by
    the full graph's attention weights (head mean) restricted to those tokens."""
    import torch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    import attngraph as ag
    from attngraph import viz
    from attngraph.graph import TokenGraph

    os.makedirs(out_dir, exist_ok=True)
    n = graph.num_dst
    fig = Figure(figsize=(5.6, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    viz.plot_mask(graph, ax=fig.add_subplot(),
                  title=f"longformer(window={window}, {len(gidx)} global tokens)")
    mask_path = os.path.join(out_dir, "mask.png")
    fig.savefig(mask_path, dpi=120)

    m = min(_DEMO_ARC_TOKENS, n)
    e = int(graph.ptr[m])
    with torch.no_grad():
        # rows 0..m-1 with all their keys: softmax over each row's full neighbourhood
        rows = TokenGraph._from_canonical(graph.src[:e], graph.dst[:e], n, m)
        p = ag.ops.edge_softmax(ag.ops.edge_scores(q[:m].float(), k.float(), rows), rows)
        inside = rows.src < m
        sub = TokenGraph._from_canonical(rows.src[inside], rows.dst[inside], m, m)
        weights = p[inside].mean(-1).cpu()
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    viz.plot_graph(sub.cpu(), weights=weights, ax=fig.add_subplot(),
                   title=f"attention among the first {m} of {n} tokens (weights of the full "
                   f"graph, mean over {q.size(1)} heads)")
    arcs_path = os.path.join(out_dir, "attention.png")
    fig.savefig(arcs_path, dpi=110)
    return [mask_path, arcs_path]


# ---------------------------------------------------------------------------- bench
def _bench(argv: Sequence[str], module: str = "benchmarks") -> int:
    """Run ``python -m benchmarks`` with ``argv``; the harness exists only in a source
    checkout, so a console script started from the repository root looks there too."""
    if importlib.util.find_spec(module) is None and os.path.isfile(
            os.path.join(os.getcwd(), module, "__main__.py")):
        sys.path.insert(0, os.getcwd())  # console scripts do not put the cwd on sys.path
    if importlib.util.find_spec(module) is None:
        print(f"attngraph bench: error: the benchmark harness (the {module!r} package) is "
              f"not importable; it ships with the source checkout only: run `attngraph bench "
              f"...` or `python -m {module} ...` from the repository root", file=sys.stderr)
        return 2
    old = sys.argv
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    finally:
        sys.argv = old
    return 0


# ---------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``attngraph`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # everything after `bench` belongs to the harness
        return _bench(argv[1:])
    masks = _masks()
    parser, show_parser = _build_parser(masks)
    args = parser.parse_args(argv)
    if args.command == "show":
        return _show(args, masks, show_parser)
    if args.command == "demo":
        return _demo(args)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse checks
    return 2


if __name__ == "__main__":
    sys.exit(main())
