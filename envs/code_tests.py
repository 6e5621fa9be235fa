"""`code-tests-v0`: write a Python function; hidden unit tests run in the sandbox give the reward.

The model answers with a fenced Python block defining the requested function. Every answer runs
in the sandbox against the worked examples and the hidden tests in one call; while an example
fails and attempts remain, the environment replies as the user with what went wrong. At the end,
the hidden tests of the last submitted code give the reward: 1.0 when all pass
(`reward="all"`, default) or the fraction that pass (`reward="fraction"`). Problems:
`envs/data/code_problems.jsonl` (20 train / 10 test, different functions in each split).

Observation, action, result comparison, what the harness covers, termination, options and the
problem file's schema: docs/environments.md, section "code-tests-v0". Version history: v0, the
first.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from spo_agents.errors import DatasetError, EnvError
from spo_agents.types import Problem

from .base import MultiTurnEnv, StepOutcome, head_tail

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_REWARDS = ("all", "fraction")
_REQUIRED = ("id", "split", "entry_point", "signature", "description", "examples", "tests")


def extract_code(text: str) -> str | None:
    """The last fenced code block of `text` (```python ... ``` or ``` ... ```), or None."""
    blocks = _FENCE.findall(text)
    if not blocks:
        return None
    code = blocks[-1]
    return code if code.strip() else None


def _call_text(entry_point: str, args: list[Any]) -> str:
    return f"{entry_point}({', '.join(repr(a) for a in args)})"


def render_prompt(row: dict[str, Any], max_attempts: int) -> str:
    examples = "\n".join(
        f"    {_call_text(row['entry_point'], e['args'])} == {e['expected']!r}" for e in row["examples"]
    )
    return (
        f"Write a Python function `{row['signature']}`.\n\n"
        f"{row['description']}\n\n"
        f"Examples:\n{examples}\n\n"
        f"Answer with the complete function in a ```python code block. I will run it on the examples and "
        f"tell you what failed; you have {max_attempts} attempt(s). Your last code block is graded on hidden tests."
    )


def load_code_problems(split: str, path: str | Path | None = None, max_attempts: int = 3) -> list[Problem]:
    """The problems of one split (`train`, `test`) from the shipped set or a JSONL file."""
    if split not in ("train", "test"):
        raise DatasetError(f"`split` must be `train` or `test`, got `{split}`")
    if path is None:
        text = resources.files("spo_agents.envs.data").joinpath("code_problems.jsonl").read_text(encoding="utf-8")
        where = "code_problems.jsonl"
    else:
        text = Path(path).read_text(encoding="utf-8")
        where = str(path)
    problems = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}:{n}: not valid JSON ({e})") from e
        missing = [k for k in _REQUIRED if k not in row]
        if missing:
            raise DatasetError(
                f"{where}:{n}: a code problem needs the fields {', '.join(_REQUIRED)}; `{'`, `'.join(missing)}` missing"
            )
        if not row["tests"]:
            raise DatasetError(f"{where}:{n}: problem `{row['id']}` has no hidden tests")
        if row["split"] != split:
            continue
        problems.append(
            Problem(
                id=str(row["id"]),
                prompt=render_prompt(row, max_attempts),
                answer={"entry_point": row["entry_point"], "tests": row["tests"]},
                metadata={
                    "entry_point": row["entry_point"],
                    "examples": row["examples"],
                    "solution": row.get("solution"),
                },
            )
        )
    return problems


# --- the harness that runs inside the sandbox ------------------------------------------------
_HARNESS = r"""
import copy as _c, io as _io, json as _j, sys as _s
def _spo_run(source, entry, cases, marker):
    real = _s.stdout
    def emit(rec):
        real.write(marker + _j.dumps(rec) + "\n")
        real.flush()
    def plain(x):
        if x is None or isinstance(x, (bool, int, str)):
            return x
        if isinstance(x, float):
            return x if x == x and abs(x) != float("inf") else repr(x)
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, dict) and all(isinstance(k, str) for k in x):
            return {k: plain(v) for k, v in x.items()}
        raise TypeError("returned a %s, which is not JSON data" % type(x).__name__)
    ns = {"__name__": "solution"}
    _s.stdout = _io.StringIO()
    try:
        try:
            exec(compile(source, "<solution>", "exec"), ns)
        except BaseException as e:
            emit({"setup": "%s: %s" % (type(e).__name__, e)})
            return
        fn = ns.get(entry)
        if not callable(fn):
            emit({"setup": "the code does not define a function named `%s`" % entry})
            return
        for i, case in enumerate(cases):
            rec = {"i": i}
            try:
                rec["got"] = plain(fn(*_c.deepcopy(case["args"])))
            except BaseException as e:
                rec["error"] = ("%s: %s" % (type(e).__name__, e))[:300]
            _s.stdout = _io.StringIO()
            emit(rec)
    finally:
        _s.stdout = real
"""


def build_program(code: str, entry_point: str, cases: list[dict[str, Any]], marker: str) -> str:
    """The program sent to the sandbox: the harness, then one call with the code as data.
    Results are printed one line per case as soon as each finishes, so when a case hangs until
    the sandbox's timeout, the cases before it keep their results."""
    args = json.dumps(
        {"source": code, "entry": entry_point, "cases": [{"args": c["args"]} for c in cases], "marker": marker}
    )
    return _HARNESS + f"_spo_run(**_j.loads({args!r}))\n"


def values_equal(got: Any, expected: Any) -> bool:
    """Equality after a JSON round trip: lists/tuples alike, int == float of equal value,
    bools only equal bools, floats within 1e-9 relative tolerance."""
    if isinstance(expected, bool) or isinstance(got, bool):
        return isinstance(expected, bool) and isinstance(got, bool) and got == expected
    if isinstance(expected, (int, float)) and isinstance(got, (int, float)):
        if isinstance(expected, float) or isinstance(got, float):
            return math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-12)
        return got == expected
    if isinstance(expected, list) and isinstance(got, list):
        return len(got) == len(expected) and all(values_equal(g, e) for g, e in zip(got, expected))
    if isinstance(expected, dict) and isinstance(got, dict):
        return got.keys() == expected.keys() and all(values_equal(got[k], expected[k]) for k in expected)
    return type(got) is type(expected) and got == expected


@dataclass
class TestRun:
    """Per-case outcomes of one submission: `passed[i]`, and a message for each failure."""

    passed: list[bool]
    messages: list[str | None]
    setup_error: str | None = None
    timed_out: bool = False


def parse_results(stdout: str, marker: str, cases: list[dict[str, Any]], entry_point: str) -> TestRun:
    """Read the harness's marked lines; cases without a line (a crash, a timeout) fail."""
    records: dict[int, dict[str, Any]] = {}
    setup_error = None
    for line in stdout.splitlines():
        if not line.startswith(marker):
            continue
        try:
            rec = json.loads(line[len(marker) :])
        except json.JSONDecodeError:
            continue
        if "setup" in rec:
            setup_error = str(rec["setup"])
        elif isinstance(rec.get("i"), int):
            records.setdefault(rec["i"], rec)
    passed, messages = [], []
    for i, case in enumerate(cases):
        call = _call_text(entry_point, case["args"])
        rec = records.get(i)
        if rec is None:
            passed.append(False)
            messages.append(f"{call}: no result (the program crashed or ran out of time)")
        elif "error" in rec:
            passed.append(False)
            messages.append(f"{call} raised {rec['error']}")
        elif values_equal(rec.get("got"), case["expected"]):
            passed.append(True)
            messages.append(None)
        else:
            passed.append(False)
            messages.append(f"{call} returned {head_tail(repr(rec.get('got')), 200)[0]}, expected {case['expected']!r}")
    return TestRun(passed, messages, setup_error)


class CodeTestsEnv(MultiTurnEnv):
    """Write a Python function; hidden unit tests run in the sandbox decide the reward."""

    stop_sequences: list[str] = []
    reply_role = "user"

    def __init__(
        self,
        split: str = "train",
        *,
        reward: str = "all",
        max_attempts: int = 3,
        path: str | Path | None = None,
        run_timeout_s: float = 10.0,
        sandbox: Any = "local",
        sandbox_limits: Any = None,
        **kwargs: Any,
    ) -> None:
        if reward not in _REWARDS:
            raise EnvError(f"`reward` must be one of `all`, `fraction`, got `{reward}`")
        if max_attempts < 1:
            raise EnvError(f"`max_attempts` must be at least 1, got {max_attempts}")
        super().__init__(
            load_code_problems(split, path, max_attempts),
            sandbox=sandbox,
            sandbox_limits=sandbox_limits,
            sandbox_stateless=True,
            **kwargs,
        )
        self.split = split
        self.reward_mode = reward
        self.max_attempts = max_attempts
        self.run_timeout_s = run_timeout_s
        self._attempts = 0
        self._last_code: str | None = None

    def _reset_episode(self, problem: Problem) -> list[dict[str, str]]:
        self._attempts = 0
        self._last_code = None
        return [{"role": "user", "content": problem.prompt}]

    def run_tests(self, code: str) -> tuple[TestRun, TestRun]:
        """Run `code` on the examples and the hidden tests (one sandbox call)."""
        if self.problem is None:
            raise EnvError("`run_tests` needs an episode: call `reset()` first")
        entry = self.problem.metadata["entry_point"]
        examples = self.problem.metadata["examples"]
        hidden = self.problem.answer["tests"]
        marker = f"@@spo-{secrets.token_hex(8)}@@"
        program = build_program(code, entry, examples + hidden, marker)
        result = self.sandbox_session().run(program, timeout=self.run_timeout_s)
        self.add_timing("sandbox_s", result.duration_s)
        run = parse_results(result.stdout, marker, examples + hidden, entry)
        k = len(examples)
        ex = TestRun(run.passed[:k], run.messages[:k], run.setup_error, result.timed_out)
        hid = TestRun(run.passed[k:], run.messages[k:], run.setup_error, result.timed_out)
        if run.setup_error is None and not any(run.passed) and not result.ok:
            why = (
                "timed out"
                if result.timed_out
                else (result.exception or result.stderr or f"exit status {result.exit_status}")
            )
            ex.setup_error = f"the program failed: {head_tail(str(why).strip(), 400)[0]}"
        return ex, hid

    def _score(self, hidden: TestRun) -> float:
        n_pass = sum(hidden.passed)
        if self.reward_mode == "fraction":
            return n_pass / len(hidden.passed)
        return 1.0 if n_pass == len(hidden.passed) else 0.0

    def _step_episode(self, action: str) -> StepOutcome:
        self._attempts += 1
        left = self.max_attempts - self._attempts
        code = extract_code(action)
        if code is None:
            if left > 0:
                return StepOutcome(
                    f"I found no ```python code block in your reply. Answer with the complete function in one. "
                    f"({left} attempt(s) left)"
                )
            info = self._final_info(None)
            info["reason"] = "no_code"
            return StepOutcome("", 0.0, False, True, info)
        self._last_code = code
        examples, hidden = self.run_tests(code)
        done = (examples.setup_error is None and all(examples.passed)) or left == 0
        if not done:
            if examples.setup_error is not None:
                feedback = f"Your code could not be tested: {examples.setup_error}"
            else:
                failed = [m for m in examples.messages if m is not None]
                feedback = f"Your function failed {len(failed)} of {len(examples.passed)} examples:\n" + "\n".join(
                    f"- {m}" for m in failed
                )
            return StepOutcome(
                f"{feedback}\nFix the code and answer with the complete function in a ```python block. "
                f"({left} attempt(s) left)"
            )
        reward = self._score(hidden)
        info = {
            "answer": code,
            "correct": all(hidden.passed),
            "tests_passed": sum(hidden.passed),
            "tests_total": len(hidden.passed),
            "examples_passed": sum(examples.passed),
            "attempts": self._attempts,
            "timed_out": hidden.timed_out,
        }
        if hidden.setup_error is not None:
            info["setup_error"] = hidden.setup_error
        return StepOutcome("", reward, True, False, info)

    def _final_info(self, answer: Any) -> dict[str, Any]:
        """End-of-episode keys when a budget ended it: the last code submitted (if any), unscored."""
        total = len(self.problem.answer["tests"]) if self.problem is not None else 0
        return {
            "answer": answer if answer is not None else self._last_code,
            "correct": False,
            "tests_passed": 0,
            "tests_total": total,
            "attempts": self._attempts,
        }
