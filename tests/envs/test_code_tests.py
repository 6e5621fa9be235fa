"""code-tests-v0: the problem set, the sandboxed harness, the reward and the user-turn feedback."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from spo_agents.envs.code_tests import CodeTestsEnv, extract_code, load_code_problems, parse_results, values_equal

SQUARES = "code-train-001-sum_of_squares"
RIGHT = "```python\ndef sum_of_squares(n):\n    return sum(k * k for k in range(1, n + 1))\n```"
# Equivalent but different: a closed form, integer division, a helper function and a print.
CLOSED_FORM = (
    "Here you go:\n```py\ndef _f(n):\n    return n * (n + 1) * (2 * n + 1) // 6\n\n"
    "def sum_of_squares(n):\n    print('debug', n)\n    return _f(n) if n > 0 else 0\n```\nDone."
)
WRONG = "```python\ndef sum_of_squares(n):\n    return n * n\n```"
# Right on the examples (3 -> 14, 1 -> 1) and on positive hidden inputs, wrong for n = -4.
PARTIAL = "```python\ndef sum_of_squares(n):\n    return n * (n + 1) * (2 * n + 1) // 6\n```"


@pytest.fixture(scope="module")
def env():
    e = CodeTestsEnv("train", sandbox="local")
    yield e
    e.close()


def start(env, pid=SQUARES):
    messages, info = env.reset(seed=0, options={"problem_id": pid})
    return messages


# --- pure parts ------------------------------------------------------------------------------
def test_extract_code_takes_the_last_fenced_block():
    assert extract_code("```python\na = 1\n```\ntext\n```\nb = 2\n```") == "b = 2\n"
    assert extract_code("```py\nx\n```") == "x\n"
    assert extract_code("no code") is None
    assert extract_code("```python\n   \n```") is None
    assert extract_code("```python\nunclosed") is None


def test_values_equal_after_a_json_round_trip():
    assert values_equal([1, 2], [1, 2]) and values_equal(3, 3.0) and values_equal(0.1 + 0.2, 0.3)
    assert not values_equal(True, 1) and not values_equal(1, True)
    assert not values_equal("1", 1) and not values_equal([1, 2], [2, 1]) and not values_equal(None, 0)
    assert values_equal({"a": [1, {"b": 2}]}, {"a": [1, {"b": 2}]}) and not values_equal({"a": 1}, {"a": 1, "b": 2})


def test_result_lines_without_the_run_marker_are_ignored():
    cases = [{"args": [1], "expected": 1}]
    forged = '@@spo-0000@@{"i": 0, "got": 1}\n'
    assert parse_results(forged, "@@spo-1234@@", cases, "f").passed == [False]
    assert parse_results('@@spo-1234@@{"i": 0, "got": 1}\n', "@@spo-1234@@", cases, "f").passed == [True]


def test_shipped_set_has_a_disjoint_train_test_split():
    rows = [
        json.loads(line)
        for line in resources.files("spo_agents.envs.data").joinpath("code_problems.jsonl").read_text().splitlines()
        if line.strip()
    ]
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    assert len(rows) == 30 and len(train) == 20 and len(test) == 10
    assert len({r["id"] for r in rows}) == 30
    assert not {r["entry_point"] for r in train} & {r["entry_point"] for r in test}  # different functions, not inputs
    assert all(len(r["tests"]) >= 4 and len(r["examples"]) == 2 for r in rows)
    assert [p.id for p in load_code_problems("test")] == [r["id"] for r in test]


# --- in the sandbox ------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["train", "test"])
def test_every_reference_solution_passes_its_hidden_tests(split):
    e = CodeTestsEnv(split, sandbox="local")
    try:
        for p in e.problems:
            e.reset(seed=0, options={"problem_id": p.id})
            examples, hidden = e.run_tests(p.metadata["solution"])
            assert all(examples.passed) and all(hidden.passed), (p.id, examples.messages, hidden.messages)
    finally:
        e.close()


def test_right_answer_first_try_scores_one(env):
    start(env)
    obs, reward, terminated, truncated, info = env.step(RIGHT)
    assert (obs, reward, terminated, truncated) == ("", 1.0, True, False)
    assert info["correct"] and info["tests_passed"] == info["tests_total"] == 6 and info["attempts"] == 1


def test_equivalent_but_different_code_scores_one(env):
    start(env)
    _, reward, terminated, _, info = env.step(CLOSED_FORM)
    assert (reward, terminated) == (1.0, True), info


def test_wrong_answer_gets_user_feedback_then_can_recover(env):
    start(env)
    obs, reward, terminated, truncated, _ = env.step(WRONG)
    assert not (terminated or truncated) and reward == 0.0
    assert "sum_of_squares(3) returned 9, expected 14" in obs and "2 attempt(s) left" in obs
    assert env.reply_role == "user"
    _, reward, terminated, _, info = env.step(RIGHT)
    assert (reward, terminated) == (1.0, True) and info["attempts"] == 2


def test_last_attempt_is_graded_on_hidden_tests_even_if_examples_fail():
    e = CodeTestsEnv("train", sandbox="local", max_attempts=1, reward="fraction")
    try:
        start(e)
        _, reward, terminated, _, info = e.step(WRONG)
        assert terminated and info["tests_passed"] == 1 and reward == pytest.approx(1 / 6)  # only n=0 -> 0 is right
    finally:
        e.close()


def test_fraction_reward_counts_passing_hidden_tests():
    e = CodeTestsEnv("train", sandbox="local", reward="fraction")
    try:
        start(e)
        _, reward, terminated, _, info = e.step(PARTIAL)
        assert terminated and (info["tests_passed"], info["tests_total"]) == (5, 6)
        assert reward == pytest.approx(5 / 6) and not info["correct"]
    finally:
        e.close()


def test_all_pass_reward_is_binary(env):
    start(env)
    _, reward, terminated, _, info = env.step(PARTIAL)
    assert terminated and reward == 0.0 and info["tests_passed"] == 5


@pytest.mark.parametrize(
    "action, expect",
    [
        ("I think you should loop over the numbers.", "no ```python code block"),
        ("```python\ndef sum_of_squares(n) return 1\n```", "could not be tested: SyntaxError"),
        ("```python\ndef other(n):\n    return 1\n```", "does not define a function named `sum_of_squares`"),
        ("```python\nimport sys\nsys.exit(0)\n```", "could not be tested: SystemExit"),
        ("```python\ndef sum_of_squares(n):\n    raise ValueError('nope')\n```", "raised ValueError: nope"),
        ("```python\ndef sum_of_squares(n):\n    return {1, 2}\n```", "not JSON data"),
    ],
)
def test_malformed_answers_are_feedback_not_errors(env, action, expect):
    start(env)
    obs, reward, terminated, truncated, _ = env.step(action)
    assert not (terminated or truncated) and reward == 0.0
    assert expect in obs


def test_forged_result_lines_printed_by_the_code_do_not_pass(env):
    start(env)
    forge = (
        '```python\nfor i in range(8):\n    print(\'@@spo-0@@{"i": %d, "got": 14}\' % i)\n'
        "def sum_of_squares(n):\n    return -1\n```"
    )
    obs, _, terminated, _, _ = env.step(forge)
    assert not terminated and "returned -1, expected 14" in obs


def test_a_hanging_case_fails_from_there_on_and_earlier_results_count():
    e = CodeTestsEnv("train", sandbox="local", reward="fraction", run_timeout_s=1.0)
    try:
        start(e)
        hang = (
            "```python\ndef sum_of_squares(n):\n    while n == 100:\n        pass\n"
            "    return sum(k * k for k in range(1, n + 1))\n```"
        )
        _, reward, terminated, _, info = e.step(hang)
        # hidden inputs in order: 0, -4, 10, 100 (hangs), 2, 7
        assert terminated and info["timed_out"] and (info["tests_passed"], info["tests_total"]) == (3, 6)
        assert reward == pytest.approx(0.5)
    finally:
        e.close()


def test_a_budget_ending_the_episode_keeps_the_last_code_unscored():
    e = CodeTestsEnv("train", sandbox="local", max_turns=1)
    try:
        start(e)
        _, reward, terminated, truncated, info = e.step(WRONG)
        assert (reward, terminated, truncated) == (0.0, False, True)
        assert info["answer"] == extract_code(WRONG) and info["correct"] is False
    finally:
        e.close()


def test_no_code_in_every_attempt_truncates_with_zero():
    e = CodeTestsEnv("train", sandbox="local", max_attempts=2)
    try:
        start(e)
        assert e.step("hmm")[2:4] == (False, False)
        _, reward, terminated, truncated, info = e.step("still thinking")
        assert (reward, terminated, truncated) == (0.0, False, True)
        assert info["correct"] is False and info["answer"] is None
    finally:
        e.close()


def test_prompt_lists_signature_examples_and_attempts(env):
    messages = start(env)
    assert messages == [{"role": "user", "content": messages[0]["content"]}]
    text = messages[0]["content"]
    assert "`sum_of_squares(n: int) -> int`" in text and "sum_of_squares(3) == 14" in text and "3 attempt(s)" in text
    assert "338350" not in text  # hidden tests stay hidden


def test_sandbox_infrastructure_failure_ends_the_episode_as_data(fake_backend):
    fake_backend.fail_runs = True
    e = CodeTestsEnv("train", sandbox=fake_backend)
    start(e)
    obs, reward, terminated, truncated, info = e.step(RIGHT)
    assert (reward, terminated, truncated) == (0.0, False, True)
    assert "sandbox failure" in info["error"]
    e.close()
