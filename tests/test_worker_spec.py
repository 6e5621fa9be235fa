"""`rollout.workers: ray` from the config: what every actor is told to build, and the error when
Ray is missing (no cluster is started here; tests/test_ray_workers.py starts one)."""

from __future__ import annotations

import sys

import pytest

from spo_agents.config import load_config
from spo_agents.errors import ConfigError
from spo_agents.training.rollout_workers import worker_spec


def _cfg(*overrides: str):
    return load_config(
        overrides=[
            "rollout.backend=vllm-server",
            "rollout.workers=ray",
            "rollout.request_timeout_s=30",
            "rollout.max_retries=2",
            "rollout.server_wait_s=7",
            "env.id=countdown-python",
            "env.kwargs={num_problems: 5}",
            "sandbox.timeout_s=3",
            "sandbox.memory_mb=256",
            "sandbox.options={isolation: none}",
            *overrides,
        ]
    )


def test_the_actors_build_what_the_learner_would_and_reach_the_same_servers():
    servers = ["http://gpu1:8000/v1", "http://gpu2:8000/v1"]
    spec = worker_spec(_cfg("model.name=smollm2-135m"), servers)
    assert (spec.env_id, spec.split, spec.env_kwargs) == ("countdown-python", "train", {"num_problems": 5})
    assert (spec.sandbox, spec.sandbox_limits.timeout_s, spec.sandbox_limits.memory_mb) == ("local", 3, 256)
    assert spec.sandbox_options == {"isolation": "none"}
    assert spec.model == "smollm2-135m" and spec.tokenizer_model == "smollm2-135m"  # resolved on each node
    assert spec.policy_kwargs == {
        "base_url": servers,  # the list goes through unchanged
        "api_key_env": "OPENAI_API_KEY",
        "mode": "tokens",
        "request_timeout_s": 30,
        "max_retries": 2,
        "server_wait_s": 7,
    }


def test_the_served_model_name_is_what_the_actors_send():
    spec = worker_spec(_cfg("model.name=smollm2-135m", "rollout.server_model=policy"), "http://h:8000/v1")
    assert spec.model == "policy" and spec.tokenizer_model == "smollm2-135m"
    assert spec.policy_kwargs["base_url"] == "http://h:8000/v1"


def test_without_ray_the_error_names_the_extra(monkeypatch):
    from spo_agents.rollout.workers import RayWorkers

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'spo-agents\[ray\]'"):
        RayWorkers(worker_spec(_cfg(), "http://h:8000/v1"), 2)


def test_ray_workers_need_a_server_backend():
    with pytest.raises(ConfigError, match="rollout.workers: ray"):
        load_config(overrides=["rollout.backend=hf", "rollout.workers=ray"])
