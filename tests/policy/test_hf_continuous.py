"""The `hf` backend's continuous scheduler: requests join and leave the running batch between
decode steps, each stops at its own stop string / end-of-turn / budget, pause holds the steps,
and the behaviour log-probs equal the learner's scoring.

Orders are checked on the backend's step counter (`stats["steps"]`), never on wall time. A
wrapper around the tiny model (`Steered`) fixes where end-of-turn is sampled, so stop positions
and lengths are known in advance.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from spo_agents.errors import PolicyError
from spo_agents.rollout.policy import make_policy
from spo_agents.rollout.policy.base import SamplingParams
from spo_agents.rollout.policy.hf import HFPolicy
from spo_agents.training.learner import pack, token_logprobs
from spo_agents.types import Trajectory


class Steered(torch.nn.Module):
    """The tiny model with its end-of-turn logits overridden: never sampled when `eos_at` is
    `None`; else never before and always after the model has read position `eos_at` (a
    prompt of length L then yields exactly `eos_at - L + 2` tokens, the last one end-of-turn)."""

    def __init__(self, inner: torch.nn.Module, eos_ids: list[int], eos_at: int | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.eos_ids = list(eos_ids)
        self.eos_at = eos_at

    @property
    def config(self):
        return self.inner.config

    @property
    def generation_config(self):
        return self.inner.generation_config

    def forward(self, input_ids=None, position_ids=None, **kwargs):
        out = self.inner(input_ids=input_ids, position_ids=position_ids, **kwargs)
        logits = out.logits  # [rows, kept positions, vocab]
        logits[..., self.eos_ids] = float("-inf")
        if self.eos_at is not None:
            read = position_ids[:, -logits.shape[1] :]  # position each kept logit was computed at
            logits[..., self.eos_ids[0]] = torch.where(read >= self.eos_at, 1e4, float("-inf"))
        return out


@pytest.fixture(scope="module")
def base():
    p = make_policy("hf", "tiny-random", torch_threads=1, scheduler="continuous")
    yield p
    asyncio.run(p.close())


def _steered(base, eos_at: int | None = None, **kw) -> HFPolicy:
    return HFPolicy(
        model=Steered(base.model, base.eos_ids, eos_at), tokenizer=base.tokenizer, **{"scheduler": "continuous", **kw}
    )


def _prompt(policy, text: str) -> list[int]:
    return policy.tokenizer.encode(text, add_special_tokens=False)


async def _until(predicate, timeout: float = 60.0) -> None:
    for _ in range(int(timeout / 0.002)):
        if predicate():
            return
        await asyncio.sleep(0.002)
    raise AssertionError("condition not reached")


def _reference(model, prompt: list[int], tokens: list[int], p: SamplingParams) -> list[float]:
    """Log-probs of `tokens` from one full forward pass: softmax of logits / T, restricted to the
    k largest, then to the smallest set of most likely tokens whose mass reaches top-p
    (temperature 0: the unmodified model)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
    out = []
    for t, tok in enumerate(tokens):
        z = logits[t] / (p.temperature or 1.0)
        if p.temperature > 0 and p.top_k > 0:
            z = torch.where(z < torch.topk(z, p.top_k).values[-1], float("-inf"), z)
        if p.temperature > 0 and p.top_p < 1.0:
            probs = torch.softmax(z, -1)
            order = torch.argsort(probs, descending=True)
            keep = order[: int((torch.cumsum(probs[order], 0) < p.top_p).sum()) + 1]
            masked = torch.full_like(z, float("-inf"))
            masked[keep] = z[keep]
            z = masked
        out.append(float(torch.log_softmax(z, -1)[tok]))
    return out


# --------------------------------------------------------------------------- scheduling order
async def test_a_short_request_returns_while_a_long_one_runs(base):
    policy = _steered(base)  # no end-of-turn: the long request runs its whole budget
    try:
        long = asyncio.create_task(policy.generate(_prompt(base, "long"), SamplingParams(max_new_tokens=300, seed=1)))
        await _until(lambda: policy.stats["steps"] >= 3)
        submitted = policy.stats["steps"]
        short = await policy.generate(
            _prompt(base, "a somewhat longer prompt for the short one"), SamplingParams(max_new_tokens=4)
        )
        returned = policy.stats["steps"]
        assert len(short.token_ids) == 4 and short.finish_reason == "length"
        assert not long.done()
        # one token from its prefill, three decode steps, plus the step running at submission
        assert returned - submitted <= 5
        g = await long
        assert len(g.token_ids) == 300 and g.finish_reason == "length"
        assert policy.stats["steps"] >= returned + 250  # the long one went on long after
    finally:
        await policy.close()


async def test_the_static_scheduler_makes_the_short_request_wait(base):
    """The same situation under `scheduler="static"`: the short request waits for the long
    `generate` call to end (what the continuous scheduler removes)."""
    policy = HFPolicy(model=base.model, tokenizer=base.tokenizer, scheduler="static")
    try:
        long = asyncio.create_task(policy.generate(_prompt(base, "long"), SamplingParams(max_new_tokens=200, seed=1)))
        await _until(lambda: policy._busy.locked())
        short = await policy.generate(_prompt(base, "short"), SamplingParams(max_new_tokens=4))
        assert len(short.token_ids) <= 4
        assert long.done()
    finally:
        await policy.close()


async def test_requests_beyond_max_batch_size_wait_for_a_free_row(base):
    policy = _steered(base, max_batch_size=2)
    try:
        order: list[str] = []

        async def run(name: str, n: int):
            g = await policy.generate(_prompt(base, name), SamplingParams(max_new_tokens=n))
            order.append(name)
            return g

        gens = await asyncio.gather(run("a", 40), run("b", 6), run("c", 2), run("d", 2))
        assert [len(g.token_ids) for g in gens] == [40, 6, 2, 2]
        # c and d join only when a row frees up (b's): they finish before a, after b
        assert order == ["b", "c", "d", "a"]
    finally:
        await policy.close()


async def test_a_cancelled_request_leaves_the_batch(base):
    policy = _steered(base)
    try:
        long = asyncio.create_task(policy.generate(_prompt(base, "long"), SamplingParams(max_new_tokens=2000)))
        await _until(lambda: policy.stats["steps"] >= 3)
        long.cancel()
        cancelled_at = policy.stats["steps"]
        with pytest.raises(asyncio.CancelledError):
            await long
        g = await policy.generate(_prompt(base, "next"), SamplingParams(max_new_tokens=3))
        assert len(g.token_ids) == 3
        await asyncio.sleep(0.1)
        idle = policy.stats["steps"]
        await asyncio.sleep(0.2)
        assert policy.stats["steps"] == idle  # nothing left running
        assert idle - cancelled_at < 20
    finally:
        await policy.close()


# ----------------------------------------------------------------------------- per-request stops
async def test_each_request_stops_at_its_own_end_of_turn(base):
    eos_at = 24
    policy = _steered(base, eos_at=eos_at)
    try:
        prompts = [_prompt(base, t) for t in ("Hi", "A longer prompt with a few more words", "Medium prompt here")]
        first = [asyncio.create_task(policy.generate(p, SamplingParams(max_new_tokens=100))) for p in prompts[:2]]
        await _until(lambda: policy.stats["steps"] >= 2)
        late = await policy.generate(prompts[2], SamplingParams(max_new_tokens=100))  # joins a running batch
        gens = [*(await asyncio.gather(*first)), late]
        for p, g in zip(prompts, gens):
            assert len(g.token_ids) == eos_at - len(p) + 2
            assert g.finish_reason == "eos" and g.token_ids[-1] == base.eos_ids[0]
            assert base.eos_ids[0] not in g.token_ids[:-1]
            assert g.text == base.tokenizer.decode(g.token_ids[:-1], skip_special_tokens=False)
            assert len(g.logprobs) == len(g.token_ids) and g.logprobs[-1] == pytest.approx(0.0, abs=1e-4)
    finally:
        await policy.close()


async def test_each_request_stops_at_its_own_budget(base):
    policy = _steered(base)
    try:
        budgets = [1, 2, 5, 17, 33]
        early = [
            asyncio.create_task(policy.generate(_prompt(base, f"p{n}"), SamplingParams(max_new_tokens=n)))
            for n in budgets[3:]
        ]
        await _until(lambda: policy.stats["steps"] >= 1)
        later = [
            policy.generate(_prompt(base, f"q{n}"), SamplingParams(max_new_tokens=n, temperature=0.5))
            for n in budgets[:3]
        ]
        gens = await asyncio.gather(*early, *later)
        for n, g in zip(budgets[3:] + budgets[:3], gens):
            assert len(g.token_ids) == len(g.logprobs) == n and g.finish_reason == "length"
    finally:
        await policy.close()


async def test_each_request_stops_at_its_own_stop_strings(base):
    policy = _steered(base)
    try:
        prompt = _prompt(base, "Tell")
        seeded = SamplingParams(max_new_tokens=40, seed=3)  # the same draws in every run below
        free = await policy.generate(prompt, seeded)
        tok = base.tokenizer
        # a stop string: the text a token past the first few adds, not seen before it
        for k in range(5, 40):
            before = tok.decode(free.token_ids[:k])
            added = tok.decode(free.token_ids[: k + 1])[len(before) :].strip()
            if len(added) >= 2 and added not in before:
                break
        else:
            pytest.skip("no usable stop string in this continuation")
        stopped, unstopped, never = await asyncio.gather(
            policy.generate(prompt, dataclasses.replace(seeded, stop=["\x00never", added])),
            policy.generate(prompt, seeded),
            policy.generate(prompt, dataclasses.replace(seeded, stop=["\x00never"])),
        )
        assert stopped.finish_reason == "stop" and stopped.stop_string == added
        assert stopped.token_ids == free.token_ids[: k + 1]
        assert unstopped.token_ids == never.token_ids == free.token_ids
        assert unstopped.finish_reason == never.finish_reason == "length"
    finally:
        await policy.close()


# ------------------------------------------------------------------------------------ log-probs
async def test_mixed_sampling_settings_share_a_batch_and_keep_their_own_distribution(base):
    policy = HFPolicy(
        model=base.model, tokenizer=base.tokenizer, batch_wait_s=0.2, scheduler="continuous"
    )  # all four arrive in time
    try:
        settings = [
            SamplingParams(temperature=1.0, max_new_tokens=10),
            SamplingParams(temperature=0.5, max_new_tokens=10),
            SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=10),
            SamplingParams(temperature=0.0, max_new_tokens=10),
        ]
        prompts = [_prompt(base, t) for t in ("one", "two words", "three words here", "four words are here")]
        before = policy.stats["batches"]
        gens = await asyncio.gather(*(policy.generate(p, s) for p, s in zip(prompts, settings)))
        assert policy.stats["batches"] - before == 1  # one prefill for all four
        for p, s, g in zip(prompts, settings, gens):
            ref = _reference(base.model, p, g.token_ids, s)
            assert max(abs(a - b) for a, b in zip(g.logprobs, ref)) < 1e-4
        alone = await policy.generate(prompts[3], settings[3])
        assert gens[3].token_ids == alone.token_ids  # greedy
    finally:
        await policy.close()


async def test_logprobs_equal_the_learners_scoring(base):
    """Rows joining a running batch (different widths) and leaving it early (trimmed columns):
    the behaviour log-probs equal `token_logprobs` of the learner within 1e-4."""
    policy = HFPolicy(model=base.model, tokenizer=base.tokenizer, scheduler="continuous")
    try:
        temperature = 0.7
        long_prompt = _prompt(base, " ".join(f"word{i}" for i in range(40)))
        jobs = [(long_prompt, 3), (_prompt(base, "short"), 30), (_prompt(base, "a medium sized prompt"), 25)]
        first = [
            asyncio.create_task(policy.generate(p, SamplingParams(temperature=temperature, max_new_tokens=n)))
            for p, n in jobs
        ]
        await _until(lambda: policy.stats["steps"] >= 5)
        late_prompt = _prompt(base, "joins later with its own prompt")
        late = policy.generate(late_prompt, SamplingParams(temperature=temperature, max_new_tokens=12))
        gens = await asyncio.gather(*first, late)
        prompts = [p for p, _ in jobs] + [late_prompt]
        trajs = [
            Trajectory("p", "e", p, g.token_ids, [1] * len(g.token_ids), g.logprobs, 0.0) for p, g in zip(prompts, gens)
        ]
        b = pack(trajs, base.pad_id)
        with torch.no_grad():
            learner, _ = token_logprobs(base.model, b, temperature)
        m = b.mask > 0
        assert int(m.sum()) == sum(len(g.token_ids) for g in gens)
        assert torch.allclose(learner[m], b.old_logprobs[m], atol=1e-4)
    finally:
        await policy.close()


async def test_a_multi_turn_episode_scores_the_same_in_the_learner(base):
    from say_env import SayEnv
    from spo_agents.rollout.collector import run_episode

    policy = HFPolicy(model=base.model, tokenizer=base.tokenizer, scheduler="continuous")
    try:
        sampling = SamplingParams(temperature=0.8, max_new_tokens=12)
        trajs = await asyncio.gather(
            *(
                run_episode(SayEnv(), policy, f"test-{i}", sampling=sampling, max_episode_tokens=80, seed=i)
                for i in range(4)
            )
        )
        assert all(t.error is None for t in trajs) and any(len(t.turn_starts) == 2 for t in trajs)
        assert policy.stats["reused_tokens"] > 0  # later turns and problems reused cached prefixes
        b = pack(trajs, base.pad_id)
        with torch.no_grad():
            learner, _ = token_logprobs(base.model, b, 0.8)
        m = b.mask > 0
        assert torch.allclose(learner[m], b.old_logprobs[m], atol=1e-4)
    finally:
        await policy.close()


# --------------------------------------------------------------------------------------- seeds
async def test_a_seeded_request_samples_the_same_alone_and_in_a_batch(base):
    policy = HFPolicy(model=base.model, tokenizer=base.tokenizer, prefix_cache_tokens=0, scheduler="continuous")
    try:
        prompt = _prompt(base, "seeded prompt")
        params = SamplingParams(max_new_tokens=16, seed=5)
        alone = await policy.generate(prompt, params)
        again = await policy.generate(prompt, params)
        assert again.token_ids == alone.token_ids and again.logprobs == alone.logprobs  # alone: bit for bit
        other = SamplingParams(max_new_tokens=24)
        others = [asyncio.create_task(policy.generate(_prompt(base, f"other prompt {i}"), other)) for i in range(3)]
        await _until(lambda: policy.stats["steps"] >= 2)
        batched = await policy.generate(prompt, params)
        await asyncio.gather(*others)
        assert batched.token_ids == alone.token_ids
        assert max(abs(a - b) for a, b in zip(batched.logprobs, alone.logprobs)) < 1e-4
    finally:
        await policy.close()

    cached = HFPolicy(
        model=base.model, tokenizer=base.tokenizer, scheduler="continuous"
    )  # the second run reuses the first's prompt
    try:
        first = await cached.generate(prompt, params)
        second = await cached.generate(prompt, params)
        assert cached.stats["reused_tokens"] == len(prompt) - 1
        assert first.token_ids == second.token_ids == alone.token_ids
        assert max(abs(a - b) for a, b in zip(second.logprobs, alone.logprobs)) < 1e-4
    finally:
        await cached.close()


# ------------------------------------------------------------------------------- prefix reuse
async def test_the_next_turn_computes_only_its_new_tokens(base):
    policy = HFPolicy(model=base.model, tokenizer=base.tokenizer, scheduler="continuous")
    try:
        params = SamplingParams(temperature=0.9, max_new_tokens=10)
        first_prompt = _prompt(base, "The first turn of an episode")
        first = await policy.generate(first_prompt, params)
        reply = _prompt(base, " and the tool replied: 42.")
        prompt = first_prompt + first.token_ids + reply
        before = dict(policy.stats)
        second = await policy.generate(prompt, params)
        # cached: the first prompt and every sampled token but the last (never fed to the model)
        assert policy.stats["reused_tokens"] - before["reused_tokens"] == len(first_prompt) + len(first.token_ids) - 1
        assert policy.stats["prefill_tokens"] - before["prefill_tokens"] == len(reply) + 1
        ref = _reference(base.model, prompt, second.token_ids, params)
        assert max(abs(a - b) for a, b in zip(second.logprobs, ref)) < 1e-4
    finally:
        await policy.close()


async def test_another_problem_reuses_the_shared_start_of_the_prompt(base):
    policy = HFPolicy(model=base.model, tokenizer=base.tokenizer, scheduler="continuous")
    try:
        shared = _prompt(base, "You are a helpful assistant. Here is an example: 1 + 1 = 2. Now solve:")
        a, b = shared + _prompt(base, " 3 * 4"), shared + _prompt(base, " 7 - 9")
        common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        params = SamplingParams(temperature=0.9, max_new_tokens=6)
        await policy.generate(a, params)
        before = dict(policy.stats)
        g = await policy.generate(b, params)
        assert policy.stats["reused_tokens"] - before["reused_tokens"] == common
        assert policy.stats["prefill_tokens"] - before["prefill_tokens"] == len(b) - common
        ref = _reference(base.model, b, g.token_ids, params)
        assert max(abs(x - y) for x, y in zip(g.logprobs, ref)) < 1e-4
    finally:
        await policy.close()


async def test_prompts_arriving_together_compute_their_shared_start_once(base):
    policy = HFPolicy(
        model=base.model, tokenizer=base.tokenizer, batch_wait_s=0.2, scheduler="continuous"
    )  # all four arrive in time
    try:
        shared = _prompt(base, " ".join(f"rule {i}." for i in range(20)))  # well over 32 tokens
        prompts = [shared + _prompt(base, f" Question {q}: what is {q} + {q}?") for q in "ABCD"]
        common = min(next(i for i, (x, y) in enumerate(zip(prompts[0], p)) if x != y) for p in prompts[1:])
        assert common >= len(shared) - 1
        params = SamplingParams(temperature=0.9, max_new_tokens=4)
        gens = await asyncio.gather(*(policy.generate(p, params) for p in prompts))
        # the first goes alone; the other three reuse at least the shared start
        assert policy.stats["batches"] == 2
        assert policy.stats["reused_tokens"] >= 3 * common
        assert policy.stats["prefill_tokens"] <= len(prompts[0]) + sum(len(p) - common for p in prompts[1:])
        for p, g in zip(prompts, gens):
            ref = _reference(base.model, p, g.token_ids, params)
            assert max(abs(x - y) for x, y in zip(g.logprobs, ref)) < 1e-4
    finally:
        await policy.close()


async def test_a_running_request_s_prompt_is_reusable_at_once(base):
    policy = _steered(base)
    try:
        first = _prompt(base, "A prompt that is still being answered while the next one arrives")
        running = asyncio.create_task(policy.generate(first, SamplingParams(max_new_tokens=100)))
        await _until(lambda: policy.stats["steps"] >= 2)
        second = first[:10] + _prompt(base, " different ending")
        common = next(i for i, (x, y) in enumerate(zip(first, second)) if x != y)
        await policy.generate(second, SamplingParams(max_new_tokens=3))
        assert policy.stats["reused_tokens"] == common
        assert not running.done()
        running.cancel()
    finally:
        await policy.close()


async def test_nothing_cached_before_a_pause_is_reused_after_it(base):
    policy = HFPolicy(model=base.model, tokenizer=base.tokenizer, scheduler="continuous")
    try:
        prompt = _prompt(base, "cached before the update")
        params = SamplingParams(max_new_tokens=5)
        await policy.generate(prompt, params)
        await policy.pause()  # the learner would change the weights here
        policy.resume()
        before = dict(policy.stats)
        await policy.generate(prompt, params)
        assert policy.stats["reused_tokens"] == before["reused_tokens"]
        assert policy.stats["prefill_tokens"] - before["prefill_tokens"] == len(prompt)
    finally:
        await policy.close()


def test_the_prefix_cache_keeps_the_longest_match_within_its_budget():
    from spo_agents.rollout.policy.hf_kv import Prefix, PrefixCache

    def entry(tokens, epoch=0):
        kv = [torch.zeros(1, len(tokens), 2)]
        return Prefix(torch.tensor(tokens), kv, kv, epoch)

    cache = PrefixCache(max_tokens=10)
    cache.add(entry([1, 2, 3]))
    cache.add(entry([1, 2, 3, 4, 5]))  # extends the first: replaces it
    assert [e.tokens.tolist() for e in cache.entries.values()] == [[1, 2, 3, 4, 5]]
    cache.add(entry([1, 2, 9, 9]))
    e, n = cache.lookup([1, 2, 3, 4, 7], epoch=0)
    assert e.tokens.tolist() == [1, 2, 3, 4, 5] and n == 4
    e, n = cache.lookup([1, 2, 3, 4, 5], epoch=0)
    assert n == 4  # the last prompt token is always computed
    e, n = cache.lookup([1, 2, 9, 9, 9], epoch=0)
    assert e.tokens.tolist() == [1, 2, 9, 9] and n == 4
    cache.add(entry([7, 7, 7]))  # 5 + 4 + 3 > 10: the least recently used ([1..5]) goes
    assert sorted(e.tokens.tolist()[0] for e in cache.entries.values()) == [1, 7]
    assert cache.lookup([5, 5], epoch=0) == (None, 0)
    assert cache.lookup([7, 7, 7, 7], epoch=1)[0] is None  # from before a pause: dropped
    assert not cache.entries


# ------------------------------------------------------------------------- pause and versions
async def test_pause_drains_the_batch_and_holds_new_requests_until_resume(base):
    policy = _steered(base)
    try:
        running = asyncio.create_task(policy.generate(_prompt(base, "long"), SamplingParams(max_new_tokens=200)))
        await _until(lambda: policy.stats["steps"] >= 2)
        await policy.pause()
        assert running.done() and len(running.result().token_ids) == 200  # drained, not cut short
        held_at = policy.stats["steps"]
        queued = asyncio.create_task(policy.generate(_prompt(base, "queued"), SamplingParams(max_new_tokens=3)))
        await asyncio.sleep(0.3)
        assert policy.stats["steps"] == held_at and not queued.done()  # nothing runs while paused
        policy.resume(3)
        g, q = running.result(), await queued
        assert g.policy_version == 0 and g.info["policy_version_last"] == 0
        assert q.policy_version == 3 and q.info["policy_version_last"] == 3
    finally:
        await policy.close()


async def test_close_fails_the_requests_in_flight(base):
    policy = _steered(base)
    running = asyncio.create_task(policy.generate(_prompt(base, "long"), SamplingParams(max_new_tokens=5000)))
    await _until(lambda: policy.stats["steps"] >= 2)
    await policy.close()
    with pytest.raises(PolicyError, match="closed"):
        await running


# ------------------------------------------------------------------------------------- sampler
def test_the_inverse_cdf_draw_picks_the_first_token_whose_cumulative_mass_exceeds_u():
    from spo_agents.rollout.policy.hf_sampling import inverse_cdf

    probs = torch.zeros(2, 1000)
    probs[0, [3, 300, 301, 999]] = torch.tensor([0.5, 0.25, 0.125, 0.125])
    probs[1, 700] = 1.0
    cases = [(0.0, 3), (0.4999, 3), (0.5, 300), (0.7499, 300), (0.75, 301), (0.875, 999), (1 - 1e-15, 999)]
    for u, want in cases:
        got = inverse_cdf(probs, torch.tensor([u, u], dtype=torch.float64), block=64).tolist()
        assert got == [want, 700], u
    # unnormalised rows are scaled by their total; zero-probability entries are never drawn
    rng = torch.Generator().manual_seed(0)
    weights = torch.rand(3, 5000, generator=rng) * (torch.rand(3, 5000, generator=rng) < 0.01)
    u = torch.rand(3, dtype=torch.float64, generator=rng)
    got = inverse_cdf(weights, u)
    cdf = weights.double().cumsum(-1)
    want = [int((cdf[i] > u[i] * cdf[i, -1]).nonzero()[0]) for i in range(3)]
    assert got.tolist() == want and all(weights[i, t] > 0 for i, t in enumerate(want))
