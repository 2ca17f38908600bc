"""Markdown tables and PNG plots from a results JSON (``python -m benchmarks report FILE``)."""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from benchmarks.specs import human_bytes

__all__ = ["write_report", "markdown", "plots", "ratios", "extrapolate"]

MODES = ("fwd", "fwdbwd")
# Peers whose time and memory are affine in E (per-edge gathers), so a line through their
# measured points predicts them where they were over the budget. Dense SDPA grows with N^2
# and flex with the number of blocks: never extrapolated.
LINEAR_IN_E = ("pyg",)
MODE_LABEL = {"fwd": "fwd", "fwdbwd": "fwd+bwd"}
BASE = "attngraph"


def _key(r: Dict) -> Tuple:
    return (r["mask"], r["heads"], r["dim"], r["dtype"])


def _ok(r: Optional[Dict], mode: str) -> Optional[Dict]:
    if r is None:
        return None
    m = r.get("modes", {}).get(mode)
    return m if m and m.get("status") == "ok" else None


def _fmt_ms(s: Optional[float]) -> str:
    if s is None:
        return "-"
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 1000 else f"{ms:,.0f}"


def _fmt_num(x: Optional[float], digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}"


def _cell_status(r: Dict, mode: str) -> str:
    if r.get("status") not in (None, "ok"):
        return r["status"]
    m = r.get("modes", {}).get(mode)
    if m is None:
        return "-"
    return m.get("status", "?")


def _n_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else f"{n:,}"


def _index(records: List[Dict]) -> "OrderedDict":
    groups: "OrderedDict" = OrderedDict()
    for r in records:
        groups.setdefault(_key(r), OrderedDict()).setdefault(r["n"], OrderedDict())[r["peer"]] = r
    return groups


def _edges(by_peer: Dict) -> Optional[int]:
    for r in by_peer.values():
        if r.get("num_edges"):
            return r["num_edges"]
    return None


# ---------------------------------------------------------------------- extrapolation
def extrapolate(records: List[Dict], peer: str, mode: str, key: Tuple
                ) -> Optional[Tuple[Tuple[float, float], Tuple[float, float], int]]:
    """Least-squares lines ``value = a + b * E`` through a peer's measured points
    (time, then peak bytes) for one (mask, H, D, dtype): ``((a_t, b_t), (a_m, b_m), points)``,
    or None with fewer than two points. The PyG way's memory is affine in E by construction
    ([E, H, D] gathers), so this predicts it where it does not fit the budget."""
    pts = [(r["num_edges"], _ok(r, mode)) for r in records
           if r["peer"] == peer and _key(r) == key and _ok(r, mode) and r.get("num_edges")]
    if len(pts) < 2:
        return None

    def fit(ys):
        xs = [p[0] for p in pts]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
        return my - b * mx, b

    return (fit([p[1]["median_s"] for p in pts]), fit([p[1]["peak_bytes"] for p in pts]),
            len(pts))


def ratios(records: List[Dict], base_peer: str = BASE) -> List[Dict]:
    """``base_peer`` ÷ peer for time and peak memory, per configuration, peer and mode.

    Where a peer was over the budget and at least two of its points were measured, the
    ratio uses its extrapolated value (``extrapolated=True``)."""
    out = []
    for key, by_n in _index(records).items():
        for n, by_peer in by_n.items():
            base = by_peer.get(base_peer)
            if base is None:
                continue
            for peer, r in by_peer.items():
                if peer == base_peer:
                    continue
                row = {"mask": key[0], "heads": key[1], "dim": key[2], "dtype": key[3],
                       "n": n, "num_edges": _edges(by_peer), "peer": peer}
                for mode in MODES:
                    b, p = _ok(base, mode), _ok(r, mode)
                    if b is None:
                        continue
                    if p is not None:
                        row[mode] = {"time": b["median_s"] / p["median_s"],
                                     "mem": (b["peak_bytes"] / p["peak_bytes"]
                                             if p.get("peak_bytes") else None),
                                     "extrapolated": False,
                                     "check": p.get("check", {}).get("passed")}
                    elif (_cell_status(r, mode) == "over budget" and row["num_edges"]
                          and peer in LINEAR_IN_E):
                        fit = extrapolate(records, peer, mode, key)
                        if fit is None:
                            continue
                        (at, bt), (am, bm), npts = fit
                        e = row["num_edges"]
                        row[mode] = {"time": b["median_s"] / max(at + bt * e, 1e-12),
                                     "mem": b["peak_bytes"] / max(am + bm * e, 1.0),
                                     "extrapolated": True, "points": npts,
                                     "peer_time_s": at + bt * e, "peer_peak_bytes": am + bm * e}
                if any(m in row for m in MODES):
                    out.append(row)
    return out


# ---------------------------------------------------------------------- markdown
def markdown(data: Dict, *, title: Optional[str] = None) -> str:
    meta, records = data["meta"], data["records"]
    lines = [f"# {title or meta.get('name', 'benchmark')}", ""]
    if meta.get("about"):
        lines += [meta["about"], ""]
    lines += [
        f"- device: `{meta.get('device')}` — {meta.get('device_name')}; "
        f"{meta.get('cpu_count')} CPUs ({meta.get('cpu_affinity')} usable), "
        f"{meta.get('threads', meta.get('torch_threads'))} torch threads"
        + (f", host memory {human_bytes(meta['host_memory_bytes'])}"
           if meta.get("host_memory_bytes") else ""),
        f"- versions: torch {meta.get('torch')}, torch_geometric {meta.get('torch_geometric')}, "
        f"cupy {meta.get('cupy')}, torch_scatter {meta.get('torch_scatter')}, "
        f"attngraph {meta.get('attngraph')} (sources sha1 "
        f"{meta.get('attngraph_source_sha1', '?')}), Python {meta.get('python')}",
        f"- command: `{meta.get('command')}`  ({meta.get('date_utc')} UTC"
        + (f", {meta['elapsed']:.0f} s" if meta.get("elapsed") else "") + ")",
        f"- time: median of up to {meta.get('repeats')} runs after {meta.get('warmup')} "
        f"warm-up ({'CUDA events' if meta.get('device', '').startswith('cuda') else 'wall clock'}"
        f"); peak memory: {meta.get('memory_method', '')}, above the inputs (setup such as "
        f"a dense mask or a BlockMask included); budget {human_bytes(meta.get('budget'))}",
        f"- FLOP/s = 4·E·H·D (fwd), ×3.5 (fwd+bwd) per second; GB/s = minimum traffic "
        f"(Q, K, V, O, lse once + 8 B/edge fwd; bwd adds Q, K, V, O, dO, dQ, dK, dV, lse + "
        f"16 B/edge) per second",
        f"- check: max |peer − float64 reference| / max(1, max|ref|) on "
        f"{meta.get('check_rows')} sampled query rows (output, and dQ in fwd+bwd) within "
        f"1e-4 (fp32), 1e-2 (fp16), 5e-2 (bf16); ×4 for dQ",
        "",
    ]
    if meta.get("note"):
        lines += [meta["note"], ""]
    cuda = str(meta.get("device", "")).startswith("cuda")
    unit, scale = ("TFLOP/s", 1.0) if cuda else ("GFLOP/s", 1e3)
    for key, by_n in _index(records).items():
        mask, H, D, dtype = key
        lines += [f"## {mask} · H={H} · D={D} · {dtype}", "",
                  f"| N | E | density | peer | fwd ms | fwd peak | fwd {unit} | fwd GB/s "
                  f"| fwd+bwd ms | fwd+bwd peak | fwd+bwd {unit} | fwd+bwd GB/s | check |",
                  "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        notes: "OrderedDict" = OrderedDict()
        for n, by_peer in by_n.items():
            e = _edges(by_peer)
            dens = e / n / n if e else None
            for peer, r in by_peer.items():
                cells = [_n_label(n), f"{e:,}" if e else "-", _fmt_num(dens), peer]
                checks = []
                for mode in MODES:
                    m = _ok(r, mode)
                    if m is None:
                        st = _cell_status(r, mode)
                        cells += [st, "", "", ""] if st != "-" else ["-", "", "", ""]
                        reason = (r.get("modes", {}).get(mode, {}) or {}).get("reason") \
                            or r.get("reason")
                        if st not in ("-", "ok") and reason:
                            notes.setdefault((peer, st, reason), OrderedDict()).setdefault(
                                MODE_LABEL[mode], []).append(_n_label(n))
                        continue
                    tf = m.get("tflops")
                    cells += [_fmt_ms(m["median_s"]), human_bytes(m.get("peak_bytes")),
                              _fmt_num(None if tf is None else tf * scale), _fmt_num(m.get("gbps"))]
                    c = m.get("check")
                    if c:
                        checks.append(("pass" if c["passed"] else "**FAIL**")
                                      + f" {c['out_err']:.1e}")
                cells.append(checks[0] if checks and all(
                    x.startswith("pass") for x in checks) else "; ".join(checks) or "-")
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        # one line per distinct reason keeps long sweeps readable
        for (peer, st, reason), by_mode in notes.items():
            where = "; ".join(f"{m} N={', '.join(dict.fromkeys(ns))}" for m, ns in by_mode.items())
            lines.append(f"- {peer} ({where}): {st} — {reason}")
        if notes:
            lines.append("")
    base = meta.get("base_peer", BASE)
    rat = ratios(records, base)
    if rat:
        lines += [f"## {base} ÷ peer", "",
                  f"Time and peak memory of {base} divided by the peer's (below 1: {base} "
                  "is faster / needs less). `~` marks a ratio whose peer value is extrapolated "
                  "linearly in E from the peer's measured points of the same mask (only the "
                  "PyG way, whose memory and time are affine in E) because the run itself was "
                  "over the budget.", "",
                  "| mask | N | E | peer | fwd time | fwd+bwd time | fwd mem | fwd+bwd mem |",
                  "|---|---:|---:|---|---:|---:|---:|---:|"]
        for row in rat:
            cells = [row["mask"], _n_label(row["n"]),
                     f"{row['num_edges']:,}" if row["num_edges"] else "-", row["peer"]]
            for what in ("time", "mem"):
                for mode in MODES:
                    m = row.get(mode)
                    if not m or m.get(what) is None:
                        cells.append("-")
                        continue
                    cells.append(("~" if m["extrapolated"] else "") + f"{m[what]:.3g}")
            # columns are fwd time, fwd+bwd time, fwd mem, fwd+bwd mem
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------- plots
def plots(data: Dict, stem: Path) -> List[Path]:
    """``<stem>_time_vs_n.png``, ``<stem>_memory_vs_n.png``, ``<stem>_speedup_vs_density.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = data["records"]
    keys = list(_index(records))
    masks = list(OrderedDict.fromkeys(k[0] for k in keys))
    peers = list(OrderedDict.fromkeys(r["peer"] for r in records))
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(peers)}
    multi = len({k[1:] for k in keys}) > 1
    written = []

    for what, fname, ylabel in (("median_s", "time_vs_n", "time [s]"),
                                ("peak_bytes", "memory_vs_n", "peak memory [GB]")):
        fig, axes = plt.subplots(len(MODES), max(1, len(masks)), squeeze=False,
                                 figsize=(3.2 * max(1, len(masks)) + 0.6, 5.2), sharex="col")
        any_line = False
        for col, mask in enumerate(masks):
            for row, mode in enumerate(MODES):
                ax = axes[row][col]
                for key in keys:
                    if key[0] != mask:
                        continue
                    for peer in peers:
                        pts = sorted((r["n"], _ok(r, mode)[what]) for r in records
                                     if _key(r) == key and r["peer"] == peer and _ok(r, mode)
                                     and _ok(r, mode).get(what))
                        if not pts:
                            continue
                        any_line = True
                        ys = [p[1] / (1e9 if what == "peak_bytes" else 1) for p in pts]
                        label = peer + (f" D={key[2]} {key[3]}" if multi else "")
                        ax.plot([p[0] for p in pts], ys, "o-", ms=3, lw=1.2,
                                color=colors[peer], label=label)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.grid(True, which="both", lw=0.3, alpha=0.5)
                ax.tick_params(labelsize=7)
                if row == 0:
                    ax.set_title(mask, fontsize=8)
                if row == len(MODES) - 1:
                    ax.set_xlabel("N (tokens)", fontsize=8)
                if col == 0:
                    ax.set_ylabel(f"{MODE_LABEL[mode]} {ylabel}", fontsize=8)
        if any_line:
            handles, labels = OrderedDict(), None
            for ax in axes.flat:
                for h, lab in zip(*ax.get_legend_handles_labels()):
                    handles.setdefault(lab, h)
            fig.legend(list(handles.values()), list(handles), loc="lower center",
                       ncol=min(6, len(handles)), fontsize=7, frameon=False)
            fig.tight_layout(rect=(0, 0.07, 1, 1))
            path = Path(f"{stem}_{fname}.png")
            fig.savefig(path, dpi=72)
            written.append(path)
        plt.close(fig)

    base = data["meta"].get("base_peer", BASE)
    rat = ratios(records, base)
    dens = {}
    for r in records:
        if r.get("num_edges"):
            dens[(r["mask"], r["n"])] = r["num_edges"] / r["n"] / r["n"]
    fig, axes = plt.subplots(1, len(MODES), squeeze=False, figsize=(8, 3.4), sharey=True)
    any_pt = False
    markers = "osD^v<>"
    for col, mode in enumerate(MODES):
        ax = axes[0][col]
        for i, peer in enumerate(p for p in peers if p != base):
            pts = [(dens.get((row["mask"], row["n"])), 1.0 / row[mode]["time"])
                   for row in rat if row["peer"] == peer and row.get(mode)
                   and not row[mode]["extrapolated"] and row[mode].get("time")]
            pts = [p for p in pts if p[0]]
            if not pts:
                continue
            any_pt = True
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, color=colors[peer],
                       marker=markers[i % len(markers)], label=peer)
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="both", lw=0.3, alpha=0.5)
        ax.tick_params(labelsize=7)
        ax.set_title(f"{MODE_LABEL[mode]}: speedup of attngraph over peer", fontsize=8)
        ax.set_xlabel("mask density E / N²", fontsize=8)
        if col == 0:
            ax.set_ylabel("peer time ÷ attngraph time", fontsize=8)
    if any_pt:
        axes[0][0].legend(fontsize=7, frameon=False)
        fig.tight_layout()
        path = Path(f"{stem}_speedup_vs_density.png")
        fig.savefig(path, dpi=72)
        written.append(path)
    plt.close(fig)
    return written


def write_report(json_path: Path, *, with_plots: bool = True) -> List[Path]:
    """Write ``<name>.md`` (and the PNGs) next to ``<name>.json``; returns the paths."""
    json_path = Path(json_path)
    data = json.loads(json_path.read_text())
    md = json_path.with_suffix(".md")
    md.write_text(markdown(data))
    written = [md]
    if with_plots:
        try:
            written += plots(data, json_path.with_suffix(""))
        except ImportError:  # matplotlib is an optional extra
            pass
    return written
