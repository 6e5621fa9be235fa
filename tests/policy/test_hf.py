"""The `hf` backend under both schedulers: sampled-distribution log-probs, stops, seeds,
pause/resume, versions; and the static scheduler's batching (the continuous scheduler's is in
`test_hf_continuous.py`)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from spo_agents.errors import ConfigError, PolicyError
from spo_agents.rollout.policy import make_policy
from spo_agents.rollout.policy.base import SamplingParams
from spo_agents.rollout.policy.hf import HFPolicy


@pytest.fixture(scope="module", params=["continuous", "static"])
def policy(request):
    p = make_policy("hf", "tiny-random", torch_threads=1, scheduler=request.param)
    assert p.scheduler == request.param
    yield p
    asyncio.run(p.close())


@pytest.fixture(scope="module")
def static():
    p = make_policy("hf", "tiny-random", torch_threads=1, scheduler="static")
    yield p
    asyncio.run(p.close())


def _prompt(policy, text: str) -> list[int]:
    return policy.tokenizer.encode(text, add_special_tokens=False)


def _reference_logprobs(
    model, prompt: list[int], tokens: list[int], temperature: float, top_k: int, top_p: float
) -> list[float]:
    """Log-probs of `tokens` under the warped distribution, computed here from scratch:
    logits / T, keep the top-k, then the smallest set with cumulative probability >= top-p."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()  # [T, V]
    out = []
    for t, tok in enumerate(tokens):
        z = logits[t] / temperature
        kth = torch.topk(z, top_k).values[-1]
        z = torch.where(z < kth, torch.tensor(float("-inf")), z)
        probs = torch.softmax(z, -1)
        order = torch.argsort(probs, descending=True)
        cum = torch.cumsum(probs[order], 0)
        keep = order[: int((cum < top_p).sum()) + 1]
        masked = torch.full_like(z, float("-inf"))
        masked[keep] = z[keep]
        out.append(float(torch.log_softmax(masked, -1)[tok]))
    return out


async def test_logprobs_are_those_of_the_sampled_distribution(policy):
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=12)
    prompts = [_prompt(policy, t) for t in ("Hello", "A longer prompt with more words in it", "Hi there, friend")]
    gens = await asyncio.gather(*(policy.generate(p, params) for p in prompts))  # one left-padded batch
    for p, g in zip(prompts, gens):
        assert len(g.logprobs) == len(g.token_ids) > 0
        ref = _reference_logprobs(policy.model, p, g.token_ids, 0.7, 20, 0.9)
        assert max(abs(a - b) for a, b in zip(g.logprobs, ref)) < 1e-3
        assert all(lp <= 0.0 for lp in g.logprobs)


async def test_stop_string_ends_at_the_completing_token(policy):
    params = SamplingParams(max_new_tokens=40, stop=["e"])
    gens = await asyncio.gather(*(policy.generate(_prompt(policy, f"Story {i}:"), params) for i in range(4)))
    stopped = [g for g in gens if g.finish_reason == "stop"]
    assert stopped, "with `e` as stop string some generations must stop on it"
    for g in stopped:
        tok = policy.tokenizer
        assert g.stop_string == "e"
        assert "e" in tok.decode(g.token_ids)
        assert "e" not in tok.decode(g.token_ids[:-1])  # no earlier occurrence: cut at the completing token
        assert "e" in g.text


async def test_length_and_eos_finish_reasons(policy):
    g = await policy.generate(_prompt(policy, "Count:"), SamplingParams(max_new_tokens=5))
    if g.finish_reason == "length":
        assert len(g.token_ids) == 5
    else:
        assert g.finish_reason == "eos" and g.token_ids[-1] in policy.eos_ids


def test_eos_ends_the_continuation_and_is_kept(policy):
    from spo_agents.rollout.policy.stopping import find_stop

    eos = policy.eos_ids[0]
    ids = policy.tokenizer.encode("ab", add_special_tokens=False) + [eos, 42]
    m = find_stop(policy.tokenizer, ids, [], policy.eos_ids)
    assert m is not None and m.reason == "eos" and m.length == len(ids) - 1


async def test_static_concurrent_requests_share_generate_calls(static):
    policy = static
    before = dict(policy.stats)
    params = SamplingParams(max_new_tokens=4)
    await asyncio.gather(*(policy.generate(_prompt(policy, f"x{i}"), params) for i in range(6)))
    assert policy.stats["rows"] - before["rows"] == 6
    assert policy.stats["batches"] - before["batches"] <= 2


async def test_static_rows_with_different_budgets_share_a_call(static):
    policy = static
    before = policy.stats["batches"]
    a, b = await asyncio.gather(
        policy.generate(_prompt(policy, "x"), SamplingParams(max_new_tokens=3)),
        policy.generate(_prompt(policy, "x"), SamplingParams(max_new_tokens=7)),
    )
    assert policy.stats["batches"] - before == 1  # one call, each row stopped at its own budget
    assert len(a.token_ids) <= 3 and len(b.token_ids) <= 7
    assert a.finish_reason != "length" or len(a.token_ids) == 3
    assert b.finish_reason != "length" or len(b.token_ids) == 7


async def test_static_a_short_row_is_delivered_before_the_long_row_finishes(static):
    policy = static
    short = asyncio.create_task(policy.generate(_prompt(policy, "x"), SamplingParams(max_new_tokens=2)))
    long = asyncio.create_task(policy.generate(_prompt(policy, "y"), SamplingParams(max_new_tokens=120)))
    g = await short
    assert not long.done()  # the batch is still generating the long row
    assert len(g.token_ids) <= 2
    assert len((await long).token_ids) <= 120


async def test_static_different_distributions_are_not_mixed(static):
    policy = static
    before = policy.stats["batches"]
    await asyncio.gather(
        policy.generate(_prompt(policy, "x"), SamplingParams(max_new_tokens=3, temperature=1.0)),
        policy.generate(_prompt(policy, "x"), SamplingParams(max_new_tokens=3, temperature=0.5)),
    )
    assert policy.stats["batches"] - before == 2


async def test_same_seed_same_sample_when_run_alone(policy):
    params = SamplingParams(max_new_tokens=8, seed=1234)
    a = await policy.generate(_prompt(policy, "seeded"), params)
    b = await policy.generate(_prompt(policy, "seeded"), params)
    c = await policy.generate(_prompt(policy, "seeded"), SamplingParams(max_new_tokens=8, seed=99))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids or a.logprobs != c.logprobs


async def test_pause_drains_running_generations_and_holds_new_ones(policy):
    started = policy.stats["rows"]
    running = asyncio.create_task(policy.generate(_prompt(policy, "long"), SamplingParams(max_new_tokens=30)))
    for _ in range(6000):  # until the worker has taken the request (counted when its batch / prefill starts)
        if policy.stats["rows"] > started:
            break
        await asyncio.sleep(0.005)
    await policy.pause()
    assert running.done()  # a drain: nothing in flight once `pause` returns
    assert not policy._busy.locked()  # no batch (static) or decode step (continuous) is running
    held = asyncio.create_task(policy.generate(_prompt(policy, "held"), SamplingParams(max_new_tokens=3)))
    await asyncio.sleep(0.2)
    assert not held.done()
    assert policy.resume(7) is None
    g = await asyncio.wait_for(held, 30)
    assert g.policy_version == 7 and g.info["policy_version_last"] == 7
    r = await running
    assert r.policy_version == 0 and r.info["policy_version_last"] == 0
    await policy.pause()
    policy.resume(0)


async def test_wraps_an_existing_module_shared_with_a_learner(policy):
    shared = HFPolicy(model=policy.model, tokenizer=policy.tokenizer)
    assert shared.model is policy.model
    g = await shared.generate(_prompt(policy, "shared"), SamplingParams(max_new_tokens=3, temperature=0.0))
    h = await shared.generate(_prompt(policy, "shared"), SamplingParams(max_new_tokens=3, temperature=0.0))
    assert g.token_ids == h.token_ids  # greedy
    await shared.close()
    await shared.close()  # safe twice


async def test_bad_arguments_are_clear_errors(policy):
    with pytest.raises(PolicyError, match="max_new_tokens"):
        await policy.generate(_prompt(policy, "x"), SamplingParams(max_new_tokens=0))
    with pytest.raises(PolicyError, match="empty"):
        await policy.generate([], SamplingParams())
    with pytest.raises(ConfigError, match="scheduler"):
        HFPolicy(model=policy.model, tokenizer=policy.tokenizer, scheduler="dynamic")
