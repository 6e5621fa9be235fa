"""reasoning-gym-v0: problems from any generator, answer extraction and the generator's scorer."""

from __future__ import annotations

import pytest

from spo_agents.envs.reasoning_gym_env import ReasoningGymEnv, extract_answer, load_task
from spo_agents.errors import DatasetError, EnvError


@pytest.fixture(scope="module")
def env():
    e = ReasoningGymEnv("train", task="prime_factorization", num_problems=30, sandbox="local")
    yield e
    e.close()


def start(env, index=0):
    pid = env.problem_ids[index]
    messages, _ = env.reset(seed=0, options={"problem_id": pid})
    return env.problem


def test_extract_answer_prefers_the_last_answer_tag():
    assert extract_answer("<answer>1</answer> then <answer> 2 × 3 </answer>") == "2 × 3"
    assert extract_answer("no tag, \\boxed{42}") == "42"
    assert extract_answer("<answer>unclosed") is None
    assert extract_answer("") is None and extract_answer(None) is None


def test_task_by_name_with_generator_settings():
    problems, _ = load_task("prime_factorization", "train", 10, task_config={"min_value": 10, "max_value": 20})
    assert len(problems) == 10
    for p in problems:
        n = p.metadata["entry"]["metadata"]["number"]
        assert 10 <= n <= 20 and str(n) in p.prompt


def test_splits_are_disjoint_and_ids_stable():
    train, _ = load_task("basic_arithmetic", "train", 200, seed=5)
    test, _ = load_task("basic_arithmetic", "test", 30, seed=5)
    assert not {(p.prompt, p.answer) for p in train} & {(p.prompt, p.answer) for p in test}
    assert len({p.id for p in train}) == 200
    assert all(p.id.startswith("rg:basic_arithmetic:") for p in train)
    again, _ = load_task("basic_arithmetic", "train", 200, seed=5)
    assert [p.id for p in again] == [p.id for p in train]


def test_unknown_task_suggests_the_closest_name():
    with pytest.raises(DatasetError, match="Did you mean `prime_factorization`"):
        load_task("prime_factorisation", "train", 5)


def test_problems_argument_is_refused_with_a_pointer():
    with pytest.raises(EnvError, match="math-python"):
        ReasoningGymEnv(problems=[])


def test_right_answer_scores_one(env):
    p = start(env)
    obs, reward, terminated, truncated, info = env.step(f"The factors are <answer>{p.answer}</answer>.")
    assert (obs, reward, terminated, truncated) == ("", 1.0, True, False)
    assert info["correct"] and info["answer"] == p.answer


def test_equivalent_but_differently_written_answer_scores_one(env):
    p = start(env, 1)
    factors = p.answer.split(" × ")
    reordered = "×".join(reversed(factors))  # no spaces, other order: the scorer sorts the factors
    _, reward, _, _, info = env.step(f"<answer>{reordered}</answer>")
    assert reward == 1.0, (p.answer, reordered, info)


def test_wrong_answer_scores_zero_without_the_scorers_format_credit(env):
    p = start(env, 2)
    wrong = p.answer + " × 2"
    _, reward, terminated, _, info = env.step(f"<answer>{wrong}</answer>")
    assert (reward, terminated) == (0.0, True) and not info["correct"]
    assert 0.0 < info["score"] < 1.0  # this scorer gives partial credit for a well-formed answer


def test_partial_credit_passes_the_scorers_value_through():
    e = ReasoningGymEnv("train", task="prime_factorization", num_problems=30, sandbox="local", partial_credit=True)
    try:
        e.reset(seed=0, options={"problem_id": e.problem_ids[2]})
        _, reward, _, _, info = e.step(f"<answer>{e.problem.answer} × 2</answer>")
        assert reward == info["score"] and 0.0 < reward < 1.0
    finally:
        e.close()


def test_malformed_answer_is_zero_with_the_scorer_error_kept(env):
    start(env, 3)
    _, reward, terminated, _, info = env.step("<answer>two times three</answer>")
    assert (reward, terminated) == (0.0, True)
    assert "ValueError" in info["check_error"]


def test_no_answer_scores_zero(env):
    start(env, 4)
    _, reward, terminated, _, info = env.step("I am not sure.")
    assert (reward, terminated) == (0.0, True) and info["check"] == "no_answer" and info["answer"] is None


def test_tool_call_then_answer(env):
    p = start(env, 5)
    n = p.metadata["entry"]["metadata"]["number"]
    obs, _, terminated, _, _ = env.step(f"<code>print({n} % 2)</code>")
    assert not terminated and obs.startswith("\n<interpreter>\n") and obs.strip().endswith("</interpreter>")
    _, reward, terminated, _, _ = env.step(f"<answer>{p.answer}</answer>")
    assert (reward, terminated) == (1.0, True)


def test_prompt_has_the_generator_question_and_the_answer_format(env):
    p = start(env)
    messages, _ = env.reset(seed=0, options={"problem_id": p.id})
    assert messages[-1] == {"role": "user", "content": p.prompt}
    assert "<answer>" in messages[0]["content"]
    assert "<answer>169</answer>" in messages[2]["content"]


def test_answers_equivalent_ignores_whitespace_only(env):
    assert env.answers_equivalent("2 × 3", "2  ×   3")
    assert not env.answers_equivalent("2 × 3", "3 × 2")
    assert not env.answers_equivalent(None, "2")


def test_the_scorer_evaluates_answers_in_the_sandbox_not_on_the_host(tmp_path):
    # puzzle24's scorer hands the answer to sympy's parse_expr, which evaluates it as Python
    env = ReasoningGymEnv("test", task="puzzle24", num_problems=2, sandbox="local", score_timeout_s=2.0)
    marker = tmp_path / "written-by-the-answer"
    try:
        env.reset(options={"problem_id": env.problem_ids[0]})
        payload = f"__import__('pathlib').Path({str(marker)!r}).write_text('x') and 24"
        _, reward, terminated, _, info = env.step(f"<answer>{payload}</answer>")
        assert terminated and reward == 0.0
        assert not marker.exists()
        env.reset(options={"problem_id": env.problem_ids[0]})
        _, reward, *_, info = env.step("<answer>__import__('time').sleep(60) or 24</answer>")
        assert "longer than 2.0 s" in info["check_error"]
        assert reward == 0.0
    finally:
        env.close()
