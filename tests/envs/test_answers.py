"""Final-answer extraction and equivalence, and the `math-python` reward against hand labels."""

from __future__ import annotations

import threading

import pytest

from spo_agents.envs.answers import AnswerChecker, exact_number, extract_boxed, normalize, quick_check
from spo_agents.envs.math_python import MathPythonEnv
from spo_agents.types import Problem

# (everything the model wrote, reference answer, hand label: reward 1 or 0)
LABELLED = [
    # right, same spelling
    (r"\boxed{1776}", "1776", 1),
    (r"The answer is \boxed{ 42 }.", "42", 1),
    (r"\boxed{-7}", "-7", 1),
    # scientific notation
    (r"\boxed{1e3}", "1000", 1),
    (r"\boxed{2.5E-2}", r"\frac{1}{40}", 1),
    (r"$\boxed{5}$", "5", 1),
    (r"\boxed{2\pi}", "2\\pi", 1),
    (r"first \boxed{3}, then I recheck: \boxed{4}", "4", 1),
    # right, equivalent but written differently
    (r"\boxed{0.5}", "1/2", 1),
    (r"\boxed{\frac{1}{2}}", "0.5", 1),
    (r"\boxed{1/2}", r"\frac{1}{2}", 1),
    (r"\boxed{\dfrac{3}{4}}", "0.75", 1),
    (r"\boxed{\frac34}", "3/4", 1),
    (r"\boxed{2.0}", "2", 1),
    (r"\boxed{1,776}", "1776", 1),
    (r"\boxed{1{,}000}", "1000", 1),
    (r"\boxed{.5}", "0.5", 1),
    (r"\boxed{6/4}", "3/2", 1),
    (r"\boxed{\frac{-1}{2}}", "-0.5", 1),
    (r"\boxed{-\frac{1}{2}}", "-1/2", 1),
    (r"\boxed{50\%}", "0.5", 1),
    (r"\boxed{x+1}", "1+x", 1),
    (r"\boxed{3x+2y}", "2y+3x", 1),
    (r"\boxed{\sqrt{12}}", r"2\sqrt{3}", 1),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\sqrt{2}/2", 1),
    (r"\boxed{x = 3}", "3", 1),
    (r"\boxed{10^{3}}", "1000", 1),
    (r"\boxed{2^{10}}", "1024", 1),
    (r"\boxed{\sqrt{16}}", "4", 1),
    (r"\boxed{(1, 2)}", "(1,2)", 1),
    (r"\boxed{\text{5}}", "5", 1),
    (r"\boxed{\pi}", r"\pi", 1),
    ("\ufffd\ufffd garbage then \\boxed{5}", "5", 1),
    # wrong
    (r"\boxed{1777}", "1776", 0),
    (r"\boxed{17760}", "1776", 0),
    (r"\boxed{-42}", "42", 0),
    (r"\boxed{12}", "21", 0),
    (r"\boxed{0.5}", "0.25", 0),
    (r"\boxed{1/3}", "0.33", 0),
    (r"\boxed{\pi}", "3.14", 0),
    (r"\boxed{x-1}", "x+1", 0),
    (r"\boxed{x^2}", "2x", 0),
    (r"\boxed{2}", r"\sqrt{2}", 0),
    (r"\boxed{(1,3)}", "(1,2)", 0),
    (r"\boxed{4} no wait \boxed{3}", "4", 0),
    (r"\boxed{\frac{1}{0}}", "1", 0),
    # malformed
    ("The answer is 1776.", "1776", 0),
    (r"\boxed{1776", "1776", 0),
    ("", "1776", 0),
    (r"\boxed{}", "1776", 0),
    (r"boxed{42}", "42", 0),
    ("<code>print(1)", "1", 0),
    (r"\boxed{abc}", "3", 0),
    (r"\boxed{}}}{{", "5", 0),
    (r"\boxed{1776} and finally \boxed{", "1776", 0),
    ("\\boxed{" + "9" * 2000 + "}", "9", 0),
]


def test_the_labelled_set_is_big_and_balanced():
    assert len(LABELLED) >= 50
    assert 20 <= sum(label for _, _, label in LABELLED) <= len(LABELLED) - 20


@pytest.fixture(scope="module")
def labelled_env(checker):
    problems = [Problem(id=f"p{i}", prompt="q", answer=ref) for i, (_, ref, _) in enumerate(LABELLED)]
    env = MathPythonEnv(problems=problems, sandbox=None, checker=checker, one_shot=False)
    yield env
    env.close()


@pytest.mark.parametrize(
    "i", range(len(LABELLED)), ids=[f"{i}:{t[:30]!r}->{r!r}" for i, (t, r, _) in enumerate(LABELLED)]
)
def test_math_python_reward_matches_hand_label(labelled_env, i):
    text, ref, label = LABELLED[i]
    labelled_env.reset(options={"problem_id": f"p{i}"})
    _, reward, terminated, truncated, info = labelled_env.step(text)
    assert terminated and not truncated
    assert reward == float(label), (text, ref, info)
    assert info["correct"] is bool(label)


# --- extraction ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        (r"\boxed{5}", "5"),
        (r"a \boxed{1} b \boxed{2} c", "2"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{{a}{b}}", "{a}{b}"),
        (r"\fbox{7}", "7"),
        (r"\boxed 9 apples", "9"),
        (r"\boxed{5", None),
        (r"\boxed{5} \boxed{", None),
        ("no box here", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_normalize_and_exact_numbers():
    assert normalize(r" $\dfrac{1}{2}$ ") == r"\frac{1}{2}"
    assert normalize(r"\frac12") == r"\frac{1}{2}"
    assert normalize(r"\text{ 7 }.") == "7"
    assert exact_number("1,234") == 1234
    assert exact_number(r"-\frac{3}{6}") == exact_number("-0.5")
    assert exact_number("1,23") is None
    assert exact_number("x") is None
    assert exact_number(r"\frac{1}{0}") is None


def test_quick_check_decides_only_when_certain():
    assert quick_check("0.5", "1/2") is True
    assert quick_check("12", "13") is False
    assert quick_check("0.333333", "1/3") is None  # rounding questions go to math-verify
    assert quick_check("x+1", "1+x") is None
    assert quick_check("", "1") is False


# --- the bounded symbolic check -----------------------------------------------------------
def test_symbolic_check_runs_in_a_worker_and_is_counted(checker):
    before = checker.symbolic
    result = checker.check("x+1", "1+x")
    assert result.correct and result.method == "math-verify"
    assert checker.symbolic == before + 1


def test_a_check_past_its_time_bound_is_incorrect_and_the_worker_is_replaced():
    c = AnswerChecker(workers=1, timeout_s=10.0)
    try:
        assert c.check("y+2", "2+y").correct  # starts the worker
        slow = c.check("(x+1)^{300}", "x^{300}+1", timeout_s=0.0001)
        assert slow.method == "timeout" and slow.timed_out and not slow.correct
        assert c.timeouts == 1
        assert c.check("2y", "y+y").correct  # a fresh worker answers
    finally:
        c.close()
        c.close()  # safe twice


def test_checks_from_many_threads(checker):
    cases = [("a+b", "b+a", True), ("2a", "a+a", True), ("a-b", "b-a", False), ("a*b", "b*a", True)] * 3
    results: dict[int, bool] = {}

    def work(i, pred, ref):
        results[i] = checker.check(pred, ref).correct

    threads = [threading.Thread(target=work, args=(i, p, r)) for i, (p, r, _) in enumerate(cases)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {i: expected for i, (_, _, expected) in enumerate(cases)}


def test_a_closed_checker_reports_an_error_instead_of_raising():
    c = AnswerChecker(workers=1)
    c.close()
    r = c.check("x", "y")
    assert not r.correct and r.method == "error"
