"""benchmarks/gpu_check.sh (the one command for a lent GPU) parses, runs every step even when
some fail, and its sanitizer case runs here on the CPU."""
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

# Stand-ins for python3 and compute-sanitizer: every step "runs" in milliseconds; the
# benchmark fails, so the steps after it must still run and the summary must say so.
FAKE_PYTHON = r"""#!/usr/bin/env bash
case "$1 ${2:-}" in
  "-m pytest") echo "3 passed, 10 deselected in 0.1s" ;;
  "-m benchmarks") echo "benchmark failed"; exit 3 ;;
  "- "*) cat >/dev/null; echo "no benchmark results"; exit 1 ;;
  "benchmarks/gpu_sanitize_case.py "*) echo "gpu_sanitize_case: all finite" ;;
  *) echo "torch 0 cuda 0 device fake" ;;
esac
"""
FAKE_SANITIZER = r"""#!/usr/bin/env bash
while [[ $1 == --* ]]; do shift 2; done
"$@"
echo "========= ERROR SUMMARY: 0 errors"
"""


def test_script_parses_and_is_executable():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert SCRIPT.stat().st_mode & stat.S_IXUSR


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_script_passes_shellcheck():
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_every_step_runs_and_is_summarised(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python3", FAKE_PYTHON), ("compute-sanitizer", FAKE_SANITIZER)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               PYTHON=str(bin_dir / "python3"), OUT=str(out))
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr   # the benchmark step failed
    lines = (out / "summary.txt").read_text().splitlines()
    table = lines[[line.split()[:1] for line in lines].index(["step"]) + 1:]
    rows = {line.split()[0]: line for line in table}
    assert list(rows) == ["env", "pytest-gpu", "sanitizer-memcheck", "sanitizer-racecheck",
                          "sanitizer-initcheck", "sanitizer-synccheck", "bench-gpu",
                          "bench-vs-model", "nvrtc-gate"]
    assert "PASS" in rows["pytest-gpu"] and "3 passed, 10 deselected" in rows["pytest-gpu"]
    assert all("PASS" in rows[f"sanitizer-{t}"] and "ERROR SUMMARY: 0 errors" in rows[f"sanitizer-{t}"]
               for t in ("memcheck", "racecheck", "initcheck", "synccheck"))
    assert "FAIL(rc=3)" in rows["bench-gpu"]
    assert "FAIL(rc=1)" in rows["bench-vs-model"] and "no benchmark results" in rows["bench-vs-model"]
    assert (out / "pytest-gpu.log").is_file() and (out / "sanitizer-racecheck.log").is_file()


def test_steps_past_the_budget_are_skipped(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(FAKE_PYTHON.replace('"-m pytest") echo', '"-m pytest") sleep 3; echo'))
    (bin_dir / "python3").chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               PYTHON=str(bin_dir / "python3"), OUT=str(out), BUDGET_S="18")
    subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True,
                   timeout=120)
    summary = (out / "summary.txt").read_text()
    assert "SKIPPED" in summary and "no time left in the 18 s budget" in summary


def test_sanitizer_case_runs_on_cpu(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.gpu_sanitize_case import main

    assert main(["--device", "cpu", "--n", "96", "--window", "8", "--dim", "32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and all(line.endswith("ok") for line in lines[:4])
    assert {line.split()[1] for line in lines[:4]} == {"float32", "bfloat16"}
    assert lines[-1] == "gpu_sanitize_case: all finite"


def test_sanitizer_case_refuses_cuda_without_a_device(monkeypatch):
    import torch

    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.gpu_sanitize_case import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--device", "cuda"]) == 2
