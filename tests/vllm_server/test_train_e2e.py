"""`spo-agent train` with vLLM's server as the rollout engine, end to end on CPU.

The training loop (`spo_agents.training.loop.train`) rolls out `math-python` episodes through the
`openai` backend against a server started by `VLLMServer`, updates the learner, and pushes the
weights with `rollout.weight_sync` after every step. Afterwards the server must serve exactly
the learner's weights. The policy is the embedded SmolLM2-135M-Instruct, as in `make train`.
With 4 episodes a step the rewards can all be equal (zero advantages), so the entropy bonus
(`loss.entropy_coef`) guarantees that every step changes the weights.

Run: `SPO_VLLM_PYTHON=.venv-vllm/bin/python .venv/bin/python -m pytest -m vllm tests/vllm_server -q`.
"""

from __future__ import annotations

import json

import pytest

from spo_agents.serving.vllm_server import VLLMServer, group_pids
from spo_agents.serving.weight_sync import check_sync, learner_logprobs

pytestmark = pytest.mark.vllm
torch = pytest.importorskip("torch")


@pytest.mark.parametrize("weight_sync", ["reload", "lora"])
def test_training_steps_reach_the_server(tmp_path, weight_sync, vllm_python):
    from spo_agents.config import load_config
    from spo_agents.models import embedded_model_dir
    from spo_agents.training.components import build_components
    from spo_agents.training.loop import train

    model_dir = embedded_model_dir()
    lora = weight_sync == "lora"
    cfg = load_config(
        overrides=[
            f"model.name={model_dir}",
            "model.dtype=float32",
            "model.device=cpu",
            f"model.lora.enabled={str(lora).lower()}",
            "model.lora.r=8",
            "rollout.backend=vllm-server",
            f"rollout.weight_sync={weight_sync}",
            "rollout.max_in_flight=4",
            "rollout.max_new_tokens=16",
            "rollout.max_episode_tokens=48",
            "train.steps=2",
            "train.batch_size=4",
            "train.checkpoint_every=100",
            "eval.every=0",
            f"optim.lr={1e-3 if lora else 1e-4}",
            "loss.entropy_coef=0.1",
            "logging.progress=false",
            f"train.output_dir={tmp_path}",
        ]
    )
    server = VLLMServer.from_config(
        cfg, log_dir=tmp_path, python=vllm_python, kv_cache_bytes=1 << 29, max_model_len=1024, startup_timeout_s=600
    )
    with server:
        pgid = server.pid
        cfg.rollout.base_url = server.openai_base_url
        comp = build_components(cfg)
        probe = list(range(300, 364))
        before = learner_logprobs(comp.model, probe)
        result = train(cfg, run_dir=tmp_path / "run", components=comp)
        assert result.step == 2
        assert comp.weight_sync.version == 2
        moved = max(abs(a - b) for a, b in zip(before, learner_logprobs(comp.model, probe)))
        assert moved > 1e-3, "training did not change the weights: the check below would prove nothing"
        diff = check_sync(comp.model, server, probe, served_model=comp.weight_sync.served_model, atol=2e-4)
        print(f"\n{weight_sync}: after 2 steps the learner moved by {moved:.3f}; server vs learner {diff:.1e}")
        rows = [
            json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()
        ]
        assert [r.get("step") for r in rows][-2:] == [1, 2]
    assert group_pids(pgid) == []
