"""`math-python-v0`: math problems with a Python interpreter (docs/algorithm.md section 5, paper Sec. 5).

The prompt is the problem, after an optional system message and one-shot example of the tool
format. The model writes Python between `<code>` and `</code>`; generation stops there, the code
runs in the episode's sandbox session (at most `max_tool_calls` calls, variables persist) and the
interpreter's reply continues the same assistant turn. The episode ends when the model's text
does not end with a code block: reward 1.0 when the last `\\boxed{...}` is equivalent to the
reference (`spo_agents.envs.answers`), else 0.0; a budget or a sandbox failure truncates it
(reward 0.0).

Episode, info keys and options in detail: docs/environments.md, section "math-python-v0".
Version history: v0, the first.

Departures from the paper:
1. Answers are checked symbolically (string, exact number, then `math-verify`, each bounded in
   time), not by exact string match.
"""

from __future__ import annotations

import time
from typing import Any

from spo_agents.envs.answers import AnswerChecker, CheckResult, default_checker
from spo_agents.envs.base import Message
from spo_agents.envs.problems import ProblemSet, load_problems
from spo_agents.envs.tool_env import (
    CODE_CLOSE,
    CODE_OPEN,
    ToolEnv,
    Verdict,
    find_code,
    format_result,
    interpreter_reply,
    tool_example,
)
from spo_agents.types import Problem

__all__ = [
    "CODE_CLOSE",
    "CODE_OPEN",
    "DEFAULT_SYSTEM_PROMPT",
    "MathPythonEnv",
    "find_code",
    "format_result",
    "interpreter_reply",
    "one_shot_messages",
]

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant that solves math problems. You can run Python code: write it "
    "between <code> and </code> and its output will be shown between <interpreter> and "
    "</interpreter>. You can run code at most {max_tool_calls} times. Give the final answer "
    "as \\boxed{{answer}}."
)

ONE_SHOT_QUESTION = "What is 123 * 45?"
ONE_SHOT_CODE = "print(123 * 45)"
ONE_SHOT_OUTPUT = "5535"
ONE_SHOT_ANSWER = "The answer is \\boxed{5535}."


def one_shot_messages() -> list[Message]:
    """The one-shot example of the tool format: a code block, its interpreter reply, a boxed answer."""
    return tool_example(ONE_SHOT_QUESTION, ONE_SHOT_CODE, ONE_SHOT_OUTPUT, ONE_SHOT_ANSWER)


class MathPythonEnv(ToolEnv):
    """Math with a Python tool: <code> runs in a sandbox, reward 1 if the last \\boxed{} matches."""

    default_system_prompt = DEFAULT_SYSTEM_PROMPT

    def __init__(
        self,
        split: str = "train",
        *,
        source: str | None = None,
        num_problems: int | None = None,
        dataset_path: Any = None,
        fields: Any = None,
        seed: int = 0,
        test_fraction: float = 0.1,
        skip_bad: bool = False,
        source_options: dict[str, Any] | None = None,
        problems: list[Problem] | ProblemSet | None = None,
        check_timeout_s: float = 5.0,
        checker: AnswerChecker | None = None,
        **kwargs: Any,
    ) -> None:
        if problems is None:
            problems = load_problems(
                source,
                split,
                seed=seed,
                size=num_problems,
                dataset_path=dataset_path,
                fields=fields,
                test_fraction=test_fraction,
                skip_bad=skip_bad,
                source_options=source_options,
            )
        super().__init__(problems, **kwargs)
        self.split = split
        self.check_timeout_s = check_timeout_s
        self._checker = checker

    @property
    def checker(self) -> AnswerChecker:
        return self._checker if self._checker is not None else default_checker()

    def one_shot_messages(self) -> list[Message]:
        return one_shot_messages()

    def score_answer(self, answer: str | None, problem: Problem) -> Verdict:
        """1.0 when `answer` is equivalent to one of the references (`spo_agents.envs.answers`)."""
        check = self._check(answer, problem.answer)
        extra = {"check_error": check.error} if check.error else {}
        return Verdict(1.0 if check.correct else 0.0, check.correct, check.method, extra)

    def _check(self, answer: str | None, reference: Any) -> CheckResult:
        start = time.perf_counter()
        try:
            refs = reference if isinstance(reference, (list, tuple)) else [reference]
            result = CheckResult(False, "empty")
            for ref in refs:
                if ref is None:
                    continue
                result = self.checker.check(answer, ref, self.check_timeout_s)
                if result.correct or answer is None:
                    break
            return result
        finally:
            self.add_timing("check_s", time.perf_counter() - start)

    def answers_equivalent(self, a: Any, b: Any) -> bool:
        """Symbolic equivalence of two final answers (maj@k counts equivalent answers together)."""
        if a is None or b is None:
            return False
        return self.checker.check(a, b, self.check_timeout_s).correct
