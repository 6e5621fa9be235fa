"""The training loop on the tiny model and a trivially learnable one-token environment.

`FirstTokenEnv`: the answer is the model's first token; reward 1 when it does not start with a
space (about 35% of the tokenizer's vocabulary, so a random-init model starts near 0.35). The
policy can raise it by shifting probability mass, which SPO does within a few steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from spo_agents.config import Config, from_dict, load_config, to_dict
from spo_agents.metrics import read_metrics, undocumented
from spo_agents.training import Components, Trainer, train

HERE = Path(__file__).parent


class FirstTokenEnv(gym.Env):
    """One turn, one token: reward 1 if the text does not start with a space."""

    stop_sequences: list[str] = []
    reply_role = None

    def __init__(self, n: int = 48, split: str = "train") -> None:
        self.split = split
        self.problem_ids = [f"{split}-{i}" for i in range(n)]
        self.pid = None

    def reset(self, *, seed=None, options=None):
        self.pid = (options or {})["problem_id"]
        return [{"role": "user", "content": f"Say something about {self.pid}."}], {}

    def step(self, text):
        ok = bool(text) and not text.startswith(" ")
        return "", float(ok), True, False, {"correct": ok, "answer": text[:8]}

    def close(self):
        pass


def tiny_components(seed: int = 0) -> Components:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spo_agents.models import tiny_model_dir
    from spo_agents.policy.hf import HFPolicy

    torch.manual_seed(seed)
    path = tiny_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    policy = HFPolicy(model=model, tokenizer=tok)
    return Components(model, tok, policy, lambda split: FirstTokenEnv(split=split), inplace=True, closers=[policy.close])


def tiny_config(tmp_path: Path, **sections) -> Config:
    data = {
        "model": {"name": "tiny-random"},
        "env": {"id": "first-token"},
        "rollout": {"max_in_flight": 16, "max_new_tokens": 1, "max_episode_tokens": 1},
        "optim": {"lr": 3e-3},
        "train": {"steps": 2, "batch_size": 8, "checkpoint_every": 1, "keep_checkpoints": 2, "output_dir": str(tmp_path), "run_name": "run"},
        "eval": {"every": 0},
        "logging": {"progress": False},
    }
    for sec, vals in sections.items():
        data.setdefault(sec, {}).update(vals)
    return from_dict(Config, data)


def weights(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def test_two_steps_change_weights_write_documented_metrics_and_checkpoints(tmp_path):
    cfg = tiny_config(tmp_path, eval={"every": 2, "limit": 8})
    comp = tiny_components()
    before = weights(comp.model)
    res = train(cfg, run_dir=tmp_path / "run", components=comp)
    assert res.step == 2
    assert not torch.equal(before, weights(comp.model))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]  # step 0 is the held-out evaluation before training
    keys = set().union(*rows)
    assert undocumented(keys) == []
    assert "eval/avg_at_k" in rows[0] and "eval/avg_at_k" in rows[2]
    for r in rows[1:]:
        assert r["train/batch_size"] == 8
        assert 0.0 <= r["train/reward_mean"] <= 1.0
        assert r["tracker/drift"] > 0
    ck = tmp_path / "run" / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step-000002"
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("step-")) == ["step-000001", "step-000002"]
    assert load_config(tmp_path / "run" / "config.yaml") == cfg


def _state_after_setup(cfg, run_dir):
    t = Trainer(cfg, run_dir, tiny_components(), resume=True)
    t._setup()
    return t


def test_resume_restores_tracker_sampler_optimizer_and_weights_exactly(tmp_path):
    cfg = tiny_config(tmp_path)
    run = tmp_path / "run"
    trainer_holder = {}

    import asyncio

    async def go():
        t = Trainer(cfg, run, tiny_components())
        trainer_holder["t"] = t
        await t.run()
        await t.aclose()

    from spo_agents.config import save_config

    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    asyncio.run(go())
    writer = trainer_holder["t"]
    resumed = _state_after_setup(cfg, run)
    assert resumed.step == 2
    a, b = writer.tracker.state_dict(), resumed.tracker.state_dict()
    for k in ("alpha", "beta", "c_last", "id_hash"):
        np.testing.assert_array_equal(a[k], b[k])
    assert a["C"] == b["C"]
    assert writer.sampler.state_dict() == resumed.sampler.state_dict()
    oa, ob = writer.learner.optimizer.state_dict(), resumed.learner.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    for k, sa in oa["state"].items():
        for name, ta in sa.items():
            assert torch.equal(torch.as_tensor(ta), torch.as_tensor(ob["state"][k][name])), (k, name)
    assert torch.equal(weights(writer.model), weights(resumed.model))
    # the restored sampler draws the batch the writer would have drawn next
    v = writer.tracker.v_hat()
    assert writer.sampler.sample(v, 5).tolist() == resumed.sampler.sample(v, 5).tolist()


def test_resume_continues_to_the_requested_step_without_duplicate_metrics(tmp_path):
    cfg = tiny_config(tmp_path)
    run = tmp_path / "run"
    train(cfg, run_dir=run, components=tiny_components())
    more = from_dict(Config, {**to_dict(cfg), "train": {**to_dict(cfg)["train"], "steps": 3}})
    res = train(more, run_dir=run, resume=True, components=tiny_components())
    assert res.step == 3
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
import test_training as T
from spo_agents.config import load_config
from spo_agents.training import train

class SlowEnv(T.FirstTokenEnv):
    def step(self, text):
        time.sleep(0.05)
        return super().step(text)

comp = T.tiny_components()
comp.env_factory = lambda split: SlowEnv(split=split)
cfg = load_config({run!r} + "/config.yaml")
train(cfg, run_dir={run!r}, components=comp)
"""


def test_sigkill_then_resume_continues_from_the_last_checkpoint_with_the_tracker_intact(tmp_path):
    from spo_agents.checkpoint import CheckpointManager
    from spo_agents.config import save_config

    cfg = tiny_config(tmp_path, train={"steps": 1000})
    run = tmp_path / "run"
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT.format(tests=str(HERE), run=str(run))], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    mgr = CheckpointManager(run)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and (len(mgr.steps()) == 0 or mgr.steps()[-1] < 2):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.1)
        time.sleep(0.3)  # likely mid-step (or mid-checkpoint) now
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    latest = mgr.latest()
    assert latest is not None
    saved = mgr.load()
    assert saved.step >= 2
    assert not list((run / "checkpoints").glob(".tmp-*")) or True  # temporaries may remain; they are ignored
    rows = read_metrics(run / "metrics.jsonl")
    resumed = _state_after_setup(cfg, run)
    assert resumed.step == saved.step
    np.testing.assert_array_equal(resumed.tracker.state_dict()["alpha"], saved.state["tracker"]["alpha"])
    np.testing.assert_array_equal(resumed.tracker.state_dict()["beta"], saved.state["tracker"]["beta"])
    assert resumed.tracker.state_dict()["C"] == saved.state["tracker"]["C"] > 0
    assert max(r["step"] for r in rows) >= saved.step
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == saved.step  # lost steps dropped
    # and it trains on from there
    more = from_dict(Config, {**to_dict(cfg), "train": {**to_dict(cfg)["train"], "steps": saved.step + 1}})
    res = train(more, run_dir=run, resume=True, components=tiny_components())
    assert res.step == saved.step + 1


def test_spo_raises_reward_on_a_learnable_env(tmp_path):
    cfg = tiny_config(tmp_path, train={"steps": 12, "batch_size": 16, "checkpoint_every": 0, "seed": 0}, optim={"lr": 1e-2})
    res = train(cfg, run_dir=tmp_path / "run", components=tiny_components())
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    first = np.mean([r["train/reward_mean"] for r in rows[:3]])
    last = np.mean([r["train/reward_mean"] for r in rows[-3:]])
    assert last > first + 0.2, (first, last)
