"""bench/gpu_check.sh on a machine without a GPU: one clear message, exit status 2, nothing run.

The GPU is hidden with `CUDA_VISIBLE_DEVICES=""`, so this takes the same path on a machine that
has one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.sh"


def run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    logs = tmp_path / "logs"
    full = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "GPU_PY": sys.executable, "GPU_CHECK_LOGS": str(logs), **env}
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=full, timeout=120)


def test_without_a_gpu_it_says_so_and_exits_2_having_run_nothing(tmp_path):
    p = run(tmp_path)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "gpu_check: no CUDA GPU: torch" in p.stderr
    assert "sees no CUDA device" in p.stderr
    assert "Nothing was run." in p.stderr
    assert "GPU_PY" in p.stderr  # says how to point it at a CUDA Python
    assert "[gpu-tests]" not in p.stdout and "summary" not in p.stdout
    assert not (tmp_path / "logs").exists()


def test_a_missing_python_is_named(tmp_path):
    p = run(tmp_path, GPU_PY=str(tmp_path / "no-such-python"))
    assert p.returncode == 2
    assert f"`{tmp_path / 'no-such-python'}` does not exist" in p.stderr


FAKE_PY = """#!/usr/bin/env bash
# a stand-in Python: reports a GPU, passes the tests, fails the learner benchmark, has no vLLM
case "$1" in
  -) cat >/dev/null; echo "Fake GPU, torch 0, CUDA 0";;
  -m) echo "3 passed in 1.0s";;
  bench/learner_gpu.py) echo "out of memory" >&2; exit 3;;
  -c) exit 1;;
esac
"""


def test_with_a_gpu_it_runs_each_part_and_sums_up(tmp_path):
    """The driver's bookkeeping, with a stand-in Python (the parts themselves need a GPU)."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PY)
    fake.chmod(0o755)
    p = run(tmp_path, GPU_PY=str(fake))
    assert p.returncode == 1, p.stdout + p.stderr  # the learner benchmark failed
    summary = p.stdout.split("gpu_check summary (Fake GPU, torch 0, CUDA 0;")[1]
    lines = [s.strip() for s in summary.splitlines()[1:]]
    assert lines[0].startswith("gpu-tests: passed in") and lines[0].endswith("| 3 passed in 1.0s")
    assert lines[1].startswith("learner-bench: failed (exit 3) in")
    assert lines[2].startswith("rollout-length-tail: skipped (no vLLM next to")
    assert lines[3].startswith("nccl-sync: skipped (no vLLM next to")
    assert (tmp_path / "logs" / "learner-bench.log").read_text() == "out of memory\n"
