"""Single-stream rollout: one episode's token layout, and the collector's delivery rules."""

from __future__ import annotations

import asyncio

import pytest

from say_env import FailingSandboxEnv, SayEnv
from spo_agents.errors import PolicyError
from spo_agents.rollout.collector import Collector, run_episode
from spo_agents.rollout.policy import make_policy
from spo_agents.rollout.policy.base import Generation, PolicyBackend, SamplingParams

FAST = SamplingParams(max_new_tokens=8)


@pytest.fixture(scope="module")
def policy():
    p = make_policy("hf", "tiny-random", torch_threads=1)
    yield p
    asyncio.run(p.close())


class ScriptedPolicy(PolicyBackend):
    """Emits a fixed token sequence after a per-problem delay: lets the collector tests control
    which episode finishes first without a model."""

    def __init__(self, tokenizer, delays: dict[str, float], fail: set[str] = frozenset()):
        super().__init__()
        self._tok = tokenizer
        self.delays = delays
        self.fail = fail
        self.calls = 0

    @property
    def tokenizer(self):
        return self._tok

    async def generate(self, prompt_ids, params):
        self.calls += 1
        text = self._tok.decode(prompt_ids)
        pid = next(p for p in self.delays if f"({p.split('-')[1]})" in text)
        if pid in self.fail:
            raise PolicyError("scripted server failure")
        await asyncio.sleep(self.delays[pid])
        ids = self._tok.encode(" one two", add_special_tokens=False)
        return Generation(ids, [-0.5] * len(ids), " one two", "length", policy_version=self.version)


async def test_episode_layout_with_inline_replies(policy):
    env = SayEnv(reply="\nAgain:")
    t = await run_episode(env, policy, "test-1", sampling=FAST, max_episode_tokens=200, seed=3)
    tok = policy.tokenizer
    reply = tok.encode("\nAgain:", add_special_tokens=False)
    assert t.error is None and t.terminated and len(t.turn_starts) == 2
    second = t.turn_starts[1]
    assert t.token_ids[second - len(reply) : second] == reply  # the reply tokens, exactly
    assert t.loss_mask[second - len(reply) : second] == [0] * len(reply)
    assert all(m == 1 for m in t.loss_mask[: second - len(reply)]) and all(m == 1 for m in t.loss_mask[second:])
    assert all(lp == 0.0 for lp, m in zip(t.logprobs, t.loss_mask) if m == 0)
    assert all(lp < 0.0 for lp, m in zip(t.logprobs, t.loss_mask) if m == 1)
    assert t.info["answer"] in {"0", "1", "2"} and t.info["correct"] == (t.reward == 1.0)
    assert len(t.tool_calls) == 1 and t.policy_versions == [0, 0]
    assert set(t.timings) >= {"generate", "env", "total"} and t.timings["total"] >= t.timings["generate"]
    assert t.prompt_ids == tok.encode(
        tok.apply_chat_template(
            [{"role": "user", "content": "Say something (1)."}], add_generation_prompt=True, tokenize=False
        ),
        add_special_tokens=False,
    )


async def test_chat_role_reply_is_the_template_delta(policy):
    env = SayEnv(reply_role="user", reply="Once more.")
    t = await run_episode(env, policy, "test-2", sampling=FAST, max_episode_tokens=200)
    tok = policy.tokenizer
    assert t.error is None
    second = t.turn_starts[1]
    inserted = tok.decode([x for x, m in zip(t.token_ids[:second], t.loss_mask[:second]) if m == 0])
    assert "Once more." in inserted and "<|im_start|>user" in inserted and inserted.endswith("<|im_start|>assistant\n")
    full = tok.decode(t.prompt_ids + t.token_ids[:second])
    chat = [
        {"role": "user", "content": "Say something (2)."},
        {"role": "assistant", "content": env.actions[0]},
        {"role": "user", "content": "Once more."},
    ]
    assert full == tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)


async def test_token_budget_truncates(policy):
    t = await run_episode(SayEnv(), policy, "test-0", sampling=SamplingParams(max_new_tokens=50), max_episode_tokens=6)
    assert t.truncated and not t.terminated and len(t.token_ids) <= 6


async def test_infrastructure_errors_become_data(policy):
    t = await run_episode(FailingSandboxEnv(), policy, "test-0", sampling=FAST, max_episode_tokens=50)
    assert t.error is not None and "sandbox" in t.error
    scripted = ScriptedPolicy(policy.tokenizer, {"test-0": 0.0}, fail={"test-0"})
    t = await run_episode(SayEnv(), scripted, "test-0", sampling=FAST)
    assert t.error is not None and "PolicyError" in t.error


async def test_collector_delivers_first_finished_and_keeps_the_rest_in_flight(policy):
    delays = {"test-0": 0.5, "test-1": 0.01, "test-2": 0.02, "test-3": 0.5}
    c = Collector(lambda: SayEnv(num_problems=4), ScriptedPolicy(policy.tokenizer, delays), max_in_flight=4)
    c.submit(["test-0", "test-1", "test-2", "test-3"])  # over-sampled: 4 started, 2 wanted
    batch = await c.next_batch(2)
    assert sorted(t.problem_id for t in batch) == ["test-1", "test-2"]
    assert c.in_flight == 2 and c.stats.delivered == 2
    rest = await c.next_batch(2)
    assert sorted(t.problem_id for t in rest) == ["test-0", "test-3"]
    assert all(t.timings["queued"] >= 0 for t in batch + rest)
    await c.close()


async def test_grouped_mode_waits_for_the_whole_group(policy):
    delays = {"test-0": 0.05, "test-1": 0.01}
    scripted = ScriptedPolicy(policy.tokenizer, delays)
    c = Collector(lambda: SayEnv(num_problems=2), scripted, max_in_flight=8, group_size=3)
    c.submit(["test-0", "test-1"])
    batch = await c.next_batch(3)
    assert len(batch) == 3 and len({t.group_id for t in batch}) == 1
    assert {t.problem_id for t in batch} == {"test-1"} and sorted(t.sample_index for t in batch) == [0, 1, 2]
    with pytest.raises(Exception, match="multiple of the group size"):
        await c.next_batch(2)
    await c.close()


async def test_stale_trajectories_are_dropped_and_counted(policy):
    scripted = ScriptedPolicy(policy.tokenizer, {"test-0": 0.01, "test-1": 0.01, "test-2": 1.0})
    c = Collector(lambda: SayEnv(num_problems=3), scripted, max_in_flight=3, max_staleness=1)
    c.submit(["test-0", "test-1", "test-2"])
    for _ in range(1000):  # test-0 and test-1 finish under version 0 (however loaded the machine)
        if c.ready == 2:
            break
        await asyncio.sleep(0.005)
    assert c.ready == 2
    scripted.version = 2  # two learner steps later, while test-2 is still generating
    batch = await c.next_batch(1)
    assert [t.problem_id for t in batch] == ["test-2"]  # generated under version 2
    assert c.stats.dropped_stale == 2
    await c.close()


async def test_failed_episodes_are_counted_not_delivered(policy):
    scripted = ScriptedPolicy(policy.tokenizer, {"test-0": 0.0, "test-1": 0.01}, fail={"test-0"})
    c = Collector(lambda: SayEnv(num_problems=2), scripted, max_in_flight=2)
    c.submit(["test-0", "test-1"])
    batch = await c.next_batch(1)
    assert [t.problem_id for t in batch] == ["test-1"]
    assert c.stats.errors == 1 and c.failed[0].problem_id == "test-0"
    await c.close()


async def test_collector_runs_real_episodes_end_to_end(policy):
    c = Collector(lambda: SayEnv(), policy, max_in_flight=4, sampling=FAST, max_episode_tokens=64)
    c.submit([f"test-{i}" for i in range(6)])
    batch = await c.next_batch(3)
    assert len(batch) == 3 and all(t.error is None and t.num_generated > 0 for t in batch)
    assert c.in_flight + c.pending + c.ready == 3
    await c.close()
    assert c.in_flight == 0


class NoLogprobPolicy(ScriptedPolicy):
    """A token-in/out backend that drops the log-probs (as a broken engine build would)."""

    async def generate(self, prompt_ids, params):
        gen = await super().generate(prompt_ids, params)
        return Generation(gen.token_ids, [], gen.text, gen.finish_reason, policy_version=gen.policy_version)


async def test_missing_behaviour_log_probs_fail_the_episode_instead_of_becoming_zero(policy):
    p = NoLogprobPolicy(policy.tokenizer, {"test-1": 0.0})
    t = await run_episode(SayEnv(), p, "test-1", sampling=FAST, max_episode_tokens=40)
    assert t.error is not None and "PolicyError" in t.error and "log-probs" in t.error


class BuggySayEnv(SayEnv):
    def _step_episode(self, action):
        raise ValueError("a bug in a plugin env")


async def test_an_env_that_raises_stops_the_collector_with_its_file_and_line(policy):
    from spo_agents.errors import PluginError

    c = Collector(lambda: BuggySayEnv(), policy, max_in_flight=2, sampling=FAST, max_episode_tokens=40)
    c.submit(["test-0", "test-1"])
    with pytest.raises(
        PluginError, match=r"`BuggySayEnv` raised ValueError: a bug in a plugin env at .*test_rollout.py:\d+"
    ):
        await c.next_batch(2)
    await c.close()


async def test_a_config_error_inside_an_episode_is_not_recorded_as_a_bad_rollout(policy):
    from spo_agents.errors import ConfigError

    class Misconfigured(SayEnv):
        def reset(self, *, seed=None, options=None):
            raise ConfigError("`foo` must be set")

    c = Collector(lambda: Misconfigured(), policy, max_in_flight=1, sampling=FAST)
    c.submit(["test-0"])
    with pytest.raises(ConfigError, match="`foo` must be set"):
        await c.next_batch(1)
    await c.close()


# --- prompts over the limit ---------------------------------------------------------------------
def _prompt_ids(tok, pid="test-1"):
    chat = [{"role": "user", "content": f"Say something ({pid.split('-')[1]})."}]
    return tok.encode(
        tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False), add_special_tokens=False
    )


async def test_a_prompt_over_the_limit_is_refused_before_generating(policy):
    from spo_agents.rollout.prompt_limit import PromptLimit

    full = _prompt_ids(policy.tokenizer)
    counting = ScriptedPolicy(policy.tokenizer, {"test-1": 0.0})
    limit = PromptLimit(len(full) - 1, "refuse")
    t = await run_episode(SayEnv(), counting, "test-1", sampling=FAST, prompt_limit=limit)
    assert counting.calls == 0 and t.token_ids == [] and t.reward == 0.0
    assert t.error is not None and f"has {len(full)} tokens, more than the limit of {len(full) - 1}" in t.error
    ok = await run_episode(SayEnv(), counting, "test-1", sampling=FAST, prompt_limit=PromptLimit(len(full)))
    assert ok.error is None and counting.calls > 0  # a prompt at the limit is played


@pytest.mark.parametrize("reply_role", [None, "user"])
async def test_a_prompt_over_the_limit_is_truncated_with_a_count(policy, reply_role):
    from spo_agents.rollout.prompt_limit import PromptLimit

    full = _prompt_ids(policy.tokenizer)
    limit = PromptLimit(12, "truncate")
    env = SayEnv(reply_role=reply_role)
    t = await run_episode(env, policy, "test-1", sampling=FAST, max_episode_tokens=200, prompt_limit=limit)
    assert t.error is None and t.terminated and len(t.turn_starts) == 2  # chat replies still append
    assert t.info["prompt_cut_tokens"] == len(full) - 12
    assert t.prompt_ids == full[:3] + full[-9:]  # a quarter from the head, the rest (the question's end) from the tail


def test_a_prompt_limit_refuses_bad_settings():
    from spo_agents.errors import ConfigError
    from spo_agents.rollout.prompt_limit import PromptLimit

    with pytest.raises(ConfigError, match="refuse, truncate"):
        PromptLimit(100, "drop")
    with pytest.raises(ConfigError, match=">= 8"):
        PromptLimit(0)


def test_turn_seeds_follow_the_episode_and_the_turn():
    from spo_agents.rollout.episode import turn_seed

    seeds = [turn_seed(None, 7, turn) for turn in range(3)]
    assert len(set(seeds)) == 3 and seeds == [turn_seed(None, 7, turn) for turn in range(3)]
    assert turn_seed(None, 8, 0) != seeds[0]
    assert turn_seed(5, 7, 0) == 5  # the sampling settings' own seed wins
    assert turn_seed(None, None, 0) is None  # an unseeded episode uses the backend's own stream


def test_every_seed_is_the_low_bits_of_the_sha256_of_its_parts():
    """Episode, evaluation-sample and turn seeds are fixed functions of their parts, so a run
    resumed by another version of the code draws what the first one would have."""
    import hashlib

    from spo_agents.evaluation.runner import sample_seed
    from spo_agents.rollout.episode import derive_seed, turn_seed

    def low(text: str, bits: int) -> int:
        return int.from_bytes(hashlib.sha256(text.encode()).digest(), "little") % (1 << bits)

    assert sample_seed("arith/add/1+2", 3, 0) == low("0:arith/add/1+2:3", 32)
    assert turn_seed(None, 7, 2) == low("7:2", 63)
    assert derive_seed(3, "p", None, 0, 1) == low("3:p:None:0:1", 32)


async def test_a_seeded_episode_draws_the_same_tokens_alone_or_among_others(policy):
    """The continuous scheduler draws each request from its own seeded stream, so what an episode
    samples does not depend on which other requests share its batches (a resumed run draws
    what an uninterrupted one did)."""
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12)
    alone = await run_episode(SayEnv(), policy, "test-1", sampling=sampling, max_episode_tokens=48, seed=11)
    seeds = [0, 11, 2, 3]
    crowd = await asyncio.gather(
        *(
            run_episode(SayEnv(), policy, f"test-{i}", sampling=sampling, max_episode_tokens=48, seed=s)
            for i, s in enumerate(seeds)
        )
    )
    assert alone.token_ids and crowd[1].token_ids == alone.token_ids
    assert crowd[0].token_ids != alone.token_ids  # other seeds draw otherwise


async def test_the_collector_counter_survives_a_checkpoint():
    """A collector rebuilt from another's state gives its next episodes the same seeds."""
    from spo_agents.rollout.collector import _Job

    a = Collector(lambda: SayEnv(), ScriptedPolicy(None, {}), seed=3)
    jobs = [_Job("test-1", None, 0, 0.0) for _ in range(3)]
    a._episode_seed(jobs[0])
    b = Collector(lambda: SayEnv(), ScriptedPolicy(None, {}), seed=3)
    b.load_state_dict(a.state_dict())
    assert [a._episode_seed(j) for j in jobs[1:]] == [b._episode_seed(j) for j in jobs[1:]]
    await a.close()
    await b.close()
