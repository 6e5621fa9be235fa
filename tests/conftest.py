"""Fixtures shared by the test modules: a real OpenAI-compatible server on the tiny model."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from spo_agents.models import tiny_model_dir

SERVE = Path(sys.executable).parent / "transformers"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def unused_port() -> int:
    """A loopback port nothing listens on (free when the fixture ran)."""
    return _free_port()


@pytest.fixture(scope="module")
def served_model(tmp_path_factory):
    """Start `transformers serve` on a free loopback port; yield (base_url, model name)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        pytest.skip("`transformers serve` needs `pip install 'transformers[serving]'` (in the dev extra)")
    exe = str(SERVE) if SERVE.exists() else shutil.which("transformers")
    if exe is None:
        pytest.skip("the `transformers` command is not installed")
    model = str(tiny_model_dir())
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [exe, "serve", model, "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"`transformers serve` did not become ready (exit code {proc.poll()}):\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1", model
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
