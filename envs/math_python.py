"""`math-python-v0`: math problems with a Python interpreter (docs/algorithm.md section 5, paper Sec. 5).

Episode
-------
The prompt is an optional system message, an optional one-shot example of the tool format (a
prior user / assistant exchange; small models need it) and the problem. The model writes
Python between `<code>` and `</code>` (optionally fenced with ```` ```python ````); generation
stops at `</code>` (`stop_sequences`), the code runs in the episode's sandbox session (variables
persist between calls), and the reply `\\n<interpreter>\\n...\\n</interpreter>\\n` continues the
same assistant turn (`reply_role = None`). Long outputs keep their head and tail.

Ends
----
- terminated: the model's text does not end with a code block (it answered, or stopped
  without closing a tag). Reward 1.0 when the last `\\boxed{...}` in everything the model wrote
  this episode is equivalent to the reference (`spo_agents.envs.answers`: string, exact-number
  and `math-verify` symbolic checks, bounded in time, in worker processes), else 0.0. Outcome
  only, no format reward.
- truncated (reward 0.0): the turn budget (`max_turns`, default `max_tool_calls + 2`), the
  optional token budget, an action over the action-space bound, or a sandbox infrastructure
  failure (`info["error"]`).
- At most `max_tool_calls` (8) code blocks run; later ones get a reply saying the limit is
  reached, and the turn budget ends the episode if the model keeps writing code.

Malformed output is data: code over `max_code_chars` is not run (the reply says why), code
that raises or times out shows its error, a missing or unclosed `\\boxed{` scores 0.

Info keys (besides the base's `problem_id`, `turn`, `tool_calls`, `timings`)
-----------------------------------------------------------------------------
- `tool_call`: the `spo_agents.types.ToolCall` of this step, when it made one.
- at the end: `answer` (the extracted final answer or `None`), `correct`, `check` (how the
  answer was checked: `string`, `number`, `math-verify`, `timeout`, `empty`, ...).

Options
-------
`split`, `source` (default `procedural:arith`), `num_problems`, `dataset_path`, `fields`,
`seed`, `source_options`, `skip_bad` (see `spo_agents.envs.problems`); `sandbox` (a backend name,
default `local`, or a `SandboxBackend` shared by every env of a run), `sandbox_limits`;
`system_prompt` (`None`: the default; `""`: none), `one_shot`, `prompt_template` (with a
`{prompt}` field), `max_tool_calls`, `max_turns`, `max_episode_tokens` (+ `tokenizer`),
`max_output_chars`, `max_code_chars`, `check_timeout_s`.

Version history: v0, the first.
"""

from __future__ import annotations

import time
from typing import Any

from spo_agents.envs.answers import AnswerChecker, CheckResult, default_checker, extract_boxed
from spo_agents.envs.base import Message, MultiTurnEnv, StepOutcome, head_tail
from spo_agents.envs.problems import ProblemSet, load_problems
from spo_agents.errors import SandboxError
from spo_agents.types import Problem, ToolCall

CODE_OPEN, CODE_CLOSE = "<code>", "</code>"

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


def interpreter_reply(output: str) -> str:
    """The text appended after a code block."""
    return f"\n<interpreter>\n{output}\n</interpreter>\n"


def one_shot_messages() -> list[Message]:
    """The one-shot example of the tool format: a code block, its interpreter reply, a boxed answer."""
    assistant = f"{CODE_OPEN}{ONE_SHOT_CODE}{CODE_CLOSE}{interpreter_reply(ONE_SHOT_OUTPUT)}{ONE_SHOT_ANSWER}"
    return [{"role": "user", "content": ONE_SHOT_QUESTION}, {"role": "assistant", "content": assistant}]


def find_code(text: str) -> str | None:
    """The code of the block that ends `text` (`<code>...</code>` followed only by whitespace),
    without a Markdown fence; `None` when the text does not end with a complete code block."""
    stripped = text.rstrip()
    if not stripped.endswith(CODE_CLOSE):
        return None
    end = len(stripped) - len(CODE_CLOSE)
    start = stripped.rfind(CODE_OPEN, 0, end)
    if start < 0:
        return None
    code = stripped[start + len(CODE_OPEN) : end]
    body = code.strip()
    if body.startswith("```"):
        first_nl = body.find("\n")
        body = body[first_nl + 1 :] if first_nl >= 0 else ""
        if body.rstrip().endswith("```"):
            body = body.rstrip()[:-3]
        return body.strip("\n")
    return code.strip("\n")


def format_result(result: Any) -> str:
    """What the model sees of a `SandboxResult`: output, then the error if the code failed."""
    parts = []
    if result.stdout:
        parts.append(result.stdout.rstrip("\n"))
    if result.stderr:
        parts.append(result.stderr.rstrip("\n"))
    if result.exception and result.exception.rstrip("\n") not in (result.stderr or ""):
        parts.append(result.exception.rstrip("\n"))
    said = "\n".join(parts).lower()
    if result.timed_out and "timed out" not in said and "timeout" not in said:
        parts.append("TimeoutError: the code ran past the time limit and was stopped")
    elif result.memory_exceeded and "memory" not in said:
        parts.append("MemoryError: the code exceeded the memory limit and was stopped")
    if getattr(result, "session_restarted", False) and "restart" not in "\n".join(parts).lower():
        parts.append("(the interpreter was restarted: earlier variables are gone)")
    text = "\n".join(p for p in parts if p)
    return text if text.strip() else "(no output; use print() to show values)"


class MathPythonEnv(MultiTurnEnv):
    """Math with a Python tool: <code> runs in a sandbox, reward 1 if the last \\boxed{} matches."""

    stop_sequences = [CODE_CLOSE]
    reply_role = None

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
        sandbox: Any = "local",
        sandbox_limits: Any = None,
        sandbox_stateless: bool | None = None,
        system_prompt: str | None = None,
        one_shot: bool = True,
        prompt_template: str = "{prompt}",
        max_tool_calls: int = 8,
        max_turns: int | None = None,
        max_episode_tokens: int | None = None,
        tokenizer: Any = None,
        max_output_chars: int = 2000,
        max_code_chars: int = 20_000,
        max_action_chars: int = 200_000,
        check_timeout_s: float = 5.0,
        checker: AnswerChecker | None = None,
        render_mode: str | None = None,
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
        if max_tool_calls < 0:
            raise ValueError(f"`max_tool_calls` must be >= 0, got {max_tool_calls}")
        if "{prompt}" not in prompt_template:
            raise ValueError(f"`prompt_template` must contain `{{prompt}}`, got {prompt_template!r}")
        super().__init__(
            problems,
            max_action_chars=max_action_chars,
            max_turns=max_turns if max_turns is not None else max_tool_calls + 2,
            max_episode_tokens=max_episode_tokens,
            tokenizer=tokenizer,
            sandbox=sandbox,
            sandbox_limits=sandbox_limits,
            sandbox_stateless=sandbox_stateless,
        )
        self.split = split
        self.render_mode = render_mode
        self.max_tool_calls = max_tool_calls
        self.system_prompt = (
            DEFAULT_SYSTEM_PROMPT.format(max_tool_calls=max_tool_calls) if system_prompt is None else system_prompt
        )
        self.one_shot = one_shot
        self.prompt_template = prompt_template
        self.max_output_chars = max_output_chars
        self.max_code_chars = max_code_chars
        self.check_timeout_s = check_timeout_s
        self._checker = checker
        self._model_text: list[str] = []

    @property
    def checker(self) -> AnswerChecker:
        return self._checker if self._checker is not None else default_checker()

    # --- episode --------------------------------------------------------------------------
    def _reset_episode(self, problem: Problem) -> list[Message]:
        self._model_text = []
        messages: list[Message] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        if self.one_shot:
            messages.extend(one_shot_messages())
        messages.append({"role": "user", "content": self.prompt_template.format(prompt=problem.prompt)})
        return messages

    def _step_episode(self, action: str) -> StepOutcome:
        self._model_text.append(action)
        code = find_code(action)
        if code is None:
            return self._finish()
        return StepOutcome(*self._run_code(code))

    def _run_code(self, code: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if self.tool_calls_made >= self.max_tool_calls:
            text = (
                f"Tool call limit reached ({self.max_tool_calls}): this code was not run. "
                "Give the final answer as \\boxed{answer}."
            )
            return interpreter_reply(text), 0.0, False, False, {"tool_limit_reached": True}
        self.count_tool_call()
        if len(code) > self.max_code_chars:
            text = (
                f"Error: the code block has {len(code)} characters, "
                f"more than the limit of {self.max_code_chars}; it was not run."
            )
            call = ToolCall(code=code[: self.max_code_chars], output=text, ok=False)
            return interpreter_reply(text), 0.0, False, False, {"tool_call": call}
        start = time.perf_counter()
        try:
            result = self.sandbox_session().run(code)
        except SandboxError as e:
            # Infrastructure, not the model: the episode ends and says so (rollouts mark the
            # trajectory as an error, not as evidence about the policy).
            call = ToolCall(code=code, output="", ok=False, infra_error=str(e), duration_s=time.perf_counter() - start)
            info = {"tool_call": call, "error": f"sandbox failure: {e}", **self._final_info(None)}
            return "", 0.0, False, True, info
        finally:
            self.add_timing("sandbox_s", time.perf_counter() - start)
        shown, cut = head_tail(format_result(result), self.max_output_chars)
        call = ToolCall(
            code=code,
            output=shown,
            ok=bool(result.ok),
            timed_out=bool(result.timed_out),
            truncated=cut or bool(result.output_truncated),
            duration_s=float(result.duration_s),
        )
        return interpreter_reply(shown), 0.0, False, False, {"tool_call": call}

    def _finish(self) -> StepOutcome:
        answer = extract_boxed("\n".join(self._model_text))
        check = self._check(answer, self.problem.answer if self.problem is not None else None)
        info = {"answer": answer, "correct": check.correct, "check": check.method}
        if check.error:
            info["check_error"] = check.error
        return StepOutcome("", 1.0 if check.correct else 0.0, True, False, info)

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

    def _final_info(self, answer: Any) -> dict[str, Any]:
        if answer is None and self._model_text:
            answer = extract_boxed("\n".join(self._model_text))
        return {"answer": answer, "correct": False}

    def _on_episode_end(self) -> None:
        self._model_text = []

    def answers_equivalent(self, a: Any, b: Any) -> bool:
        """Symbolic equivalence of two final answers (maj@k counts equivalent answers together)."""
        if a is None or b is None:
            return False
        return self.checker.check(a, b, self.check_timeout_s).correct
