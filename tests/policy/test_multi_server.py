"""`MultiServerPolicy`: one policy over several servers (routing, stickiness, failures, re-admission).

The servers are `FaultProxy`s (tests/fault_proxy.py) in front of one real `transformers serve` on
the tiny model (`served_model`, tests/conftest.py): each proxy is a server with its own URL that
can be killed and started again, and that answers vLLM's `GET /weight_info` with a weight label
set by the test (`weight_label`), as a weight push would set it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from fault_proxy import FaultProxy

from say_env import SayEnv
from spo_agents.errors import NoServerLeft, PolicyError, ServerLost
from spo_agents.models import tiny_model_dir
from spo_agents.rollout.episode import run_episode
from spo_agents.rollout.policy import make_policy
from spo_agents.rollout.policy.base import Generation, PolicyBackend, SamplingParams, Session
from spo_agents.rollout.policy.multi import MultiServerPolicy
from spo_agents.rollout.policy.openai import OpenAIPolicy

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=2)
PROMPT = [1, 2, 3]


@pytest.fixture
def proxies(served_model):
    made: list[FaultProxy] = []

    def make(n: int = 2, **kw) -> list[FaultProxy]:
        upstream = int(served_model[0].rsplit(":", 1)[1].split("/")[0])
        made.extend(FaultProxy(upstream, rate=kw.pop("rate", 0.0), **kw).start() for _ in range(n))
        return made[-n:]

    yield make
    for p in made:
        p.stop()


@pytest.fixture
async def pool_of(served_model):
    policies: list[MultiServerPolicy] = []

    async def make(proxies: list[FaultProxy]) -> MultiServerPolicy:
        _, model = served_model
        policy = make_policy(
            "openai",
            model,
            base_url=[p.base_url for p in proxies],
            tokenizer=model,
            mode="text",
            max_retries=0,
            backoff_s=0.05,
            recheck_s=0.1,
            request_timeout_s=60,
        )
        policies.append(policy)
        await policy.connect()
        return policy

    yield make
    for policy in policies:
        await policy.close()


def server_of(gen) -> str:
    return gen.info["server"]


def test_a_list_of_base_urls_gives_a_multi_server_policy_and_one_url_a_plain_client():
    model = "tiny-random"
    assert isinstance(make_policy("openai", model, base_url=["http://a:1/v1", "http://b:1/v1"]), MultiServerPolicy)
    assert isinstance(make_policy("openai", model, base_url=["http://a:1/v1"]), OpenAIPolicy)
    with pytest.raises(PolicyError, match="distinct base URLs.*repeated: `http://a:1/v1`"):
        make_policy("openai", model, base_url=["http://a:1/v1", "http://a:1/v1/"])


async def test_a_session_goes_to_the_server_with_the_fewest_outstanding_requests(proxies, pool_of):
    slow, fast = proxies(2)
    policy = await pool_of([slow, fast])
    slow.rate, slow.kinds, slow.delay_s = 1.0, ("delay",), 4.0  # every request to it now waits 4 s
    first = asyncio.create_task(policy.session().generate(PROMPT, GREEDY))
    await asyncio.sleep(0.1)  # it has picked a server (ties: the first) and is waiting for it
    others = [await policy.session().generate(PROMPT, GREEDY) for _ in range(3)]
    assert server_of(await first) == slow.base_url
    # the slow server had one request outstanding each time: a rotation would have sent one there
    assert [server_of(g) for g in others] == [fast.base_url] * 3


async def test_an_episodes_turns_stay_on_the_server_its_first_turn_went_to(proxies, pool_of):
    a, b = proxies(2)
    policy = await pool_of([a, b])
    s1, s2 = policy.session(), policy.session()
    turns = [await asyncio.gather(s1.generate(PROMPT, GREEDY), s2.generate(PROMPT, GREEDY)) for _ in range(3)]
    first = {server_of(g1) for g1, _ in turns}
    second = {server_of(g2) for _, g2 in turns}
    assert len(first) == len(second) == 1 and first != second  # sticky, and the two spread over both


async def test_a_dead_server_is_taken_out_and_a_session_that_had_not_started_moves_on(proxies, pool_of, caplog):
    a, b = proxies(2)
    policy = await pool_of([a, b])
    a.kill()
    with caplog.at_level(logging.WARNING):
        gen = await policy.session().generate(PROMPT, GREEDY)  # picked `a` (ties: the first), moved to `b`
    assert server_of(gen) == b.base_url
    assert not policy.servers[0].live and policy.servers[1].live
    assert f"policy server {a.base_url} taken out of rotation" in caplog.text
    assert [server_of(await policy.session().generate(PROMPT, GREEDY)) for _ in range(2)] == [b.base_url] * 2


async def test_a_session_whose_server_dies_mid_episode_is_not_continued_elsewhere(proxies, pool_of):
    a, b = proxies(2)
    policy = await pool_of([a, b])
    session = policy.session()
    assert server_of(await session.generate(PROMPT, GREEDY)) == a.base_url
    a.kill()
    with pytest.raises(ServerLost, match=f"`{a.base_url}` left rotation during an episode"):
        await session.generate(PROMPT + [4], GREEDY)
    assert server_of(await policy.session().generate(PROMPT, GREEDY)) == b.base_url


async def test_with_no_server_left_generation_stops_with_an_error_naming_each(proxies, pool_of):
    a, b = proxies(2)
    policy = await pool_of([a, b])
    a.kill()
    b.kill()
    with pytest.raises(NoServerLeft, match="every policy server is out of rotation") as e:
        await policy.session().generate(PROMPT, GREEDY)
    assert a.base_url in str(e.value) and b.base_url in str(e.value)
    assert not isinstance(e.value, PolicyError)  # not one episode's infrastructure error: it stops the run


async def test_a_server_that_comes_back_is_taken_in_only_after_health_and_a_push_of_the_current_weights(
    proxies, pool_of
):
    a, b = proxies(2, weight_label="default")
    policy = await pool_of([a, b])
    a.kill()
    assert server_of(await policy.session().generate(PROMPT, GREEDY)) == b.base_url  # `a` is out
    await policy.pause()
    b.weight_label = "1"  # version 1 pushed to `b` only
    policy.resume(1)
    assert await policy.recheck() == [] and not policy.servers[0].live  # `a` does not answer /health
    a.start()  # restarted: healthy, with the weights it started with
    assert await policy.recheck() == [] and not policy.servers[0].live
    a.weight_label = "1"  # the next push reached it
    assert [s.url for s in await policy.recheck()] == [a.base_url] and policy.servers[0].live
    gens = await asyncio.gather(*(policy.session().generate(PROMPT, GREEDY) for _ in range(2)))
    assert {server_of(g) for g in gens} == {a.base_url, b.base_url}
    assert [g.policy_version for g in gens] == [1, 1]


async def test_each_generation_carries_its_servers_version_and_a_server_that_missed_a_push_is_taken_out(
    proxies, pool_of
):
    a, b = proxies(2, weight_label="default")
    policy = await pool_of([a, b])
    gens = await asyncio.gather(*(policy.session().generate(PROMPT, GREEDY) for _ in range(2)))
    assert {server_of(g) for g in gens} == {a.base_url, b.base_url} and {g.policy_version for g in gens} == {0}
    await policy.pause()
    a.weight_label = "2"  # the push of version 2 reached `a` only; `b` still serves its first weights
    policy.resume(2)
    gens = await asyncio.gather(*(policy.session().generate(PROMPT, GREEDY) for _ in range(2)))
    assert [(server_of(g), g.policy_version) for g in gens] == [(a.base_url, 2)] * 2
    assert not policy.servers[1].live and "serves weights `default`, not version 2" in policy.servers[1].reason
    assert policy.servers[0].gate.version == 2


async def test_a_server_without_weight_labels_is_taken_back_on_health_alone(proxies, pool_of):
    a, b = proxies(2)  # `transformers serve` has no `/weight_info`
    policy = await pool_of([a, b])
    a.kill()
    await policy.session().generate(PROMPT, GREEDY)
    a.start()
    assert [s.url for s in await policy.recheck()] == [a.base_url]


async def test_run_episode_plays_an_episode_again_when_its_server_is_lost_mid_episode():
    class LosesTheFirstSessionAtItsSecondTurn(PolicyBackend):
        def __init__(self):
            super().__init__()
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(tiny_model_dir())
            self.sessions = 0

        @property
        def tokenizer(self):
            return self._tok

        async def generate(self, prompt_ids, params):
            ids = self._tok.encode(" hi!", add_special_tokens=False)
            return Generation(ids, [-0.5] * len(ids), " hi!", "stop", "!")

        def session(self):
            self.sessions += 1
            policy, number = self, self.sessions

            class Lossy(Session):
                turns = 0

                async def generate(self, prompt_ids, params):
                    self.turns += 1
                    if number == 1 and self.turns == 2:
                        raise ServerLost("the server left rotation during an episode")
                    return await policy.generate(prompt_ids, params)

            return Lossy(self)

    policy = LosesTheFirstSessionAtItsSecondTurn()
    env = SayEnv(2)
    traj = await run_episode(env, policy, env.problem_ids[0], sampling=SamplingParams(), seed=1)
    assert traj.error is None and policy.sessions == 2
    assert len(traj.turn_starts) == 2  # the replayed episode, not turns of the lost one
    assert traj.info["server_restarts"] == 1


def test_eval_spreads_over_servers_given_as_repeated_and_comma_separated_urls_and_survives_losing_one(
    proxies, served_model, tmp_path, monkeypatch
):
    import json

    from spo_agents.cli import main

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))
    _, model = served_model
    a, b = proxies(2)
    # POSTs 1-2: the probe (token ids refused, then text); a later one kills it (a server that dies
    # on a request): the episodes it had are moved or played again on the others
    dies = proxies(1, outage_after=5, outage_s=600)[0]
    args = ["eval", "--env", "say_env:SayEnv", "--env-arg", "stop=[]", "--model", model, "--limit", "6", "-k", "1"]
    args += ["--base-url", f"{a.base_url},{b.base_url}", "--base-url", dies.base_url, "--out", str(tmp_path)]
    args += ["--temperature", "0", "--max-new-tokens", "4", "--max-episode-tokens", "40", "--concurrency", "6"]
    assert main([*args, "--max-retries", "0", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "transcripts.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["error"] is None for r in rows)
    assert a.forwarded and b.forwarded and dies.outages == 1  # all three served, one died mid-run
