"""`countdown-python-v0`: reach a target number from a few given numbers, with a Python tool.

The model gets `count` numbers and a target built from them, may run Python between `<code>` and
`</code>` as in `math-python`, and answers with `\\boxed{expression}`. Reward 1.0 when the
expression is legal (integer literals, `+ - * /` and parentheses, each given number at most once)
and exactly equals the target, else 0.0; it is parsed with `ast`, never evaluated as Python.

Observation, the legal forms of an answer, `info["check"]`, termination and options:
docs/environments.md, section "countdown-python-v0". Version history: v0, the first.
"""

from __future__ import annotations

import ast
import functools
import re
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from spo_agents.errors import EnvError
from spo_agents.types import Problem

from .base import Message
from .problems import content_split
from .tool_env import ToolEnv, Verdict, tool_example

MAX_EXPRESSION_CHARS = 200

SYSTEM_PROMPT = (
    "You are a helpful assistant that plays the countdown numbers game. You can run Python code: "
    "write it between <code> and </code> and its output will be shown between <interpreter> and "
    "</interpreter>. You can run code at most {max_tool_calls} times. Give the final expression "
    "as \\boxed{{expression}}, using + - * / and parentheses, each given number at most once."
)
ONE_SHOT_NUMBERS, ONE_SHOT_TARGET = [2, 5, 10], 30
ONE_SHOT_CODE = "print((5 - 2) * 10)"


def render_prompt(numbers: list[int], target: int) -> str:
    return (
        f"Numbers: {numbers}. Target: {target}.\n"
        f"Write an arithmetic expression that equals {target}, using each number at most once."
    )


# --------------------------------------------------------------------------------------------
# The expression checker
# --------------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """The outcome of checking one expression: `value` is exact; `error` names the broken rule
    (`None` when the expression is legal)."""

    expression: str | None
    value: Fraction | None = None
    numbers_used: list[int] = field(default_factory=list)
    error: str | None = None
    message: str = ""

    @property
    def legal(self) -> bool:
        return self.error is None and self.value is not None


_LATEX = [
    (r"\times", "*"),
    (r"\cdot", "*"),
    ("×", "*"),
    ("·", "*"),
    ("∗", "*"),
    (r"\div", "/"),
    ("÷", "/"),
    ("−", "-"),
    ("–", "-"),
    (r"\left", ""),
    (r"\right", ""),
    ("$", ""),
    (r"\!", ""),
    (r"\,", ""),
    (r"\ ", " "),
]
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")


def normalize_expression(text: str) -> str:
    """Plain Python arithmetic from a boxed answer: LaTeX operators, `\\frac{a}{b}`, braces used
    as brackets, and a trailing `= target` removed."""
    s = text.strip()
    for a, b in _LATEX:
        s = s.replace(a, b)
    for _ in range(3):  # nested fractions, innermost first
        s = _FRAC.sub(r"((\1)/(\2))", s)
    s = s.replace("{", "(").replace("}", ")").replace("[", "(").replace("]", ")")
    if "=" in s:
        s = s.split("=", 1)[0]
    return s.strip()


def evaluate_expression(text: str | None, numbers: list[int] | None) -> Evaluation:
    """Check `text` against the countdown rules with `numbers` (None: any numbers, used to compare
    two answers). Never runs code: the expression is parsed with `ast` and folded exactly."""
    if text is None or not text.strip():
        return Evaluation(text, error="no_answer", message="no \\boxed{} expression found")
    expr = normalize_expression(text)
    if len(expr) > MAX_EXPRESSION_CHARS:
        return Evaluation(text, error="too_long", message=f"longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        return Evaluation(text, error="syntax", message=f"not an arithmetic expression ({type(e).__name__})")
    used: list[int] = []

    def fold(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            a, b = fold(node.left), fold(node.right)
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            if isinstance(node.op, ast.Mult):
                return a * b
            if b == 0:
                raise ZeroDivisionError
            return a / b
        raise _NotAllowed(_describe(node))

    try:
        value = fold(tree.body)
    except ZeroDivisionError:
        return Evaluation(text, None, used, "division_by_zero", "division by zero")
    except _NotAllowed as e:
        return Evaluation(
            text, None, used, "not_allowed", f"only whole numbers, + - * / and parentheses are allowed, found {e}"
        )
    except RecursionError:
        return Evaluation(text, None, used, "syntax", "nested too deeply")
    if numbers is not None:
        given, want = Counter(numbers), Counter(used)
        for n, k in want.items():
            if n not in given:
                return Evaluation(text, value, used, "number_not_given", f"{n} is not one of {sorted(numbers)}")
            if k > given[n]:
                return Evaluation(
                    text, value, used, "number_reused", f"{n} is used {k} times but given {given[n]} time(s)"
                )
    return Evaluation(text, value, used)


class _NotAllowed(Exception):
    pass


def _describe(node: ast.AST) -> str:
    if isinstance(node, ast.BinOp):
        return f"the operator `{type(node.op).__name__}`"
    if isinstance(node, ast.UnaryOp):
        return "a unary sign (only the given numbers, which are positive, may appear)"
    if isinstance(node, ast.Constant):
        return f"the literal {node.value!r}"
    if isinstance(node, ast.Name):
        return f"the name `{node.id}`"
    return f"a `{type(node).__name__}`"


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------
def _make_one(rng: Any, count: int, max_number: int, max_target: int) -> tuple[list[int], int, str] | None:
    numbers = sorted(int(x) for x in rng.integers(1, max_number + 1, size=count))
    order = [int(i) for i in rng.permutation(count)[: int(rng.integers(2, count + 1))]]
    value, expr = Fraction(numbers[order[0]]), str(numbers[order[0]])
    for i in order[1:]:
        b = numbers[i]
        op = str(rng.choice(["+", "-", "*", "/"]))
        if op == "/" and (value % b != 0 or b == 1):
            op = "*"
        if op == "-" and value - b <= 0:
            op = "+"
        value = {"+": value + b, "-": value - b, "*": value * b, "/": value / b}[op]
        expr = f"({expr} {op} {b})"
    target = int(value)
    if value.denominator != 1 or not 1 <= target <= max_target or target in numbers:
        return None
    return numbers, target, expr[1:-1] if expr.startswith("(") else expr


def generate_problems(
    split: str,
    num_problems: int,
    *,
    seed: int = 0,
    count: int = 4,
    max_number: int = 100,
    max_target: int = 1000,
    test_fraction: float = 0.1,
) -> list[Problem]:
    """`num_problems` distinct problems of `split`. Ids are the content (`countdown/3-7-25-50/109`),
    so they are stable across runs and machines; splits are disjoint by a hash of the content.
    Cached per arguments: the many env instances of a run share one generated set."""
    return list(_generate(split, num_problems, seed, count, max_number, max_target, test_fraction))


@functools.lru_cache(maxsize=16)
def _generate(
    split: str, num_problems: int, seed: int, count: int, max_number: int, max_target: int, test_fraction: float
) -> tuple[Problem, ...]:
    import numpy as np

    if split not in ("train", "test"):
        raise EnvError(f"`split` must be `train` or `test`, got `{split}`")
    if count < 2 or max_number < 2 or max_target < 1 or num_problems < 1:
        raise EnvError(
            "countdown needs count >= 2, max_number >= 2, max_target >= 1 and num_problems >= 1, "
            f"got {count}, {max_number}, {max_target}, {num_problems}"
        )
    rng = np.random.default_rng([seed, count, max_number, max_target])
    problems: dict[str, Problem] = {}
    for _ in range(num_problems * 200):
        made = _make_one(rng, count, max_number, max_target)
        if made is None:
            continue
        numbers, target, solution = made
        prompt = render_prompt(numbers, target)
        pid = f"countdown/{'-'.join(map(str, numbers))}/{target}"
        if pid in problems or content_split(prompt, str(target), test_fraction) != split:
            continue
        problems[pid] = Problem(pid, prompt, str(target), {"numbers": numbers, "target": target, "solution": solution})
        if len(problems) == num_problems:
            break
    if not problems:
        raise EnvError(
            "no countdown problems could be generated with "
            f"count={count}, max_number={max_number}, max_target={max_target}"
        )
    return tuple(problems.values())


class CountdownEnv(ToolEnv):
    """Countdown with a Python tool: reach the target with + - * / and each number at most once."""

    default_system_prompt = SYSTEM_PROMPT

    def __init__(
        self,
        split: str = "train",
        *,
        num_problems: int | None = None,
        seed: int = 0,
        count: int = 4,
        max_number: int = 100,
        max_target: int = 1000,
        test_fraction: float = 0.1,
        problems: list[Problem] | None = None,
        **kwargs: Any,
    ) -> None:
        if problems is None:
            size = num_problems if num_problems is not None else (1000 if split == "train" else 200)
            problems = generate_problems(
                split,
                size,
                seed=seed,
                count=count,
                max_number=max_number,
                max_target=max_target,
                test_fraction=test_fraction,
            )
        for p in problems:
            if not isinstance(p.metadata.get("numbers"), list):
                raise EnvError(
                    f"countdown problem `{p.id}` needs `metadata['numbers']` (a list of ints) "
                    "and the target as `answer`"
                )
        super().__init__(problems, **kwargs)
        self.split = split

    def one_shot_messages(self) -> list[Message]:
        question = render_prompt(ONE_SHOT_NUMBERS, ONE_SHOT_TARGET)
        return tool_example(question, ONE_SHOT_CODE, str(ONE_SHOT_TARGET), "The answer is \\boxed{(5 - 2) * 10}.")

    def score(self, expression: str | None, problem: Problem) -> Evaluation:
        """Check `expression` against `problem`; `legal` and `value == target` means correct."""
        return evaluate_expression(expression, list(problem.metadata["numbers"]))

    def score_answer(self, answer: str | None, problem: Problem) -> Verdict:
        """1.0 when the expression is legal and exactly equals the target (module docstring)."""
        ev = self.score(answer, problem)
        correct = ev.legal and ev.value == Fraction(int(problem.answer))
        info: dict[str, Any] = {"value": str(ev.value) if ev.value is not None else None}
        if ev.message:
            info["check_detail"] = ev.message
        return Verdict(1.0 if correct else 0.0, correct, "ok" if correct else (ev.error or "wrong_value"), info)

    def answers_equivalent(self, a: Any, b: Any) -> bool:
        """Two expressions are the same answer when they use the same numbers (as a multiset) and
        have the same exact value: `(25 - 3) * 5` and `5 * (25 - 3)` are equivalent."""
        if a is None or b is None:
            return False
        x, y = evaluate_expression(str(a), None), evaluate_expression(str(b), None)
        return x.legal and y.legal and x.value == y.value and Counter(x.numbers_used) == Counter(y.numbers_used)
