"""The `hf` backend samples from the weights it holds now, with fresh randomness.

Both schedulers: after the learner changes the shared module in place between `pause` and
`resume(version)`, the behaviour log-probs of new generations are the learner's scoring of the
new weights (and not of the old ones), stamped with the new version; and two unseeded calls
with the same prompt draw independently (the static scheduler once replayed the same saved
random state on every call, so every batch repeated the previous batch's draws).
"""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from spo_agents.rollout.policy import make_policy
from spo_agents.rollout.policy.base import SamplingParams
from spo_agents.training.packing import pack, token_logprobs
from spo_agents.types import Trajectory


@pytest.fixture(params=["continuous", "static"])
def policy(request):
    p = make_policy("hf", "tiny-random", torch_threads=1, scheduler=request.param)
    p.model = copy.deepcopy(p.model)  # this test changes the weights
    yield p
    asyncio.run(p.close())


def _prompt(policy, text: str) -> list[int]:
    return policy.tokenizer.encode(text)


def _scores(model, prompt: list[int], gens) -> tuple[torch.Tensor, torch.Tensor]:
    """(the learner's log-probs, the behaviour log-probs) of every sampled token."""
    trajs = [Trajectory("p", "e", prompt, g.token_ids, [1] * len(g.token_ids), g.logprobs, 0.0) for g in gens]
    b = pack(trajs, 0)
    with torch.no_grad():
        learner, _ = token_logprobs(model, b, 1.0)
    m = b.mask > 0
    return learner[m], b.old_logprobs[m]


async def test_generation_after_an_in_place_update_samples_from_the_new_weights(policy):
    prompt = _prompt(policy, "the weights change between these calls")
    params = SamplingParams(max_new_tokens=6)
    await asyncio.gather(*[policy.generate(prompt, params) for _ in range(4)])
    old_model = copy.deepcopy(policy.model)
    await policy.pause()
    with torch.no_grad():  # what a learner step does: change the shared module in place
        gen = torch.Generator().manual_seed(0)
        for p in policy.model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    policy.resume(1)
    gens = await asyncio.gather(*[policy.generate(prompt, params) for _ in range(4)])
    assert {g.policy_version for g in gens} == {1}
    learner, behaviour = _scores(policy.model, prompt, gens)
    assert torch.allclose(learner, behaviour, atol=1e-4)
    stale, _ = _scores(old_model, prompt, gens)
    assert (stale - behaviour).abs().max() > 1e-2  # the update did change these log-probs


async def test_unseeded_calls_draw_afresh(policy):
    prompt = _prompt(policy, "draw again")
    params = SamplingParams(max_new_tokens=8)
    first = [g.token_ids for g in await asyncio.gather(*[policy.generate(prompt, params) for _ in range(4)])]
    second = [g.token_ids for g in await asyncio.gather(*[policy.generate(prompt, params) for _ in range(4)])]
    # a near-uniform distribution over the tiny model's vocabulary: equal 8-token draws only by replay
    assert first != second
    assert len({tuple(t) for t in first + second}) == 8


async def test_close_fails_the_requests_a_pause_holds(policy):
    from spo_agents.errors import PolicyError

    await policy.pause()
    held = asyncio.create_task(policy.generate(_prompt(policy, "held at the gate"), SamplingParams(max_new_tokens=2)))
    await asyncio.sleep(0.1)
    assert not held.done()
    await policy.close()
    with pytest.raises(PolicyError, match="closed"):
        await asyncio.wait_for(held, 30)
