"""What the training tests share: the tiny model and a trivially learnable one-token environment.

`FirstTokenEnv`: the answer is the model's first token; reward 1 when it does not start with a
space (about 35% of the tokenizer's vocabulary, so a random-init model starts near 0.35). The
policy can raise it by shifting probability mass, which SPO does within a few steps.
"""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import torch

from spo_agents.config import Config, from_dict
from spo_agents.training.loop import Components


class FirstTokenEnv(gym.Env):
    """One turn, one token: reward 1 if the text does not start with a space."""

    stop_sequences: list[str] = []
    reply_role = None
    env_id = "first-token-v0"

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

    def answers_equivalent(self, a, b):
        return a == b

    def close(self):
        pass


def tiny_components(seed: int = 0) -> Components:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spo_agents.models import tiny_model_dir
    from spo_agents.rollout.policy.hf import HFPolicy

    torch.manual_seed(seed)
    path = tiny_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    policy = HFPolicy(model=model, tokenizer=tok)
    return Components(
        model, tok, policy, lambda split: FirstTokenEnv(split=split), inplace=True, closers=[policy.close]
    )


def tiny_config(tmp_path: Path, **sections) -> Config:
    data = {
        "model": {"name": "tiny-random"},
        "env": {"id": "first-token"},
        "rollout": {"max_in_flight": 16, "max_new_tokens": 1, "max_episode_tokens": 1},
        "optim": {"lr": 3e-3},
        "train": {
            "steps": 2,
            "batch_size": 8,
            "checkpoint_every": 1,
            "keep_checkpoints": 2,
            "output_dir": str(tmp_path),
            "run_name": "run",
        },
        "eval": {"every": 0},
        "logging": {"progress": False},
    }
    for sec, vals in sections.items():
        data.setdefault(sec, {}).update(vals)
    return from_dict(Config, data)


def weights(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
