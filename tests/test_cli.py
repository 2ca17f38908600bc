"""The `attngraph` command line: demo, show (options derived from the mask generators),
bench forwarding, and argparse-style errors."""
import io
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")

import matplotlib.image as mpimg  # noqa: E402

import attngraph as ag  # noqa: E402
from attngraph import cli  # noqa: E402

MASK_NAMES = [name for name in ag.masks.__all__ if name not in cli._NOT_MASKS]

# Arguments that make each generator small; masks not listed here take their CLI defaults.
SHOW_ARGS = {
    "global_tokens": ["--global-indices", "0,20"],
    "longformer": ["--window", "4", "--global-indices", "0,20"],
    "document": ["--lengths", "10,20,18"],
    "block_sparse": ["--layout", "110,011,001", "--block", "8"],
    "bigbird": ["--block", "8"],
    "fixed": ["--block", "8"],
    "hash_buckets": ["--buckets", "4", "--seed", "3"],
    "qk_drop": ["--keep-fraction", "0.7"],
    "prefix_lm": ["--prefix", "12"],
    "neighborhood": ["--shape", "12,10", "--kernel", "5,3", "--dilation", "2"],
    "from_ranges": ["--q-ranges", "0:16,16:48,8:30", "--k-ranges", "0:16,0:48,30:40",
                    "--kinds", "full,causal,full"],
}
# Masks whose token count comes from their other parameters, not --n.
NO_N = ("document", "block_sparse", "neighborhood")


def assert_png_drawn(path):
    img = mpimg.imread(str(path))[..., :3]
    assert img.std() > 0.05
    assert (img < 0.9).any(-1).mean() > 0.02


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "attngraph.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------------------- show
@pytest.mark.parametrize("mask", MASK_NAMES)
def test_show_every_mask(mask, tmp_path, capsys):
    out = tmp_path / f"{mask}.png"
    n = [] if mask in NO_N else ["--n", "48"]
    assert cli.main(["show", mask, *n, *SHOW_ARGS.get(mask, []), "--dpi", "60",
                     "--out", str(out)]) == 0
    assert "TokenGraph(" in capsys.readouterr().out
    assert_png_drawn(out)


def test_show_arcs_and_sorted_buckets(tmp_path):
    arcs = tmp_path / "arcs.png"
    assert cli.main(["show", "sliding_window", "--n", "16", "--window", "2", "--causal",
                     "--style", "arcs", "--out", str(arcs)]) == 0
    assert_png_drawn(arcs)
    sorted_png = tmp_path / "sub" / "hb.png"  # missing folders are created
    assert cli.main(["show", "hash_buckets", "--n", "64", "--buckets", "4",
                     "--sort-by-bucket", "--out", str(sorted_png)]) == 0
    assert_png_drawn(sorted_png)


@pytest.mark.parametrize("tiles", [[], ["64"]], ids=["cost-chosen", "block-64"])
def test_show_tiles(tiles, tmp_path, capsys):
    png = tmp_path / "tiles.png"
    assert cli.main(["show", "longformer", "--n", "1024", "--window", "32",
                     "--global-indices", "0,500", "--tiles", *tiles, "--out", str(png)]) == 0
    assert_png_drawn(png)


def test_show_implicit(tmp_path, capsys, monkeypatch):
    """A window over 2M tokens drawn from its rule: the edge list (260M edges) is never
    built."""
    from attngraph.implicit import ImplicitGraph

    def forbidden(self, *args):
        raise AssertionError("the edge list was built")

    monkeypatch.setattr(ImplicitGraph, "materialize", forbidden)
    png = tmp_path / "implicit.png"
    assert cli.main(["show", "sliding_window", "--n", "2000000", "--window", "64",
                     "--implicit", "--out", str(png)]) == 0
    assert "implicit" in capsys.readouterr().out
    assert_png_drawn(png)


def test_sort_by_bucket_permutes_into_blocks():
    import torch

    buckets = torch.tensor([1, 0, 1, 0, 2])
    g = ag.masks.hash_buckets(buckets)
    s = cli._sort_by_bucket(g, buckets)
    # new order: tokens 1, 3 (bucket 0), 0, 2 (bucket 1), 4 (bucket 2); causal inside
    expected = torch.tensor([[1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [0, 0, 1, 0, 0],
                             [0, 0, 1, 1, 0],
                             [0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(s.to_dense(), expected)


def test_show_new_masks_options_reach_the_generators(tmp_path, capsys):
    """--shape / --kernel (one for all axes or one per axis), --q-ranges / --k-ranges /
    --kinds (one kind for all) and --n as num_nodes reach the generators."""
    png = tmp_path / "m.png"
    cli.main(["show", "neighborhood", "--shape", "6,5", "--kernel", "3", "--causal",
              "--out", str(png)])
    want = ag.masks.neighborhood((6, 5), 3, causal=True)
    assert f"num_edges={want.num_edges}," in capsys.readouterr().out
    cli.main(["show", "from_ranges", "--n", "20", "--q-ranges", "0:20,0:20", "--k-ranges",
              "0:20,0:7", "--kinds", "causal,full", "--implicit", "--out", str(png)])
    out = capsys.readouterr().out
    assert f"num_edges={ag.masks.prefix_lm(20, 7).num_edges}," in out and "implicit" in out
    cli.main(["show", "from_ranges", "--n", "20", "--q-ranges", "0:10,10:20", "--k-ranges",
              "0:10,10:20", "--kinds", "causal", "--out", str(png)])
    assert "num_edges=110," in capsys.readouterr().out


def test_show_subprocess(tmp_path):
    out = tmp_path / "window.png"
    r = run_cli("show", "sliding_window", "--n", "100", "--window", "5", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stdout
    assert_png_drawn(out)


@pytest.mark.parametrize("args, message", [
    (["show", "slidng_window"], "unknown mask 'slidng_window'; did you mean 'sliding_window'"),
    (["show", "nope"], "unknown mask 'nope'"),
    (["show", "causal", "--window", "3"], "mask 'causal' does not take --window"),
    (["show", "document", "--n", "9", "--lengths", "4,5"], "does not take --n"),
    (["show", "global_tokens"], "needs --global-indices"),
    (["show", "longformer", "--window", "-1"], "window must be >= 0"),
    (["show", "longformer", "--global-indices", "0,x"], "comma-separated integers"),
    (["show", "qk_drop", "--keep-fraction", "2"], "fraction in [0, 1]"),
    (["show", "sliding_window", "--sort-by-bucket"], "--sort-by-bucket applies"),
    (["show", "sliding_window", "--n", "100", "--style", "arcs"], "use attngraph.viz.plot_mask"),
    (["show", "causal", "--bogus", "1"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["show", "neighborhood", "--kernel", "4"], "kernel must be odd"),
    (["show", "neighborhood", "--shape", "8,8", "--kernel", "3,3,3"], "one per axis"),
    (["show", "from_ranges", "--q-ranges", "0:4", "--k-ranges", "0:4"], "needs --kinds"),
    (["show", "from_ranges", "--q-ranges", "0-4", "--k-ranges", "0:4", "--kinds", "full"],
     "start:end ranges"),
    (["show", "from_ranges", "--n", "8", "--q-ranges", "0:4", "--k-ranges", "0:4",
      "--kinds", "diagonal"], "not a known kind"),
    (["show", "prefix_lm", "--n", "8", "--prefix", "9"], "prefix must be <= 8"),
], ids=["typo", "unknown-mask", "parameter-not-taken", "n-not-taken", "missing-parameter",
        "invalid-value", "bad-list", "bad-fraction", "sort-needs-buckets", "too-large-for-arcs",
        "unknown-option", "unknown-command", "even-kernel", "kernel-rank", "missing-kinds",
        "bad-range", "unknown-kind", "prefix-too-long"])
def test_errors_exit_nonzero_with_a_message(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*args, "--out", str(tmp_path / "x.png")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "usage: attngraph" in err
    assert not (tmp_path / "x.png").exists()


def test_show_help_lists_masks_and_parameters(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["show", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in MASK_NAMES:
        assert f"\n  {name}\n" in out
    for flag in ("--window", "--dilation", "--block", "--global-indices", "--per-row",
                 "--seed", "--causal", "--lengths", "--buckets", "--keep-fraction"):
        assert flag in out
    assert "--window INT [16]" in out  # defaults shown per mask


def test_help_tracks_generator_signatures(monkeypatch):
    """A new generator shows up with options derived from its signature."""
    def shifted_window(n: int, window: int, shift: int = 2, *, wrap: bool = False):
        """Window shifted by ``shift``."""
        return ag.masks.sliding_window(n, window)

    monkeypatch.setattr(ag.masks, "shifted_window", shifted_window, raising=False)
    monkeypatch.setattr(ag.masks, "__all__", [*ag.masks.__all__, "shifted_window"])
    masks = cli._masks()
    assert "shifted_window" in masks and "batch" not in masks
    assert cli._usage_of(masks["shifted_window"]) == (
        "--n N [512] --window INT [16] --shift INT [2] --wrap/--no-wrap [off]")
    assert "Window shifted by shift." in cli._masks_epilog(masks)


def test_top_level_help_lists_commands_and_masks(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for word in ("demo", "show", "bench", "longformer", "hash_buckets"):
        assert word in out


# ---------------------------------------------------------------------------- bench
def test_bench_forwards_argv(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_bench_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(
        "import sys, pathlib\n"
        f"pathlib.Path({str(tmp_path / 'argv.txt')!r}).write_text(' '.join(sys.argv[1:]))\n"
        "sys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli._bench(["--preset", "cpu"], module="fake_bench_pkg") == 3
    assert (tmp_path / "argv.txt").read_text() == "--preset cpu"


def test_bench_without_harness(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli._bench([], module="attngraph_no_such_benchmarks") == 2
    assert "source checkout" in capsys.readouterr().err


# ---------------------------------------------------------------------------- demo
def test_demo_in_process(tmp_path, capsys):
    import re

    from attngraph.ops.record import recording

    out = tmp_path / "demo"
    with recording() as ran:
        assert cli.main(["demo", "--n", "256", "--window", "8", "--global-tokens", "4",
                         "--heads", "2", "--dim", "16", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    # the backend the demo names is the one that ran its graph_attention calls: one
    # warm-up call and the 3 timed runs of its median
    assert len(ran) == 4 and len(set(ran)) == 1
    assert f"backend: {ran[0]} (ran 4 calls, chosen by backend='auto')" in text
    row = next(line for line in text.splitlines() if line.startswith("graph_attention "))
    assert row.split()[1] == ran[0]
    assert re.search(r"ms \(3 runs\)|s \(3 runs\)", row)
    dense = next(line for line in text.splitlines() if line.startswith("dense masked SDPA "))
    assert int(re.search(r"\((\d+) runs\)", dense).group(1)) >= 3
    assert "median of runs, after 1 warm-up" in text
    assert "global tokens evenly spaced every 64 tokens (0, 64, 128, 192)" in text
    assert "(ok," in text
    for name in ("mask.png", "attention.png"):
        assert_png_drawn(out / name)
        assert f"wrote {out / name}" in text


def test_demo_takes_at_least_three_runs(capsys):
    assert cli.main(["demo", "--n", "64", "--runs", "2", "--no-dense"]) == 2
    assert "--runs must be >= 3" in capsys.readouterr().err


def test_demo_rejects_bad_sizes(capsys):
    assert cli.main(["demo", "--n", "0", "--no-dense"]) == 2
    assert "--n must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_subprocess(tmp_path):
    out = tmp_path / "demo"
    r = run_cli("demo", "--n", "1024", "--runs", "3", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    header = next(line for line in r.stdout.splitlines() if line.startswith("method"))
    for column in ("backend", "device", "N", "edges", "density", "time", "peak memory",
                   "max error"):
        assert column in header
    assert "graph_attention" in r.stdout and "cpu" in r.stdout
    assert (out / "mask.png").stat().st_size > 1000
    assert_png_drawn(out / "attention.png")
