"""The multi-turn env base class, its spaces, and the env registry functions."""

from __future__ import annotations

import importlib.metadata

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import spo_agents.registry as registry
from spo_agents import envs
from spo_agents.envs.base import ChatSpace, MultiTurnEnv, StepOutcome, TextSpace, Timings, clean_text, head_tail
from spo_agents.errors import EnvError, EnvNotFound, SandboxError
from spo_agents.types import Problem


class EchoEnv(MultiTurnEnv):
    """Answer by repeating the problem's answer; `fail` raises a sandbox failure, `more` continues."""

    stop_sequences = ["</x>"]

    def _reset_episode(self, problem):
        return [{"role": "user", "content": problem.prompt}]

    def _step_episode(self, action):
        if action == "fail":
            raise SandboxError("engine down")
        if action == "more":
            self.count_tool_call()
            self.add_timing("sandbox_s", 0.01)
            return StepOutcome("\n<r>ok</r>\n")
        ok = action.strip() == self.problem.answer
        return StepOutcome("", float(ok), True, False, {"answer": action, "correct": ok})


PROBLEMS = [Problem(id=f"p{i}", prompt=f"say {i}", answer=str(i)) for i in range(20)]


@pytest.fixture
def env():
    e = EchoEnv(PROBLEMS, max_turns=3, max_action_chars=100)
    yield e
    e.close()


# --- spaces -------------------------------------------------------------------------------
def test_text_space_accepts_any_string_up_to_its_bound():
    space = TextSpace(10)
    assert "\x00\ufffd<code>" in space
    assert "a" * 10 in space and "a" * 11 not in space
    assert b"bytes" not in space and None not in space


def test_chat_space_holds_messages_and_reply_text():
    space = ChatSpace(20)
    assert [{"role": "user", "content": "hi"}] in space
    assert "reply" in space
    assert [{"role": "user"}] not in space
    assert [{"role": "user", "content": "x" * 21}] not in space
    assert {"role": "user", "content": "hi"} not in space
    assert space.sample() in space


def test_timings_compare_by_keys_and_export_plain_dicts():
    a, b = Timings({"step_s": 0.1}), Timings({"step_s": 0.2})
    assert a == b and a != Timings({"step_s": 0.1, "sandbox_s": 0.0})
    assert a["step_s"] == 0.1 and dict(a) == {"step_s": 0.1} and a.to_dict() == {"step_s": 0.1}


def test_head_tail_keeps_both_ends():
    text = "HEAD" + "x" * 1000 + "TAIL"
    short, cut = head_tail(text, 100)
    assert cut and short.startswith("HEAD") and short.endswith("TAIL") and "908 characters cut" in short
    assert head_tail("small", 100) == ("small", False)


def test_clean_text_decodes_bytes_and_replaces_surrogates():
    assert clean_text(b"ok \xff\xfe") == "ok \ufffd\ufffd"
    assert clean_text("a\udcffb").encode("utf-8") == b"a?b"
    assert clean_text(42) is None


# --- episodes -----------------------------------------------------------------------------
def test_passes_the_gymnasium_checker(env):
    check_env(env, skip_render_check=True)


def test_reset_by_problem_id_and_by_problem(env):
    messages, info = env.reset(options={"problem_id": "p7"})
    assert messages == [{"role": "user", "content": "say 7"}]
    assert info["problem_id"] == "p7" and info["turn"] == 0 and info["tool_calls"] == 0
    adhoc = Problem(id="new", prompt="say x", answer="x")
    _, info = env.reset(options={"problem": adhoc})
    assert info["problem_id"] == "new"
    assert env.step("x")[1] == 1.0


def test_unknown_problem_id_is_an_error_that_names_it(env):
    with pytest.raises(EnvError, match="`nope` is not in"):
        env.reset(options={"problem_id": "nope"})


def test_seeded_reset_is_deterministic_and_seeds_differ(env):
    first = [env.reset(seed=3)[1]["problem_id"]] + [env.reset()[1]["problem_id"] for _ in range(5)]
    again = [env.reset(seed=3)[1]["problem_id"]] + [env.reset()[1]["problem_id"] for _ in range(5)]
    other = [env.reset(seed=4)[1]["problem_id"]] + [env.reset()[1]["problem_id"] for _ in range(5)]
    assert first == again
    assert first != other


def test_step_reports_reward_and_common_info(env):
    env.reset(options={"problem_id": "p3"})
    obs, reward, terminated, truncated, info = env.step("more")
    assert obs == "\n<r>ok</r>\n" and reward == 0.0 and not terminated and not truncated
    assert info["turn"] == 1 and info["tool_calls"] == 1
    assert set(info["timings"]) == {"step_s", "sandbox_s"}
    obs, reward, terminated, truncated, info = env.step("3")
    assert reward == 1.0 and terminated and not truncated and info["correct"] is True and info["turn"] == 2


def test_turn_budget_truncates(env):
    env.reset(options={"problem_id": "p1"})
    env.step("more")
    env.step("more")
    _, reward, terminated, truncated, info = env.step("more")
    assert truncated and not terminated and reward == 0.0
    assert "turn budget of 3" in info["budget"] and info["correct"] is False


def test_token_budget_truncates():
    class Chars:
        def encode(self, text, add_special_tokens=False):
            return list(text)

    e = EchoEnv(PROBLEMS, max_episode_tokens=20, tokenizer=Chars())
    e.reset(options={"problem_id": "p1"})  # 5 tokens of prompt
    assert e.step("more")[3]  # +4 action +11 reply = 20 tokens: the budget is reached
    e2 = EchoEnv(PROBLEMS, max_episode_tokens=21, tokenizer=Chars())
    e2.reset(options={"problem_id": "p1"})
    assert not e2.step("more")[3]
    assert e2.step("more")[3]


@pytest.mark.parametrize("garbage", [b"\xff\xfe\x00", "a\udcff", "", "\x00" * 50, "<x>unclosed", "}" * 99])
def test_garbage_actions_are_data_not_exceptions(env, garbage):
    env.reset(options={"problem_id": "p1"})
    obs, reward, terminated, truncated, info = env.step(garbage)
    assert isinstance(obs, str) and reward == 0.0 and (terminated or truncated)


def test_an_action_over_the_bound_truncates_with_a_reason(env):
    env.reset(options={"problem_id": "p1"})
    _, reward, terminated, truncated, info = env.step("1" * 101)
    assert truncated and not terminated and reward == 0.0 and "exceeds the limit of 100" in info["malformed"]


def test_sandbox_failure_ends_the_episode_with_an_error(env):
    env.reset(options={"problem_id": "p1"})
    _, reward, terminated, truncated, info = env.step("fail")
    assert truncated and reward == 0.0 and "engine down" in info["error"]


def test_step_outside_an_episode_is_a_programmer_error(env):
    with pytest.raises(EnvError, match="call `reset"):
        env.step("1")
    env.reset(options={"problem_id": "p1"})
    env.step("1")
    with pytest.raises(EnvError):
        env.step("1")
    env.reset()
    with pytest.raises(EnvError, match="must be text"):
        env.step(123)


def test_problem_sets_must_be_non_empty_and_unique():
    with pytest.raises(EnvError, match="at least one problem"):
        EchoEnv([])
    with pytest.raises(EnvError, match="`a` appears more than once"):
        EchoEnv([Problem("a", "x"), Problem("a", "y")])


def test_close_is_safe_twice(env):
    env.reset()
    env.close()
    env.close()


def test_a_tool_env_without_a_sandbox_says_how_to_get_one(env):
    with pytest.raises(EnvError, match='sandbox="local"'):
        env.sandbox_session()


def test_sandbox_session_is_opened_lazily_and_closed_at_episode_end(fake_backend):
    e = EchoEnv(PROBLEMS, sandbox=fake_backend)
    e.reset(options={"problem_id": "p1"})
    assert fake_backend.sessions == []
    assert e.sandbox_session().run("print(2 + 2)").stdout == "4\n"
    assert e.sandbox_session().run("print(1)") is not None  # same session
    assert len(fake_backend.sessions) == 1
    e.step("1")
    assert fake_backend.sessions[0].closed == 1
    e.reset()
    e.sandbox_session()
    e.close()
    e.close()
    assert [s.closed for s in fake_backend.sessions] == [1, 1]


# --- the registry functions ---------------------------------------------------------------
def test_builtins_are_listed_and_unversioned_ids_resolve():
    assert "math-python-v0" in envs.list_envs()
    assert envs.spec("math-python").id == "math-python-v0"
    assert "Python" in envs.describe_env("math-python")


def test_unknown_id_suggests_and_names_the_list_command():
    with pytest.raises(EnvNotFound) as e:
        envs.make("math-pyhton")
    assert "Did you mean `math-python`?" in str(e.value) and "spo-agent envs" in str(e.value)


NOT_CALLABLE = 42


class NotAnEnv:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def _not_an_env_factory(**kwargs):
    return NotAnEnv()


@pytest.fixture
def scratch_ids():
    ids: list[str] = []
    yield ids
    for i in ids:
        registry.ENVS._specs.pop(i, None)


def test_register_and_make_a_lazy_plugin(scratch_ids):
    scratch_ids.append("echo-test-v0")
    envs.register("echo-test-v0", f"{__name__}:EchoEnv", kwargs={"problems": PROBLEMS, "max_turns": 5})
    env = envs.make("echo-test", max_turns=7)
    assert isinstance(env, EchoEnv) and env.max_turns == 7


def test_a_plugin_that_is_not_an_env_fails_on_make_saying_what_is_required(scratch_ids):
    scratch_ids += ["bad-class-v0", "bad-factory-v0", "bad-object-v0"]
    envs.register("bad-class-v0", f"{__name__}:NotAnEnv")
    envs.register("bad-factory-v0", f"{__name__}:_not_an_env_factory")
    envs.register("bad-object-v0", f"{__name__}:NOT_CALLABLE")
    for bad in ("bad-class", "bad-factory", "bad-object"):
        with pytest.raises(EnvError, match=r"subclass of `gymnasium.Env`|`gymnasium.Env` subclass"):
            envs.make(bad)


def test_entry_point_plugins_are_discovered(monkeypatch):
    ep = importlib.metadata.EntryPoint(name="echo-plugin-v3", value=f"{__name__}:EchoEnv", group="spo_agents.envs")
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep] if group == "spo_agents.envs" else [])
    monkeypatch.setattr(registry.ENVS, "_loaded", False)
    try:
        assert "echo-plugin-v3" in envs.list_envs()
        env = envs.make("echo-plugin", problems=PROBLEMS)
        assert isinstance(env, gym.Env) and envs.spec("echo-plugin").source == "an entry point"
    finally:
        registry.ENVS._specs.pop("echo-plugin-v3", None)


def test_cli_lists_envs_with_descriptions(capsys):
    from spo_agents.cli import main

    assert main(["envs"]) == 0
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith("math-python-v0"))
    assert "Python" in line


def test_importing_the_envs_package_is_light():
    import subprocess
    import sys

    code = (
        "import sys, spo_agents.envs as e; e.list_envs(); "
        "heavy = [m for m in ('gymnasium', 'torch', 'reasoning_gym', 'math_verify', 'datasets') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
