"""Rollout workers on Ray: a local cluster on loopback, two actors, episodes against a real
OpenAI-compatible server (`transformers serve` on the tiny model), and actors killed mid-run."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from spo_agents.errors import RolloutError
from spo_agents.models import tiny_model_dir
from spo_agents.rollout.policy.base import SamplingParams

ray = pytest.importorskip("ray", reason="the `ray` extra is not installed")
pytestmark = pytest.mark.ray

TESTS = Path(__file__).parent
SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=8)


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster on loopback for the module; the actors import `say_env` from tests/."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), old]))
    # Ray kills workers when the node's memory is 95% used; on a shared test machine that is other
    # processes' memory, so the monitor is off here (the kernel's OOM killer still applies)
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        yield
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def _spec(base_url: str, model: str, **env_kwargs):
    from spo_agents.rollout.workers import WorkerSpec

    return WorkerSpec(
        env_id="say_env:SayEnv",
        model=model,
        policy_kwargs={"base_url": base_url, "tokenizer": str(tiny_model_dir()), "max_retries": 1},
        split="test",
        # no stop strings: `transformers serve` is slow to prepare them
        env_kwargs={"num_problems": 6, "stop": [], **env_kwargs},
    )


def _run(coro):
    return asyncio.run(coro)


def test_episodes_run_on_both_actors_and_carry_the_pushed_version(ray_cluster, served_model):
    from spo_agents.rollout.workers import RayWorkers

    workers = RayWorkers(_spec(*served_model), n=2, num_cpus=1)

    async def go():
        await workers.connect()
        first = await asyncio.gather(
            *(workers.run_episode(f"test-{i}", sampling=SAMPLING, max_episode_tokens=24, seed=i) for i in range(4))
        )
        await workers.pause()
        workers.resume(3)
        second = await asyncio.gather(
            *(workers.run_episode("test-1", sampling=SAMPLING, max_episode_tokens=24, seed=100 + i) for i in range(2))
        )
        await workers.close()
        return first, second

    first, second = _run(go())
    assert [t.error for t in first + second] == [None] * 6
    assert [t.problem_id for t in first] == [f"test-{i}" for i in range(4)]
    assert {t.info["rollout_worker"] for t in first} == {0, 1}
    assert all(t.token_ids and t.env_id == "say_env:SayEnv" for t in first)
    assert {t.policy_version for t in first} == {0}
    assert {t.policy_version for t in second} == {3}


def test_a_killed_actor_loses_only_its_episodes_and_the_last_one_stops_the_run(ray_cluster, served_model):
    from spo_agents.rollout.workers import RayWorkers

    workers = RayWorkers(_spec(*served_model), n=2, num_cpus=1)

    async def go():
        await workers.connect()
        victim = workers.handles[0]
        # long episodes, four per actor, then the first actor is killed while they run
        running = [
            asyncio.create_task(workers.run_episode(f"test-{i}", sampling=SAMPLING, max_episode_tokens=400, seed=i))
            for i in range(6)
        ] + [
            asyncio.create_task(workers.run_episode("test-0", sampling=SAMPLING, max_episode_tokens=400, seed=9)),
            asyncio.create_task(workers.run_episode("test-1", sampling=SAMPLING, max_episode_tokens=400, seed=10)),
        ]
        await asyncio.sleep(0)  # every task has sent its episode to an actor (placement is synchronous)
        ray.kill(victim)  # at once: on an idle machine the victim's episodes could finish within 0.5 s
        done = await asyncio.gather(*running)
        after = await asyncio.gather(
            *(workers.run_episode("test-2", sampling=SAMPLING, max_episode_tokens=24, seed=50 + i) for i in range(3))
        )
        alive_after_one = workers.alive
        ray.kill(workers.handles[0])
        lost = await workers.run_episode("test-3", sampling=SAMPLING, max_episode_tokens=24, seed=99)
        with pytest.raises(RolloutError, match="every rollout worker"):
            await workers.run_episode("test-4", sampling=SAMPLING, max_episode_tokens=24, seed=100)
        await workers.close()
        return done, after, alive_after_one, lost

    done, after, alive_after_one, lost = _run(go())
    failed = [t for t in done if t.error is not None]
    # the victim had every other episode (least-busy placement alternates): those four are lost,
    # as infrastructure errors with no tokens; the survivor's four finish
    assert len(failed) == 4
    assert all("rollout worker 0 died" in t.error and not t.token_ids for t in failed)
    assert all(t.error is None and t.info["rollout_worker"] == 1 for t in done if t not in failed)
    assert [t.error for t in after] == [None] * 3 and {t.info["rollout_worker"] for t in after} == {1}
    assert alive_after_one == 1
    assert lost.error is not None and "rollout worker 1 died" in lost.error


def test_the_collector_streams_from_the_actors_and_reruns_a_dead_actors_episodes(ray_cluster, served_model):
    """The training path: `Collector` with `RayWorkers` as its runner. Four-turn episodes, eight at
    once (four per actor); actor 0 is killed while its four run; the first two to finish come back
    while the rest run on."""
    from spo_agents.rollout.collector import Collector
    from spo_agents.rollout.policy import make_policy
    from spo_agents.rollout.workers import RayWorkers
    from spo_agents.serving.weight_sync import publish

    base_url, model = served_model
    spec = _spec(base_url, model, num_problems=8, turns=4)
    workers = RayWorkers(spec, n=2, num_cpus=1)
    learner = make_policy("openai", model, **spec.policy_kwargs)
    problems = [f"test-{i}" for i in range(8)]

    async def go():
        c = Collector(None, learner, runner=workers, max_in_flight=8, sampling=SAMPLING, max_episode_tokens=400)
        await workers.connect()
        c.submit(problems)
        await asyncio.sleep(0.5)  # every episode is in its first turn
        ray.kill(workers.handles[0])
        first = await c.next_batch(2)
        streaming = (c.in_flight, c.outstanding)
        rest = await c.next_batch(6)
        settled = (c.outstanding, c.busy_problems, c.stats.resubmitted, c.take_failed())
        await publish(c, None, None, 1)
        c.submit(["test-0", "test-1"])
        later = await c.next_batch(2)
        ray.kill(workers.handles[0])
        c.submit(["test-2"])
        with pytest.raises(RolloutError, match="every rollout worker"):
            await c.next_batch(1)
        await c.close()
        await learner.close()
        return first, streaming, rest, settled, later

    first, streaming, rest, settled, later = _run(go())
    assert len(first) == 2 and streaming[0] >= 1 and streaming[1] == 6  # no barrier: the others still run
    batch = first + rest
    assert sorted(t.problem_id for t in batch) == problems  # each problem once: the lost ones were rerun
    assert all(t.error is None and t.token_ids for t in batch)
    outstanding, busy, resubmitted, failed = settled
    assert outstanding == 0 and busy == []
    # actor 0 had four episodes running (least-busy placement alternates): each came back lost and
    # ran again on actor 1
    assert resubmitted == 4 and len(failed) == 4
    assert all("rollout worker 0 died" in t.error and t.info["lost_with_worker"] == 0 for t in failed)
    rerun = {t.problem_id for t in failed}
    assert {t.info["rollout_worker"] for t in rest if t.problem_id in rerun} == {1}
    assert [t.policy_version for t in later] == [1, 1] and {t.info["rollout_worker"] for t in later} == {1}


def test_grpo_groups_come_back_whole_from_the_actors_when_one_dies(ray_cluster, served_model):
    """Grouped delivery (the GRPO comparison) through Ray: two problems, four samples each, spread
    over both actors; actor 0 is killed while they run. Each group is delivered whole, with every
    sample index once, the lost members run again on the other actor."""
    from spo_agents.rollout.collector import Collector
    from spo_agents.rollout.policy import make_policy
    from spo_agents.rollout.workers import RayWorkers

    base_url, model = served_model
    spec = _spec(base_url, model, num_problems=2, turns=3)
    workers = RayWorkers(spec, n=2, num_cpus=1)
    learner = make_policy("openai", model, **spec.policy_kwargs)

    async def go():
        c = Collector(
            None, learner, runner=workers, max_in_flight=8, sampling=SAMPLING, max_episode_tokens=400, group_size=4
        )
        await workers.connect()
        c.submit(["test-0", "test-1"])
        assert c.in_flight == 8  # eight episode tasks, not started yet
        await asyncio.sleep(0)  # each has sent its episode to an actor (placement is synchronous)
        ray.kill(workers.handles[0])
        batch = await c.next_batch(8)
        lost = c.take_failed()
        await c.close()
        await learner.close()
        return batch, lost

    batch, lost = _run(go())
    groups: dict = {}
    for t in batch:
        groups.setdefault(t.group_id, []).append(t)
    assert len(batch) == 8 and len(groups) == 2
    for members in groups.values():
        assert len({t.problem_id for t in members}) == 1
        assert sorted(t.sample_index for t in members) == [0, 1, 2, 3]
        assert all(t.error is None and t.token_ids for t in members)
    assert lost and all("rollout worker 0 died" in t.error for t in lost)
    rerun = {(t.group_id, t.sample_index) for t in lost}
    assert {t.info["rollout_worker"] for t in batch if (t.group_id, t.sample_index) in rerun} == {1}
