"""Which problems the trainer submits: never one that is still in flight while the pool allows it.

The collector owns the record of unsettled submissions; every episode that is delivered, dropped
as stale, failed or cancelled settles its submission. These tests drive the real `Trainer._refill`
and `Collector` with a scripted policy whose episodes finish in random order, fail at random and
go stale when the policy version moves.
"""

from __future__ import annotations

import asyncio
import collections
import random

import pytest
from training_fixtures import FirstTokenEnv, tiny_config

from spo_agents.errors import PolicyError
from spo_agents.rollout.policy.base import Generation, PolicyBackend
from spo_agents.training.loop import Components, Trainer


class RandomPolicy(PolicyBackend):
    """Answers after a random delay, fails a share of calls; one token per answer."""

    def __init__(self, tokenizer, rng: random.Random, fail_rate: float) -> None:
        super().__init__()
        self._tok, self.rng, self.fail_rate = tokenizer, rng, fail_rate

    @property
    def tokenizer(self):
        return self._tok

    async def generate(self, prompt_ids, params):
        await asyncio.sleep(self.rng.random() * 0.004)
        if self.rng.random() < self.fail_rate:
            raise PolicyError("scripted failure")
        return Generation([self._tok.eos_token_id], [-0.1], "x", "stop", policy_version=self.version)


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spo_agents.models import tiny_model_dir

    path = tiny_model_dir()
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _trainer(tmp_path, tiny, *, pool: int, batch: int, oversample: float, fail_rate: float, seed: int, group: int = 1):
    model, tok = tiny
    policy = RandomPolicy(tok, random.Random(seed), fail_rate)
    comp = Components(model, tok, policy, lambda split: FirstTokenEnv(n=pool, split=split), inplace=False)
    algo = {"name": "grpo", "group_size": group} if group > 1 else {}
    cfg = tiny_config(
        tmp_path,
        rollout={"max_in_flight": 6, "oversample": oversample, "max_staleness": 0},
        train={"batch_size": batch, "seed": seed},
        algorithm=algo,
        sampler={"type": "uniform"} if group > 1 else {},
    )
    t = Trainer(cfg, tmp_path / f"run-{seed}", comp)
    t._setup()
    return t, policy


def _check_no_duplicates_while_the_pool_allows(trainer, pool: int) -> None:
    unsettled = collections.Counter(trainer.collector._unsettled)
    units = sum(unsettled.values())
    # each problem at most once while there are at most `pool` submissions, and evenly beyond
    assert max(unsettled.values(), default=0) <= -(-units // pool), unsettled


async def _drive(trainer, policy, pool: int, steps: int, rng: random.Random) -> None:
    c = trainer.collector
    for _ in range(steps):
        trainer._refill()
        _check_no_duplicates_while_the_pool_allows(trainer, pool)
        batch = await c.next_batch(trainer.cfg.train.batch_size)
        units = {(t.problem_id, t.group_id) for t in batch}
        if len(units) <= pool:  # one batch holds a problem twice only when it needs more than the pool
            assert len({pid for pid, _ in units}) == len(units), sorted(units)
        if rng.random() < 0.5:
            policy.version += 1  # what is still in flight now goes stale (max_staleness 0)
        if rng.random() < 0.2:
            await c.cancel()
        if trainer.group_size == 1:  # the collector's record equals what is really unsettled
            assert c.outstanding == c.pending + c.in_flight + c.ready


@pytest.mark.parametrize("seed", range(12))
async def test_refill_never_draws_a_problem_in_flight_with_oversampling_stale_drops_and_failures(tmp_path, tiny, seed):
    trainer, policy = _trainer(tmp_path, tiny, pool=40, batch=8, oversample=2.0, fail_rate=0.2, seed=seed)
    try:
        await _drive(trainer, policy, 40, 8, random.Random(seed))
        st = trainer.collector.stats
        assert st.dropped_stale + st.errors > 0  # the faults really happened
    finally:
        await trainer.collector.close()


@pytest.mark.parametrize("seed", range(4))
async def test_over_sampling_stops_at_the_pool_size(tmp_path, tiny, seed):
    # 10 problems, 16 episodes wanted: 10 run, each problem once
    trainer, policy = _trainer(tmp_path, tiny, pool=10, batch=8, oversample=2.0, fail_rate=0.1, seed=seed)
    try:
        trainer._refill()
        assert trainer.collector.outstanding == 10 and len(set(trainer.collector.busy_problems)) == 10
        await _drive(trainer, policy, 10, 6, random.Random(seed))
    finally:
        await trainer.collector.close()


@pytest.mark.parametrize("seed", range(4))
async def test_a_batch_larger_than_the_pool_repeats_problems_evenly(tmp_path, tiny, seed):
    trainer, policy = _trainer(tmp_path, tiny, pool=5, batch=8, oversample=1.5, fail_rate=0.1, seed=seed)
    try:
        trainer._refill()
        assert sorted(collections.Counter(trainer.collector._unsettled).values()) == [1, 1, 2, 2, 2]
        await _drive(trainer, policy, 5, 6, random.Random(seed))
    finally:
        await trainer.collector.close()


async def test_grouped_mode_submits_distinct_problems(tmp_path, tiny):
    trainer, policy = _trainer(tmp_path, tiny, pool=12, batch=8, oversample=1.5, fail_rate=0.1, seed=3, group=4)
    try:
        await _drive(trainer, policy, 12, 6, random.Random(3))
    finally:
        await trainer.collector.close()
