"""The collector with an episode runner of its own (what `rollout.workers: ray` plugs in): lost
episodes are counted and run again, groups stay whole, publishing reaches the runner, and a runner
that cannot go on stops the collection. A scripted runner stands in for the Ray actors here;
tests/test_ray_collector.py runs the real ones."""

from __future__ import annotations

import asyncio

import pytest

from spo_agents.errors import ConfigError, RolloutError
from spo_agents.rollout.collector import Collector
from spo_agents.rollout.policy.base import PolicyBackend, SamplingParams
from spo_agents.rollout.runner import LOST_WITH_WORKER
from spo_agents.serving.weight_sync import publish
from spo_agents.types import Trajectory


class LearnerClient(PolicyBackend):
    """The learner's own client: only its version and gate matter to the collector."""

    @property
    def tokenizer(self):
        return None

    async def generate(self, prompt_ids, params):
        raise AssertionError("the collector must not generate with the learner's client when it has a runner")

    async def connect(self):
        return None


class ScriptedRunner:
    """Plays episodes after a per-problem delay, stamped with its own version; the first attempt of
    each problem in `lose` comes back lost with worker 0."""

    def __init__(self, delays: dict[str, float], lose: set[str] = frozenset(), raise_after: int | None = None):
        self.delays, self.lose = delays, set(lose)
        self.raise_after = raise_after
        self.version = 0
        self.served_model = None
        self.calls: list[str] = []
        self.events: list[str] = []
        self.closed = 0

    async def run_episode(self, problem_id, *, sampling, max_episode_tokens, seed):
        self.calls.append(problem_id)
        if self.raise_after is not None and len(self.calls) > self.raise_after:
            raise RolloutError("every rollout worker (2) has died")
        await asyncio.sleep(self.delays[problem_id])
        version = self.version
        if problem_id in self.lose:
            self.lose.discard(problem_id)
            return _trajectory(problem_id, version, error="RolloutError: worker 0 died", info={LOST_WITH_WORKER: 0})
        return _trajectory(problem_id, version)

    async def pause(self):
        self.events.append("pause")

    def resume(self, version):
        self.events.append(f"resume {version}")
        self.version = version

    def set_served_model(self, name):
        self.served_model = name

    async def close(self):
        self.closed += 1


def _trajectory(problem_id: str, version: int, error: str | None = None, info: dict | None = None) -> Trajectory:
    tokens = [] if error else [2, 3]
    return Trajectory(
        problem_id=problem_id,
        env_id="scripted",
        prompt_ids=[1],
        token_ids=tokens,
        loss_mask=[1] * len(tokens),
        logprobs=[-0.5] * len(tokens),
        reward=0.0 if error else 1.0,
        policy_version=version,
        policy_versions=[] if error else [version],
        info=info or {},
        error=error,
    )


def _collector(runner, policy=None, **kw) -> Collector:
    return Collector(None, policy or LearnerClient(), runner=runner, sampling=SamplingParams(max_new_tokens=4), **kw)


async def test_lost_episodes_are_counted_and_run_again_without_duplicates():
    delays = {f"p{i}": 0.01 * (i + 1) for i in range(6)}
    runner = ScriptedRunner(delays, lose={"p1", "p3"})
    c = _collector(runner, max_in_flight=6)
    c.submit(list(delays))
    batch = await c.next_batch(6)
    assert sorted(t.problem_id for t in batch) == sorted(delays)  # every problem once, lost ones rerun
    assert all(t.error is None for t in batch)
    assert sorted(runner.calls) == sorted([*delays, "p1", "p3"])
    assert (c.stats.errors, c.stats.resubmitted, c.stats.delivered) == (2, 2, 6)
    failed = c.take_failed()
    assert sorted(t.problem_id for t in failed) == ["p1", "p3"] and all(LOST_WITH_WORKER in t.info for t in failed)
    assert c.outstanding == 0 and c.busy_problems == []
    await c.close()
    assert runner.closed == 1


async def test_a_lost_episode_keeps_its_problem_in_flight_until_rerun():
    runner = ScriptedRunner({"p0": 0.01, "p1": 0.2}, lose={"p0"})
    c = _collector(runner, max_in_flight=2)
    c.submit(["p0", "p1"])
    first = await c.next_batch(1)  # p0 is lost once, rerun, and still finishes first
    assert [t.problem_id for t in first] == ["p0"] and first[0].error is None
    assert c.busy_problems == ["p1"] and c.outstanding == 1 and c.in_flight == 1  # p1 streams on
    await c.close()


async def test_grouped_mode_keeps_a_group_whole_when_a_member_is_lost():
    runner = ScriptedRunner({"p0": 0.01}, lose={"p0"})
    c = _collector(runner, max_in_flight=3, group_size=3)
    c.submit(["p0"])
    batch = await c.next_batch(3)
    assert [t.sample_index for t in batch] == [0, 1, 2] and all(t.error is None for t in batch)
    assert len({t.group_id for t in batch}) == 1 and c.stats.resubmitted == 1
    await c.close()


async def test_publishing_through_the_collector_reaches_the_learner_client_and_the_runner():
    runner = ScriptedRunner({"p0": 0.01, "p1": 0.01})
    learner = LearnerClient()
    c = _collector(runner, learner, max_in_flight=2, max_staleness=0)
    c.submit(["p0"])
    assert [t.policy_version for t in await c.next_batch(1)] == [0]
    await publish(c, None, None, 4)
    c.set_served_model("adapter-4")
    assert learner.version == 4 and runner.version == 4 and runner.events == ["pause", "resume 4"]
    assert runner.served_model == "adapter-4"
    c.submit(["p1"])
    assert [t.policy_version for t in await c.next_batch(1)] == [4]  # not stale against the learner's 4
    await c.close()


async def test_a_runner_that_cannot_go_on_stops_the_collection():
    runner = ScriptedRunner({f"p{i}": 0.01 for i in range(3)}, raise_after=1)
    c = _collector(runner, max_in_flight=1)
    c.submit(["p0", "p1", "p2"])
    with pytest.raises(RolloutError, match="every rollout worker"):
        await c.next_batch(3)
    await c.close()


@pytest.mark.parametrize("with_env", [True, False])
def test_a_collector_needs_exactly_one_of_env_factory_and_runner(with_env):
    runner = ScriptedRunner({}) if with_env else None
    with pytest.raises(ConfigError, match="exactly one of `env_factory`"):
        Collector((lambda: None) if with_env else None, LearnerClient(), runner=runner)


async def test_an_environment_that_cannot_be_built_stops_the_local_collection_with_its_error():
    from spo_agents.errors import PluginError

    def broken():
        raise ValueError("no such data file: problems.jsonl")

    c = Collector(broken, LearnerClient(), max_in_flight=1)
    c.submit(["p0"])
    with pytest.raises(PluginError, match="creating an environment failed: ValueError: no such data file"):
        await c.next_batch(1)
    await c.close()
