"""`spo-agent train` with `rollout.servers: 2`: two vLLM CPU servers started by the trainer.

The trainer starts both (each on its own port, with its own log and a 1 GiB KV cache), routes
episodes to both, and pushes every version to each. After every push the same tokens are scored
on each live server and by the learner: equal log-probs mean the servers serve the same weights,
the learner's. After the second push one server is killed (SIGKILL of its process group) while
episodes of the next step wait at its gate: the run must still finish all its steps on the other.
The model is a random-init Llama (hidden 128: vLLM's CPU attention needs a head size of at least 32).

Run: `SPO_VLLM_PYTHON=.venv-vllm/bin/python .venv/bin/python -m pytest -m vllm \
    tests/vllm_server/test_two_servers.py -q -s`.
"""

from __future__ import annotations

import logging
import os
import signal

import pytest

from spo_agents.serving.vllm_server import group_pids
from spo_agents.serving.weight_sync import learner_logprobs, server_logprobs

pytestmark = pytest.mark.vllm
torch = pytest.importorskip("torch")

ATOL = 2e-4  # fp32 on both sides: float rounding (~1e-6); another version differs by > 1e-3
STEPS, KILL_AFTER = 4, 2


def test_two_started_servers_serve_stay_equal_and_survive_losing_one(tmp_path, vllm_python, caplog):
    from spo_agents.config import load_config
    from spo_agents.models import tiny_model_dir
    from spo_agents.rollout.policy.multi import MultiServerPolicy
    from spo_agents.training.components import build_components
    from spo_agents.training.run import train

    cfg = load_config(
        overrides=[
            f"model.name={tiny_model_dir(hidden_size=128, num_layers=2)}",
            "model.dtype=float32",
            "model.device=cpu",
            "rollout.backend=vllm-server",
            "rollout.servers=2",
            f"rollout.server_python={vllm_python}",
            "rollout.weight_sync=reload",
            "rollout.max_in_flight=8",
            "rollout.oversample=2",  # episodes stay in flight across each push
            "rollout.max_new_tokens=16",
            "rollout.max_episode_tokens=48",
            "rollout.max_retries=1",
            f"train.steps={STEPS}",
            "train.batch_size=4",
            "train.checkpoint_every=100",
            "eval.every=0",
            "optim.lr=1e-3",
            "loss.entropy_coef=0.1",
            "logging.progress=false",
            f"train.output_dir={tmp_path}",
        ]
    )
    cfg.rollout.server_args = ["--max-model-len", "1024"]
    comp = build_components(cfg, log_dir=tmp_path / "logs")
    servers, policy, sync = comp.servers, comp.policy, comp.weight_sync
    assert len(servers) == 2 and servers[0].port != servers[1].port
    assert all(s.log_path.is_file() for s in servers) and servers[0].log_path != servers[1].log_path
    assert all("--kv-cache-memory-bytes" in s.command() and str(1 << 30) in s.command() for s in servers)
    assert isinstance(policy, MultiServerPolicy)
    pgids = [s.pid for s in servers]

    probe = list(range(300, 364))
    before = learner_logprobs(comp.model, probe)
    checks = []  # (version, learner vs each live server, servers' spread)
    push = sync.push

    async def push_and_check(model, version):
        stats = await push(model, version)
        learner = learner_logprobs(model, probe)
        alive = [s for s in servers if s.running]
        scored = [server_logprobs(s, probe, model=sync.served_model) for s in alive]
        to_learner = [max(abs(a - b) for a, b in zip(lp, learner)) for lp in scored]
        spread = max(abs(a - b) for a, b in zip(scored[0], scored[-1]))
        checks.append((version, len(alive), max(to_learner), spread))
        if version == KILL_AFTER:  # dies while the next step's episodes wait at its gate
            os.killpg(servers[1].pid, signal.SIGKILL)
        return stats

    sync.push = push_and_check
    with caplog.at_level(logging.WARNING):
        result = train(cfg, run_dir=tmp_path / "run", components=comp)
    print(
        f"\nservers started in {[round(s.startup_s or 0) for s in servers]} s; generations per server "
        f"{[s.generations for s in policy.servers]}; checks (version, live servers, |learner - server|, "
        f"|server0 - server1|): {checks}"
    )
    assert result.step == STEPS  # no step lost to the dead server
    assert [c[0] for c in checks] == list(range(1, STEPS + 1))
    assert all(s.generations > 0 for s in policy.servers), "requests did not reach both servers"
    moved = max(abs(a - b) for a, b in zip(before, learner_logprobs(comp.model, probe)))
    assert moved > 1e-3, "training did not change the weights: the checks below would prove nothing"
    for version, live, to_learner, spread in checks:
        assert live == (2 if version <= KILL_AFTER else 1)
        assert to_learner <= ATOL, f"version {version}: a server does not serve the learner's weights"
        assert spread <= ATOL, f"version {version}: the two servers serve different weights"
    assert sync.pushed == [STEPS, KILL_AFTER]  # the dead server got no later push
    assert not policy.servers[1].live and policy.servers[0].live
    assert "taken out of rotation" in caplog.text
    assert all(group_pids(pgid) == [] for pgid in pgids), "a server left processes behind"
