"""Behaviour log-probs that differ from the learner's: the logged gap, `loss.behaviour_logprobs:
recompute` and the truncated importance-sampling weights of `loss.tis_cap`.

A wrapper around the in-process backend adds known noise to every reported log-prob (a stand-in
for a bf16 server whose log-probs are off the fp32 learner's); the tokens are still sampled from
the learner's own weights, so the learner's re-score equals the clean log-probs.
"""

from __future__ import annotations

import asyncio
import copy
import math

import pytest
import torch

from spo_agents.errors import ConfigError
from spo_agents.rollout.policy import make_policy
from spo_agents.rollout.policy.base import SamplingParams
from spo_agents.training.learner import Learner, LearnerSettings
from spo_agents.types import Trajectory


class NoisyPolicy:
    """Reports each sampled token's log-prob plus `noise[i]` (cycled), like a backend whose
    numerics differ from the learner's."""

    def __init__(self, inner, noise: list[float]) -> None:
        self.inner, self.noise, self.n = inner, noise, 0

    async def generate(self, prompt_ids, params):
        g = await self.inner.generate(prompt_ids, params)
        lps = []
        for lp in g.logprobs:
            lps.append(lp + self.noise[self.n % len(self.noise)])
            self.n += 1
        g.logprobs = lps
        return g


NOISE = [0.3, -0.2, 0.0, 0.15, -0.35, 0.05]


@pytest.fixture(scope="module")
def batch():
    """(model, clean trajectories, noisy trajectories) from the tiny model."""
    policy = make_policy("hf", "tiny-random", torch_threads=1)
    model = copy.deepcopy(policy.model)
    policy.model = model
    noisy = NoisyPolicy(policy, NOISE)

    async def collect():
        out = []
        for i in range(4):
            prompt = policy.tokenizer.encode(f"problem {i}: say something")
            g = await noisy.generate(prompt, SamplingParams(max_new_tokens=3 + i, seed=i))
            out.append((prompt, g))
        await policy.close()
        return out

    gens = asyncio.run(collect())
    trajs = [
        Trajectory(f"p{i}", "e", p, g.token_ids, [1] * len(g.token_ids), g.logprobs, 0.0)
        for i, (p, g) in enumerate(gens)
    ]
    return model, trajs


ADV = [1.0, -1.0, 0.5, -0.5]


def _learner(model, **kw) -> Learner:
    return Learner(copy.deepcopy(model), LearnerSettings(lr=1e-3, **kw), pad_id=0)


def test_the_gap_between_rollout_and_learner_logprobs_is_logged(batch):
    model, trajs = batch
    stats = _learner(model).update(trajs, ADV)
    noise = [abs(NOISE[i % len(NOISE)]) for i in range(sum(len(t.token_ids) for t in trajs))]
    assert stats.logprob_diff_mean == pytest.approx(sum(noise) / len(noise), abs=1e-4)
    assert stats.logprob_diff_max == pytest.approx(max(noise), abs=1e-4)


def test_recompute_makes_the_first_mini_batch_ratio_exactly_one(batch):
    model, trajs = batch
    rollout = _learner(model).update(trajs, ADV)
    assert abs(rollout.ratio_mean - 1.0) > 1e-2  # the noise biases every ratio
    recompute = _learner(model, behaviour_logprobs="recompute").update(trajs, ADV)
    assert recompute.ratio_mean == pytest.approx(1.0, abs=1e-5)
    assert recompute.approx_kl == pytest.approx(0.0, abs=1e-6) and recompute.clip_frac == 0.0
    # the gap is still measured against what the backend reported
    assert recompute.logprob_diff_max == pytest.approx(rollout.logprob_diff_max, abs=1e-5)


@pytest.mark.parametrize("cap", [1.0, 1.2])
def test_tis_weights_each_tokens_loss_by_the_capped_ratio(batch, cap):
    """At the first mini-batch pi = pi_old_learner, so the clipped term of each token is -A and
    the loss is -sum_t A_t min(exp(learner_t - behaviour_t), cap) / tokens (the truncated-IS
    weight of the spec, with learner - behaviour = -noise)."""
    model, trajs = batch
    stats = _learner(model, tis_cap=cap).update(trajs, ADV)
    total, n, k = 0.0, 0, 0
    for a, t in zip(ADV, trajs):
        for _ in t.token_ids:
            total += -a * min(math.exp(-NOISE[k % len(NOISE)]), cap)
            n, k = n + 1, k + 1
    assert stats.loss == pytest.approx(total / n, abs=1e-4)
    assert stats.ratio_mean == pytest.approx(1.0, abs=1e-5)
    uncapped = sum(
        -a * math.exp(-NOISE[j % len(NOISE)])
        for j, a in enumerate(x for a, t in zip(ADV, trajs) for x in [a] * len(t.token_ids))
    )
    assert abs(stats.loss - uncapped / n) > 1e-3  # the cap changed some weights


def test_bad_settings_are_clear_errors(batch):
    model, _ = batch
    with pytest.raises(ConfigError, match="behaviour_logprobs"):
        _learner(model, behaviour_logprobs="server")
    with pytest.raises(ConfigError, match="tis_cap"):
        _learner(model, tis_cap=0.5)


def test_token_weights_scale_each_tokens_term():
    from spo_agents.algorithm.loss import policy_loss

    logp = torch.zeros(1, 3)
    w = torch.tensor([[1.0, 0.5, 2.0]])
    loss, _ = policy_loss(logp, logp, torch.tensor([1.0]), torch.ones(1, 3), token_weights=w)
    assert loss.item() == pytest.approx(-(1.0 + 0.5 + 2.0) / 3)
