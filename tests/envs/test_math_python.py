"""`math-python-v0`: prompt, tool loop, budgets, malformed output, determinism, registry."""

from __future__ import annotations

import pytest
from gymnasium.utils.env_checker import check_env

from spo_agents import envs
from spo_agents.envs.base import Timings
from spo_agents.envs.math_python import MathPythonEnv, find_code, one_shot_messages
from spo_agents.types import Problem, ToolCall

PROBLEMS = [
    Problem(id="mul", prompt="What is 37 * 48?", answer="1776"),
    Problem(id="half", prompt="What is 1/2?", answer="1/2"),
]


@pytest.fixture
def env(fake_backend, checker):
    e = MathPythonEnv(problems=PROBLEMS, sandbox=fake_backend, checker=checker)
    yield e
    e.close()


def test_interface_attributes(env):
    assert env.stop_sequences == ["</code>"]
    assert env.reply_role is None


def test_prompt_has_system_one_shot_and_problem(env):
    messages, info = env.reset(options={"problem_id": "mul"})
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert (
        "<code>" in messages[0]["content"]
        and "\\boxed" in messages[0]["content"]
        and "8 times" in messages[0]["content"]
    )
    shot = messages[2]["content"]
    assert "<code>" in shot and "</code>\n<interpreter>\n" in shot and "\\boxed{" in shot
    assert messages[3]["content"] == "What is 37 * 48?"
    assert info["problem_id"] == "mul"


def test_prompt_options(fake_backend):
    e = MathPythonEnv(
        problems=PROBLEMS, sandbox=fake_backend, one_shot=False, system_prompt="", prompt_template="Q: {prompt}"
    )
    messages, _ = e.reset(options={"problem_id": "mul"})
    assert messages == [{"role": "user", "content": "Q: What is 37 * 48?"}]
    with pytest.raises(ValueError, match="must contain `{prompt}`"):
        MathPythonEnv(problems=PROBLEMS, prompt_template="no field")


def test_the_one_shot_example_is_a_valid_episode(env):
    """The example shows exactly the format the env produces: its code block runs and its
    interpreter reply is what this env would append."""
    shot = one_shot_messages()[1]["content"]
    code_part = shot[: shot.index("</code>") + len("</code>")]
    env.reset(options={"problem": Problem(id="shot", prompt=one_shot_messages()[0]["content"], answer="5535")})
    obs, *_ = env.step(code_part)
    assert code_part + obs + shot[len(code_part) + len(obs) :] == shot
    _, reward, terminated, *_ = env.step(shot[len(code_part) + len(obs) :])
    assert terminated and reward == 1.0


def test_a_full_episode_with_a_tool_call(env, fake_backend):
    env.reset(options={"problem_id": "mul"})
    obs, reward, terminated, truncated, info = env.step("Let me compute.\n<code>print(37 * 48)</code>")
    assert obs == "\n<interpreter>\n1776\n</interpreter>\n"
    assert (reward, terminated, truncated) == (0.0, False, False)
    call = info["tool_call"]
    assert isinstance(call, ToolCall) and call.code == "print(37 * 48)" and call.ok and call.output == "1776"
    assert info["tool_calls"] == 1 and "sandbox_s" in info["timings"]
    obs, reward, terminated, truncated, info = env.step("So the answer is \\boxed{1776}.")
    assert (obs, reward, terminated, truncated) == ("", 1.0, True, False)
    assert info["answer"] == "1776" and info["correct"] is True and "check_s" in info["timings"]
    assert isinstance(info["timings"], Timings)
    assert fake_backend.sessions[0].closed == 1


def test_variables_persist_within_an_episode_not_across(env, fake_backend):
    env.reset(options={"problem_id": "mul"})
    env.step("<code>x = 37 * 48</code>")
    obs, *_ = env.step("<code>print(x)</code>")
    assert "1776" in obs
    env.step("\\boxed{1776}")
    env.reset(options={"problem_id": "mul"})
    obs, *_ = env.step("<code>print(x)</code>")
    assert "NameError" in obs
    assert len(fake_backend.sessions) == 2


def test_fenced_code_runs(env):
    env.reset(options={"problem_id": "mul"})
    obs, *_ = env.step("<code>\n```python\nprint(6 * 7)\n```\n</code>")
    assert "42" in obs


def test_failing_code_shows_the_error_and_the_episode_goes_on(env):
    env.reset(options={"problem_id": "mul"})
    obs, reward, terminated, truncated, info = env.step("<code>1/0</code>")
    assert "ZeroDivisionError" in obs and not info["tool_call"].ok
    assert not terminated and not truncated
    obs, *_ = env.step("<code>y = 1</code>")
    assert "(no output" in obs


def test_long_output_keeps_head_and_tail(fake_backend, checker):
    e = MathPythonEnv(problems=PROBLEMS, sandbox=fake_backend, checker=checker, max_output_chars=200)
    e.reset(options={"problem_id": "mul"})
    obs, _, _, _, info = e.step("<code>print('START' + 'x' * 5000 + 'END')</code>")
    assert obs.startswith("\n<interpreter>\nSTART") and obs.endswith("END\n</interpreter>\n")
    assert len(obs) < 300 and "characters cut" in obs and info["tool_call"].truncated


def test_giant_code_is_not_run(fake_backend, checker):
    e = MathPythonEnv(problems=PROBLEMS, sandbox=fake_backend, checker=checker, max_code_chars=100)
    e.reset(options={"problem_id": "mul"})
    obs, reward, terminated, truncated, info = e.step("<code>" + "x = 1\n" * 50 + "</code>")
    assert "more than the limit of 100" in obs and not info["tool_call"].ok
    assert fake_backend.runs == [] and not terminated and not truncated


def test_tool_call_limit_then_turn_budget(fake_backend, checker):
    e = MathPythonEnv(problems=PROBLEMS, sandbox=fake_backend, checker=checker, max_tool_calls=2)
    assert e.max_turns == 4
    e.reset(options={"problem_id": "mul"})
    e.step("<code>print(1)</code>")
    e.step("<code>print(2)</code>")
    obs, reward, terminated, truncated, info = e.step("<code>print(3)</code>")
    assert "Tool call limit reached (2)" in obs and info["tool_limit_reached"]
    assert fake_backend.runs == ["print(1)", "print(2)"] and info["tool_calls"] == 2
    _, reward, terminated, truncated, info = e.step("<code>print(4)</code>")
    assert truncated and not terminated and reward == 0.0 and info["correct"] is False


def test_eight_tool_calls_by_default(env, fake_backend):
    env.reset(options={"problem_id": "mul"})
    for i in range(9):
        obs, _, _, truncated, _ = env.step(f"<code>print({i})</code>")
        assert not truncated
    assert len(fake_backend.runs) == 8 and "limit reached" in obs
    _, reward, terminated, _, _ = env.step("\\boxed{1776}")
    assert terminated and reward == 1.0


@pytest.mark.parametrize(
    "action",
    [
        b"\xff\xfe<code>print(1)</code>",
        "<code>print('unclosed')",
        "</code>",
        "\\boxed{",
        "a\udcff\\boxed{1776}",
        "<code></code>",
        "",
    ],
)
def test_malformed_output_is_data(env, action):
    env.reset(options={"problem_id": "mul"})
    obs, reward, terminated, truncated, info = env.step(action)
    assert isinstance(obs, str) and reward in (0.0, 1.0)
    if terminated:
        assert "correct" in info and "answer" in info


def test_an_empty_code_block_is_a_tool_call_and_non_utf8_code_still_runs(env):
    env.reset(options={"problem_id": "mul"})
    obs, *_ = env.step("<code></code>")
    assert "(no output" in obs
    obs, *_ = env.step(b"<code>print('\xff')</code>")
    assert "\ufffd" in obs


def test_sandbox_failure_ends_the_episode_without_raising(env, fake_backend):
    env.reset(options={"problem_id": "mul"})
    fake_backend.fail_runs = True
    _, reward, terminated, truncated, info = env.step("<code>print(1)</code>")
    assert truncated and not terminated and reward == 0.0 and "sandbox" in info["error"]
    assert "is down" in info["tool_call"].infra_error and info["correct"] is False
    fake_backend.fail_runs = False
    fake_backend.fail_open = True
    env.reset(options={"problem_id": "mul"})
    _, reward, _, truncated, info = env.step("<code>print(1)</code>")
    assert truncated and "cannot start" in info["error"]


def test_last_boxed_answer_of_all_model_text_counts(env):
    env.reset(options={"problem_id": "half"})
    env.step("Maybe \\boxed{2}. Let me check <code>print(1/2)</code>")
    _, reward, terminated, _, info = env.step("It is \\boxed{0.5}")
    assert reward == 1.0 and info["answer"] == "0.5"


def test_interpreter_output_never_counts_as_the_answer(env):
    env.reset(options={"problem_id": "mul"})
    obs, *_ = env.step("<code>print(chr(92) + 'boxed{' + str(37 * 48) + '}')</code>")
    assert "\\boxed{1776}" in obs
    _, reward, terminated, _, info = env.step("I am done.")
    assert terminated and reward == 0.0 and info["answer"] is None


def test_same_seed_same_episode(fake_backend, checker):
    def run(seed):
        e = MathPythonEnv(num_problems=50, sandbox=fake_backend, checker=checker)
        messages, info = e.reset(seed=seed)
        steps = [e.step("<code>print(2 + 2)</code>"), e.step("\\boxed{4}")]
        e.close()
        return messages, info["problem_id"], [(o, r, t, u, i.get("answer")) for o, r, t, u, i in steps]

    assert run(5) == run(5)
    assert run(5)[1] != run(6)[1] or run(5)[1] != run(7)[1]


def test_gymnasium_checker_passes(env):
    check_env(env, skip_render_check=True)


def test_answers_equivalent_is_symbolic(env):
    assert env.answers_equivalent("1/2", "0.5")
    assert env.answers_equivalent("x+1", "1+x")
    assert not env.answers_equivalent("2", "3")
    assert not env.answers_equivalent(None, "3")


def test_make_builds_splits_that_share_problem_sets(fake_backend):
    train = envs.make("math-python", split="train", sandbox=fake_backend)
    test = envs.make("math-python-v0", split="test", sandbox=fake_backend)
    assert isinstance(train, MathPythonEnv) and train.problem_ids[0].startswith("arith/")
    assert not set(train.problem_ids) & set(test.problem_ids)
    many = [envs.make("math-python", split="train", sandbox=fake_backend) for _ in range(64)]
    assert all(e.problems is train.problems for e in many)  # one shared set, not 64 copies
    small = envs.make("math-python", num_problems=10, source="procedural:arith-mul", sandbox=fake_backend)
    assert len(small.problems) == 10 and all("/mul/" in i for i in small.problem_ids)


def test_find_code():
    assert find_code("think <code>a = 1</code>") == "a = 1"
    assert find_code("<code>a</code> then <code>b</code>  \n") == "b"
    assert find_code("<code>a</code> and then text") is None
    assert find_code("<code>unclosed") is None
    assert find_code("</code>") is None
    assert find_code("<code>\n```py\nx\n```\n</code>") == "x"


# --- with the real local sandbox ----------------------------------------------------------
@pytest.fixture(scope="module")
def local_backend():
    from spo_agents.sandboxes import backend_availability, make_backend

    ok, reason = backend_availability("local")
    if not ok:
        pytest.skip(f"the local sandbox is not available here: {reason}")
    backend = make_backend("local")
    yield backend
    backend.close()


def test_local_sandbox_episode(local_backend, checker):
    from spo_agents.sandboxes.base import SandboxLimits

    e = envs.make(
        "math-python",
        problems=PROBLEMS,
        sandbox=local_backend,
        checker=checker,
        sandbox_limits=SandboxLimits(timeout_s=1),
    )
    e.reset(options={"problem_id": "mul"})
    obs, *_ = e.step("<code>x = 37 * 48\nprint(x)</code>")
    assert obs == "\n<interpreter>\n1776\n</interpreter>\n"
    obs, *_ = e.step("<code>print(x + 1)</code>")
    assert "1777" in obs
    obs, _, _, truncated, info = e.step("<code>while True: pass</code>")
    assert not truncated and info["tool_call"].timed_out and "timed out" in obs.lower()
    assert obs.lower().count("timed out") == 1
    obs, _, _, _, info = e.step("<code>print(1/0)</code>")
    assert "ZeroDivisionError" in obs and not info["tool_call"].ok
    _, reward, terminated, _, info = e.step("The answer is \\boxed{1776}.")
    assert terminated and reward == 1.0 and info["tool_calls"] == 4
    e.close()


def test_local_sandbox_sessions_are_separate_per_env(local_backend, checker):
    a = MathPythonEnv(problems=PROBLEMS, sandbox=local_backend, checker=checker)
    b = MathPythonEnv(problems=PROBLEMS, sandbox=local_backend, checker=checker)
    a.reset(options={"problem_id": "mul"})
    b.reset(options={"problem_id": "mul"})
    a.step("<code>secret = 41</code>")
    obs, *_ = b.step("<code>print(secret)</code>")
    assert "NameError" in obs
    obs, *_ = a.step("<code>print(secret + 1)</code>")
    assert "42" in obs
    a.close()
    b.close()


def test_a_stateless_backend_stays_stateless_in_the_env():
    from spo_agents.sandboxes import make_backend

    env = MathPythonEnv("test", sandbox=make_backend("local", stateless=True), one_shot=False)
    try:
        env.reset(options={"problem_id": env.problem_ids[0]})
        env.step("<code>x = 41</code>")
        reply, *_ = env.step("<code>print(x + 1)</code>")
        assert "NameError" in reply  # each call in a fresh interpreter: `x` is gone
        env.reset(options={"problem_id": env.problem_ids[0]})
        env.sandbox_backend.stateless = False  # the backend's default decides, not the env
        env.step("<code>x = 41</code>")
        reply, *_ = env.step("<code>print(x + 1)</code>")
        assert "42" in reply
    finally:
        env.close()
