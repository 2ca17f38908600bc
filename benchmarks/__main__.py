"""Command line: ``python -m benchmarks [--preset NAME] [flags]``,
``python -m benchmarks longest [flags]`` and ``python -m benchmarks report FILE.json``."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

RESULTS = Path(__file__).resolve().parent / "results"


def _sizes(text: str) -> List[int]:
    out = []
    for part in text.split(","):
        p = part.strip().lower()
        if not p:
            continue
        mult = 1
        if p[-1] in "km":
            mult = 1024 if p[-1] == "k" else 1024 * 1024
            p = p[:-1]
        out.append(int(float(p) * mult))
    return out


def _list(text: str) -> List[str]:
    """Comma-separated, but commas inside parentheses belong to a mask's arguments."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        items.append(cur.strip())
    return items


def _ints(text: str) -> List[int]:
    return [int(x) for x in _list(text)]


def _device(name: Optional[str]):
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--isolate", choices=["fork", "spawn", "none"],
                   help="process per job: fork (CPU default), spawn (python -m "
                        "benchmarks.worker), none (in this process; CUDA default)")
    p.add_argument("--timeout", type=float, help="seconds per job before it is killed")
    p.add_argument("--out", type=Path, default=RESULTS,
                   help="results root; files go to OUT/<device>/ (default benchmarks/results)")
    p.add_argument("--name", help="file stem of the results (default: the preset)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")


def sweep_parser() -> argparse.ArgumentParser:
    from benchmarks.presets import PRESETS

    p = argparse.ArgumentParser(prog="python -m benchmarks",
                                description="Benchmark attngraph against its peers.")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named sweep (flags override)")
    p.add_argument("--masks", type=_list, help="e.g. 'sliding_window(64),random(64)'")
    p.add_argument("--n", type=_sizes, help="token counts, e.g. 16k,64k,80000")
    p.add_argument("--heads", type=_ints)
    p.add_argument("--dim", type=_ints)
    p.add_argument("--dtype", type=_list, help="float32,bfloat16,float16")
    p.add_argument("--peers", type=_list, help="attngraph,attngraph-cupy,pyg,sdpa,"
                   "sdpa-efficient,sdpa-math,sdpa-flash,flex")
    p.add_argument("--modes", type=_list, help="fwd,fwdbwd (default both)")
    p.add_argument("--repeats", type=int, help="timed runs (median reported)")
    p.add_argument("--warmup", type=int, help="untimed runs first (the first one is checked)")
    p.add_argument("--max-seconds", type=float,
                   help="stop repeating a (peer, mode) once this much time is spent")
    p.add_argument("--mem-budget-gb", type=float,
                   help="skip runs whose estimated memory exceeds this (default 12 on CPU, "
                        "90%% of the device on CUDA)")
    p.add_argument("--check-rows", type=int, help="query rows checked against float64")
    p.add_argument("--threads", type=int,
                   help="torch.set_num_threads in every job (default: torch's choice)")
    p.add_argument("--quick", action="store_true",
                   help="the preset at toy sizes (its quick_n, else 1k,2k)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--longest", action="store_true",
                   help="run the longest-context search instead (same as the subcommand)")
    _common(p)
    return p


def run_sweep(argv: List[str]) -> int:
    import torch

    from benchmarks.harness import device_slug, environment, expand, run_jobs
    from benchmarks.peers import default_peers
    from benchmarks.presets import PRESETS
    from benchmarks.report import write_report

    args = sweep_parser().parse_args(argv)
    if args.longest:
        return run_longest([a for a in argv if a != "--longest"])
    if args.preset and PRESETS[args.preset].get("model"):
        return run_model(args, PRESETS[args.preset], argv)
    if args.preset and PRESETS[args.preset].get("distributed"):
        return run_distributed(args, PRESETS[args.preset])
    device = _device(args.device)
    preset = dict(PRESETS[args.preset]) if args.preset else {}
    groups = preset.get("groups") or [dict(masks=["sliding_window(64)"], n=[4096])]
    if args.masks:
        groups = [dict(masks=args.masks, n=sorted({n for g in groups for n in g["n"]}))]
    if args.quick:
        quick = preset.get("quick_n", [1024, 2048])
        groups = [dict(g, n=quick) for g in groups]
    if args.n:
        groups = [dict(g, n=args.n) for g in groups]
    if device.type == "cuda":
        budget = 0.9 * torch.cuda.get_device_properties(device).total_memory
    else:
        budget = 12e9
    if args.mem_budget_gb:
        budget = args.mem_budget_gb * 1e9
    isolate = args.isolate or ("none" if device.type == "cuda" else "fork")
    if isolate == "fork" and device.type == "cuda":
        raise SystemExit("--isolate fork cannot be used with CUDA; use spawn or none")
    settings = dict(
        heads=args.heads or preset.get("heads", [4]),
        dim=args.dim or preset.get("dim", [64]),
        dtype=args.dtype or preset.get("dtype", ["float32"]),
        peers=args.peers or preset.get("peers") or default_peers(device.type),
        modes=args.modes or ["fwd", "fwdbwd"],
    )
    common = dict(
        device=str(device), budget=budget,
        repeats=args.repeats or preset.get("repeats", 5),
        warmup=args.warmup or preset.get("warmup", 1),
        max_seconds=args.max_seconds or preset.get("max_seconds", 30.0),
        check_rows=args.check_rows if args.check_rows is not None else 64,
        rlimit=device.type == "cpu" and isolate != "none",
        threads=args.threads,
    )
    jobs = expand(groups, **settings, **common)
    name = args.name or (args.preset or "custom") + ("_quick" if args.quick else "")
    out_dir = args.out / device_slug(device)
    out_json = out_dir / f"{name}.json"
    meta = environment(device, argv)
    meta.update(threads=args.threads or torch.get_num_threads(),
                omp_env={k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_"))},
                name=name, preset=args.preset, about=preset.get("about"),
                base_peer=preset.get("base_peer", "attngraph"),
                repeats=common["repeats"], warmup=common["warmup"],
                max_seconds=common["max_seconds"], budget=budget,
                check_rows=common["check_rows"], isolate=isolate,
                memory_method=("one extra call with glibc serving every allocation >= 64 KiB "
                               "from its own mapping; its RSS high-water mark (VmHWM, reset "
                               "via /proc/self/clear_refs) minus the RSS at the baseline" + {"fork": ", a fresh forked process per job",
                                             "spawn": ", a fresh interpreter per job",
                                             "none": ", all jobs in one process"}[isolate]
                               if device.type == "cpu" else
                               "torch.cuda.max_memory_allocated minus memory_allocated"),
                groups=groups, **settings)
    timeout = args.timeout or preset.get("timeout", 1800.0)
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    records = run_jobs(jobs, isolate=isolate, timeout=timeout, meta=meta, out_json=out_json,
                       progress=not args.quiet, log=log)
    from benchmarks.harness import write_json

    write_json(out_json, meta, records, elapsed=time.perf_counter() - t0)
    written = write_report(out_json, with_plots=not args.no_plots)
    if not args.quiet:
        print("\n".join(str(p) for p in [out_json, *written]))
    return 0


def run_distributed(args, preset: dict) -> int:
    """``--preset distributed``: P processes per point, written to ``OUT/distributed/``."""
    from benchmarks import distributed

    preset = dict(preset)
    if args.n:
        preset["n"] = preset["quick_n"] = args.n
    if args.masks:
        preset["masks"] = args.masks
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    written = distributed.run(preset, quick=args.quick, out_dir=args.out / "distributed",
                              log=log)
    if not args.quiet:
        print("\n".join(str(p) for p in written))
    return 0


def run_model(args, preset: dict, argv: List[str]) -> int:
    """``--preset model``: the traffic model, written to ``OUT/model/``."""
    import torch

    from benchmarks import model
    from benchmarks.specs import parse_dtype

    n = (args.n or (preset["quick_n"] if args.quick else preset["n"]))[0]
    n_emul = preset["quick_n_emulated"] if args.quick else preset["n_emulated"]
    cfg = model.Config(n=n, n_emulated=n_emul, heads=(args.heads or preset["heads"])[0],
                       dims=tuple(args.dim or preset["dim"]),
                       dtype=parse_dtype((args.dtype or preset["dtype"])[0]),
                       masks=tuple(args.masks) if args.masks else model.MASKS)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    data = model.run(cfg, log=log or (lambda s: None))
    data["meta"]["command"] = "python -m benchmarks " + " ".join(argv)
    out_dir = args.out / ("model" + ("_quick" if args.quick else ""))
    written = model.write(data, out_dir)
    if not args.quiet:
        print("\n".join(str(p) for p in written))
    return 0


def longest_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks longest",
                                description="Largest N that runs within a memory budget.")
    p.add_argument("--mask", help="mask spec (default: the device's preset)")
    p.add_argument("--dtype")
    p.add_argument("--heads", type=int)
    p.add_argument("--dim", type=int)
    p.add_argument("--peers", type=_list)
    p.add_argument("--modes", type=_list)
    p.add_argument("--budget-gb", type=float,
                   help="memory budget (CPU default 2; CUDA default the device memory)")
    p.add_argument("--start-n", type=_sizes)
    p.add_argument("--max-n", type=_sizes)
    p.add_argument("--resolution", type=float, default=0.1,
                   help="stop bisecting when first failing N / largest N < 1 + this")
    p.add_argument("--max-trials", type=int, default=30)
    p.add_argument("--threads", type=int, help="torch.set_num_threads in every trial")
    p.add_argument("--graphs", type=_list,
                   help="search by graph kind instead of by peer: implicit,int64,int32 "
                        "(attngraph's graph_attention on the rule itself, or on the edge "
                        "list with int64 / int32 node ids); with --masks and --dtypes")
    p.add_argument("--masks", type=_list, help="with --graphs: masks to search, e.g. "
                   "'sliding_window(256),longformer(256,g16)'")
    p.add_argument("--dtypes", type=_list, help="with --graphs: e.g. float32,bfloat16")
    _common(p)
    return p


def run_graph_longest(args, argv: List[str]) -> int:
    """``--longest --graphs ...``: the largest N per (mask, dtype, mode, graph kind), with
    bytes per token against the floor and the paper-scale N; then each implicit graph timed
    at its explicit graph's largest N."""
    import torch

    from benchmarks.harness import device_slug, environment, run_isolated
    from benchmarks.longest import GRAPHS, floor_bytes, graph_markdown, search
    from benchmarks.specs import parse_dtype, parse_mask

    for g in args.graphs:
        if g not in GRAPHS:
            raise SystemExit(f"--graphs takes {', '.join(GRAPHS)}, got {g!r}")
    device = torch.device("cpu")
    masks = [parse_mask(m) for m in (args.masks or ["sliding_window(256)",
                                                     "longformer(256,g16)"])]
    dtypes = args.dtypes or ["float32", "bfloat16"]
    modes = args.modes or ["fwd", "fwdbwd"]
    heads, dim = args.heads or 1, args.dim or 64
    budget = (args.budget_gb or 20.0) * 1e9
    isolate = args.isolate or "fork"
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    meta = environment(device, ["longest", *argv])
    meta.update(heads=heads,
                dim=dim, budget=budget, resolution=args.resolution, isolate=isolate,
                method="doubling then bisection; each trial in a fresh forked process with "
                       "RLIMIT_AS = its address space after imports + the budget")
    name = args.name or "longest_graphs"
    out_json = args.out / device_slug(device) / f"{name}.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    results, same = [], []

    def save():
        data = {"meta": meta, "results": results, "same_n": same}
        out_json.write_text(json.dumps(data, indent=1))
        out_json.with_suffix(".md").write_text(graph_markdown(data))
        return data

    for spec in masks:
        deg = spec.expected_edges(1 << 20) / float(1 << 20)
        for dtype in dtypes:
            for mode in modes:
                floor_tok = floor_bytes(1, heads, dim, parse_dtype(dtype), mode)
                found = {}
                for graph in args.graphs:
                    per_token = floor_tok * 1.1 + {"implicit": 0, "int64": 40,
                                                   "int32": 28}[graph] * deg
                    guess = budget / per_token
                    start = 1 << max(10, int(guess / 1.6).bit_length() - 1)
                    base = dict(kind="graph", mask=spec.label, heads=heads, dim=dim,
                                dtype=dtype, peer=f"attngraph-{graph}", graph=graph,
                                modes=[mode], device="cpu", budget=budget,
                                threads=args.threads)
                    if log:
                        log(f"{spec.label} {dtype} {mode} {graph}: from N={start:,}")
                    r = search(base, start_n=start, max_n=(args.max_n or [1 << 31])[0],
                               resolution=args.resolution, round_to=1 << 12,
                               isolate=isolate, timeout=args.timeout or 3600.0,
                               max_trials=args.max_trials, log=log)
                    r.update(mask=spec.label, dtype=dtype, graph=graph)
                    results.append(r)
                    found[graph] = r
                    save()
                # implicit and explicit at the explicit graph's largest N, two calls each
                ex = found.get("int64")
                if "implicit" in found and ex and ex.get("max_n"):
                    for graph in ("int64", "implicit"):
                        job = dict(kind="graph", mask=spec.label, heads=heads, dim=dim,
                                   dtype=dtype, peer=f"attngraph-{graph}", graph=graph,
                                   modes=[mode], device="cpu", budget=budget, n=ex["max_n"],
                                   threads=args.threads, repeats=2)
                        m = run_isolated(job, isolate, args.timeout or 3600.0)
                        m = m.get("modes", {}).get(mode, {})
                        if m.get("times_s"):
                            same.append(dict(mask=spec.label, dtype=dtype, mode=mode,
                                             n=ex["max_n"], graph=graph,
                                             first_s=m["times_s"][0], time_s=m["times_s"][-1],
                                             peak_bytes=m.get("peak_bytes")))
                            if log:
                                log(f"  same N={ex['max_n']:,} {graph}: "
                                    f"{m['times_s'][0]:.2f} s, {m['times_s'][-1]:.2f} s")
                    save()
    data = save()
    if not args.quiet:
        print(graph_markdown(data))
        print(out_json)
    return 0


def run_longest(argv: List[str]) -> int:
    import torch

    from benchmarks.harness import device_slug, environment
    from benchmarks.longest import ceiling, markdown, memory_model, search
    from benchmarks.presets import LONGEST
    from benchmarks.specs import parse_dtype, parse_mask

    args = longest_parser().parse_args(argv)
    if args.graphs:
        return run_graph_longest(args, argv)
    device = _device(args.device)
    d = LONGEST["gpu" if device.type == "cuda" else "cpu"]
    spec = parse_mask(args.mask or d["mask"])
    dtype = args.dtype or d["dtype"]
    heads, dim = args.heads or d["heads"], args.dim or d["dim"]
    peers = args.peers or d["peers"]
    modes = args.modes or d["modes"]
    isolate = args.isolate or ("none" if device.type == "cuda" else "fork")
    if device.type == "cpu" and isolate == "none":
        raise SystemExit("longest on CPU needs a process per trial (--isolate fork or spawn): "
                         "its memory limit is RLIMIT_AS of that process")
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        budget = args.budget_gb * 1e9 if args.budget_gb else total
        fraction = min(1.0, budget / total)
        method = ("doubling then bisection; a trial fails on torch.cuda.OutOfMemoryError"
                  + (f" (allocator capped at {fraction:.3f} of the device)" if fraction < 1
                     else ""))
    else:
        budget = (args.budget_gb or d.get("budget_gb", 2.0)) * 1e9
        fraction = None
        method = ("doubling then bisection; each trial in a fresh forked process with "
                  "RLIMIT_AS = its address space after imports + the budget (graph, inputs "
                  "and the peer's work must fit)")
    start = (args.start_n or [d["start_n"]])[0]
    max_n = (args.max_n or [1 << 31])[0]
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    meta = environment(device, ["longest", *argv])
    meta.update(mask=spec.label, dtype=dtype, heads=heads, dim=dim, budget=budget,
                method=method, resolution=args.resolution, isolate=isolate)
    name = args.name or f"longest_{spec.kind}_{'_'.join(map(str, spec.args))}_{dtype}"
    out_json = args.out / device_slug(device) / f"{name}.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for peer in peers:
        for mode in modes:
            base = dict(mask=spec.label, heads=heads, dim=dim, dtype=dtype, peer=peer,
                        modes=[mode], device=str(device), budget=budget,
                        rlimit=device.type == "cpu" and isolate != "none",
                        cuda_budget_fraction=fraction,
                        threads=args.threads)
            if log:
                log(f"{peer} {mode}: searching from N={start:,}")
            r = search(base, start_n=start, max_n=max_n, resolution=args.resolution,
                       round_to=max(1024, spec.valid_n(1024)), isolate=isolate,
                       timeout=args.timeout or 1800.0, max_trials=args.max_trials, log=log)
            model = memory_model(spec, parse_dtype(dtype), heads, dim, mode, peer)
            r["model"] = model
            r["model_ceiling"] = ceiling(model, budget)
            results.append(r)
            out_json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    data = {"meta": meta, "results": results}
    out_json.write_text(json.dumps(data, indent=1))
    md = out_json.with_suffix(".md")
    md.write_text(markdown(data))
    if not args.quiet:
        print(md.read_text())
        print(out_json)
    return 0


def run_report(argv: List[str]) -> int:
    from benchmarks.report import write_report

    p = argparse.ArgumentParser(prog="python -m benchmarks report",
                                description="Rewrite the markdown and plots of results JSON "
                                            "files, or merge several runs into one.")
    p.add_argument("json", type=Path, nargs="+")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--merge", type=Path, metavar="OUT.json",
                   help="merge the records of all given files into OUT.json (later files "
                        "replace earlier records of the same mask, N, H, D, dtype, peer) and "
                        "report that")
    args = p.parse_args(argv)
    if args.merge:
        from benchmarks.harness import write_json

        metas, merged = [], {}
        for path in args.json:
            data = json.loads(path.read_text())
            metas.append(data["meta"])
            for r in data["records"]:
                merged[(r["mask"], r["n"], r["heads"], r["dim"], r["dtype"], r["peer"])] = r
        meta = dict(metas[0], name=args.merge.stem,
                    command=" ; ".join(m.get("command", "") for m in metas),
                    elapsed=sum(m.get("elapsed") or 0 for m in metas))
        write_json(args.merge, meta, list(merged.values()))
        args.json = [args.merge]
    for path in args.json:
        for w in write_report(path, with_plots=not args.no_plots):
            print(w)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "longest":
        return run_longest(argv[1:])
    if argv and argv[0] == "report":
        return run_report(argv[1:])
    return run_sweep(argv)


if __name__ == "__main__":
    sys.exit(main())
