"""countdown-python-v0: the expression checker, the problem generator and the reward."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spo_agents.envs.countdown import CountdownEnv, evaluate_expression, generate_problems, normalize_expression
from spo_agents.types import Problem

NUMBERS = [3, 5, 25, 50]
PROBLEM = Problem(
    "countdown/3-5-25-50/110", "Numbers: [3, 5, 25, 50]. Target: 110.", "110", {"numbers": NUMBERS, "target": 110}
)


@pytest.fixture
def env():
    e = CountdownEnv(problems=[PROBLEM], sandbox="local")
    yield e
    e.close()


def play(env, *actions):
    env.reset(seed=0, options={"problem_id": PROBLEM.id})
    for a in actions:
        out = env.step(a)
        if out[2] or out[3]:
            return out
    return out


# --- the checker ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "expr",
    [
        "(25 - 3) * 5",
        "5*(25-3)",
        "5 \\times (25 - 3)",
        "(25 − 3) × 5",
        "\\left(25-3\\right)\\cdot 5",
        "(25 - 3) * 5 = 110",
        "{25 - 3} * 5",
    ],
)
def test_equivalent_spellings_of_a_right_answer_reach_the_target(expr):
    ev = evaluate_expression(expr, NUMBERS)
    assert ev.legal, ev
    assert ev.value == 110


def test_fraction_and_division_are_exact():
    ev = evaluate_expression("\\frac{50}{5} * 3", NUMBERS)
    assert ev.legal and ev.value == 30
    ev = evaluate_expression("50 / 3", NUMBERS)
    assert ev.value == Fraction(50, 3)  # no float rounding


@pytest.mark.parametrize(
    "expr, error",
    [
        (None, "no_answer"),
        ("", "no_answer"),
        ("25 +", "syntax"),
        ("(25 - 3", "syntax"),
        ("x + 3", "not_allowed"),
        ("5 ** 3", "not_allowed"),
        ("-3 + 25", "not_allowed"),
        ("25.0 + 3", "not_allowed"),
        ("__import__('os').system('true')", "not_allowed"),
        ("(lambda: 3)()", "not_allowed"),
        ("25 + 7", "number_not_given"),
        ("25 + 25", "number_reused"),
        ("50 / (3 - 3)", "division_by_zero"),
        ("1" * 500, "too_long"),
    ],
)
def test_malformed_and_illegal_expressions_name_the_rule(expr, error):
    ev = evaluate_expression(expr, NUMBERS)
    assert not ev.legal
    assert ev.error == error


def test_numbers_given_twice_may_be_used_twice():
    assert evaluate_expression("5 * 5", [5, 5, 1]).legal
    assert evaluate_expression("5 * 5 * 5", [5, 5, 1]).error == "number_reused"


def test_normalization_keeps_a_plain_expression():
    assert normalize_expression(" (1 + 2) * 3 ") == "(1 + 2) * 3"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_text_is_checked_without_raising(text):
    ev = evaluate_expression(text, NUMBERS)
    assert ev.legal or ev.error is not None


# --- problems -----------------------------------------------------------------------------------
def test_every_generated_problem_is_solvable_by_its_own_construction():
    for p in generate_problems("train", 300, seed=3):
        ev = evaluate_expression(p.metadata["solution"], p.metadata["numbers"])
        assert ev.legal, p
        assert ev.value == int(p.answer), p
        assert 1 <= int(p.answer) <= 1000


def test_splits_are_disjoint_and_ids_stable():
    train = generate_problems("train", 400, seed=0)
    test = generate_problems("test", 100, seed=0)
    assert not {p.id for p in train} & {p.id for p in test}
    assert len({p.id for p in train}) == 400
    assert [p.id for p in generate_problems("train", 400, seed=0)] == [p.id for p in train]
    assert [p.id for p in generate_problems("train", 50, seed=1)] != [p.id for p in train[:50]]


# --- the env's reward -------------------------------------------------------------------------------
def test_right_answer_scores_one(env):
    obs, reward, terminated, truncated, info = play(env, "Easy: \\boxed{(25 - 3) * 5}")
    assert (reward, terminated, truncated) == (1.0, True, False)
    assert info["correct"] and info["check"] == "ok" and info["answer"] == "(25 - 3) * 5"


def test_wrong_value_scores_zero(env):
    _, reward, terminated, _, info = play(env, "\\boxed{25 * 3 + 5}")
    assert (reward, terminated) == (0.0, True)
    assert info["check"] == "wrong_value" and info["value"] == "80"


def test_illegal_number_reaching_the_target_scores_zero(env):
    _, reward, _, _, info = play(env, "\\boxed{100 + 10}")
    assert reward == 0.0 and info["check"] == "number_not_given"


def test_missing_box_scores_zero(env):
    _, reward, terminated, _, info = play(env, "The answer is (25 - 3) * 5")
    assert (reward, terminated) == (0.0, True)
    assert info["check"] == "no_answer"


def test_tool_call_runs_in_the_sandbox_then_the_answer_is_scored(env):
    env.reset(seed=0, options={"problem_id": PROBLEM.id})
    obs, reward, terminated, truncated, info = env.step("Let me try. <code>print((25 - 3) * 5)</code>")
    assert "110" in obs and obs.startswith("\n<interpreter>")
    assert not (terminated or truncated) and reward == 0.0
    _, reward, terminated, _, _ = env.step("So \\boxed{5 * (25 - 3)}.")
    assert (reward, terminated) == (1.0, True)


def test_answers_equivalent_for_majority_voting(env):
    assert env.answers_equivalent("(25 - 3) * 5", "5 \\times (25-3)")
    assert not env.answers_equivalent("(25 - 3) * 5", "50 + 50 + 10")  # same value, other numbers
    assert not env.answers_equivalent("(25 - 3) * 5", "(25 - 3) * 3")
    assert not env.answers_equivalent("(25 - 3", "(25 - 3")
    assert not env.answers_equivalent(None, "3")


def test_prompt_shows_numbers_target_and_a_countdown_example(env):
    messages, _ = env.reset(seed=0, options={"problem_id": PROBLEM.id})
    assert messages[0]["role"] == "system" and "\\boxed{expression}" in messages[0]["content"]
    assert "\\boxed{(5 - 2) * 10}" in messages[2]["content"]  # the one-shot answers countdown-style
    assert messages[-1]["content"].startswith("Numbers: [3, 5, 25, 50]. Target: 110.")
