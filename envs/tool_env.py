"""`ToolEnv`: a problem, a Python tool in the sandbox, a final answer; the base of the tool envs.

The model writes Python between `<code>` and `</code>`; generation stops at `</code>`, the code
runs in the episode's sandbox session and the reply `\\n<interpreter>\\n...\\n</interpreter>\\n`
continues the assistant turn. Text that does not end with a code block is the final answer.
A subclass sets its prompt and scoring through hooks (`one_shot_messages`, `extract_answer`,
`score_answer`, and `default_system_prompt`); the tool format, budgets and replies are shared.
The reply format and the `info` keys: docs/environments.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from spo_agents.errors import EnvError, SandboxError
from spo_agents.types import Problem, ToolCall

from .answers import extract_boxed
from .base import Message, MultiTurnEnv, StepOutcome, head_tail
from .problems import ProblemSet

CODE_OPEN, CODE_CLOSE = "<code>", "</code>"
NO_OUTPUT = "(no output; use print() to show values)"
TIMED_OUT = "TimeoutError: the code ran past the time limit and was stopped"
OUT_OF_MEMORY = "MemoryError: the code exceeded the memory limit and was stopped"
RESTARTED = "(the interpreter was restarted: earlier variables are gone)"

GENERIC_SYSTEM_PROMPT = (
    "You are a helpful assistant that solves problems. You can run Python code: write it "
    "between <code> and </code> and its output will be shown between <interpreter> and "
    "</interpreter>. You can run code at most {max_tool_calls} times. Give the final answer "
    "as \\boxed{{answer}}."
)


def interpreter_reply(output: str) -> str:
    """The text appended after a code block."""
    return f"\n<interpreter>\n{output}\n</interpreter>\n"


def tool_example(question: str, code: str, output: str, answer: str) -> list[Message]:
    """A one-shot exchange of the tool format: the question, then one code block, its
    interpreter reply and the final answer in one assistant message."""
    assistant = f"{CODE_OPEN}{code}{CODE_CLOSE}{interpreter_reply(output)}{answer}"
    return [{"role": "user", "content": question}, {"role": "assistant", "content": assistant}]


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
        parts.append(TIMED_OUT)
    elif result.memory_exceeded and "memory" not in said:
        parts.append(OUT_OF_MEMORY)
    if result.session_restarted and "restart" not in "\n".join(parts).lower():
        parts.append(RESTARTED)
    text = "\n".join(p for p in parts if p)
    return text if text.strip() else NO_OUTPUT


@dataclass
class Verdict:
    """What `score_answer` decides: the reward, whether it counts as correct, which rule decided
    (`info["check"]`) and any further `info` keys (`value`, `check_detail`, `score`, ...)."""

    reward: float
    correct: bool
    check: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


class ToolEnv(MultiTurnEnv):
    """A problem, `<code>` run in a sandbox with `<interpreter>` replies, a scored final answer."""

    stop_sequences = [CODE_CLOSE]
    reply_role = None
    #: the system message, with a `{max_tool_calls}` field; `system_prompt=` overrides it
    default_system_prompt = GENERIC_SYSTEM_PROMPT
    #: whether `rescore` may score saved text again (False when scoring runs code)
    rescorable = True

    def __init__(
        self,
        problems: list[Problem] | ProblemSet,
        *,
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
        render_mode: str | None = None,
    ) -> None:
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
        self.render_mode = render_mode
        self.max_tool_calls = max_tool_calls
        if system_prompt is None:
            system_prompt = self.default_system_prompt.format(max_tool_calls=max_tool_calls)
        self.system_prompt = system_prompt
        self.one_shot = one_shot
        self.prompt_template = prompt_template
        self.max_output_chars = max_output_chars
        self.max_code_chars = max_code_chars
        self._model_text: list[str] = []

    # --- hooks ----------------------------------------------------------------------------
    def one_shot_messages(self) -> list[Message]:
        """The one-shot example of the tool format put before the problem (`one_shot=True`),
        e.g. `tool_example(...)`; default: none."""
        return []

    def extract_answer(self, text: str) -> str | None:
        """The final answer in everything the model wrote this episode. Default: the last `\\boxed{}`."""
        return extract_boxed(text)

    def score_answer(self, answer: str | None, problem: Problem) -> Verdict:
        """Score a final answer (`None`: none was found). Default: equal strings, reward 1 or 0."""
        correct = answer is not None and answer.strip() == str(problem.answer).strip()
        return Verdict(float(correct), correct, "string" if answer is not None else "no_answer")

    def wrong_answer_reply(self, verdict: Verdict) -> str | None:
        """The reply to a wrong final answer, which lets the model try again (the turn budget
        still ends the episode); `None` (the default) ends the episode at the first answer."""
        return None

    # --- the episode ----------------------------------------------------------------------
    def _reset_episode(self, problem: Problem) -> list[Message]:
        self._model_text = []
        messages: list[Message] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        if self.one_shot:
            messages.extend(self.one_shot_messages())
        messages.append({"role": "user", "content": self.prompt_template.format(prompt=problem.prompt)})
        return messages

    def _step_episode(self, action: str) -> StepOutcome:
        self._model_text.append(action)
        code = find_code(action)
        if code is None:
            return self._finish()
        return self._run_code(code)

    def _run_code(self, code: str) -> StepOutcome:
        if self.tool_calls_made >= self.max_tool_calls:
            text = (
                f"Tool call limit reached ({self.max_tool_calls}): this code was not run. "
                "Give the final answer as \\boxed{answer}."
            )
            return StepOutcome(interpreter_reply(text), info={"tool_limit_reached": True})
        self.count_tool_call()
        if len(code) > self.max_code_chars:
            text = (
                f"Error: the code block has {len(code)} characters, "
                f"more than the limit of {self.max_code_chars}; it was not run."
            )
            call = ToolCall(code=code[: self.max_code_chars], output=text, ok=False)
            return StepOutcome(interpreter_reply(text), info={"tool_call": call})
        start = time.perf_counter()
        try:
            result = self.sandbox_session().run(code)
        except SandboxError as e:
            # infrastructure, not the model: the episode ends and says so (rollouts mark the
            # trajectory as an error, not as evidence about the policy)
            call = ToolCall(code=code, output="", ok=False, infra_error=str(e), duration_s=time.perf_counter() - start)
            info = {"tool_call": call, "error": f"sandbox failure: {e}", **self._final_info(None)}
            return StepOutcome("", 0.0, False, True, info)
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
        return StepOutcome(interpreter_reply(shown), info={"tool_call": call})

    def _finish(self) -> StepOutcome:
        if self.problem is None:
            raise EnvError("`_finish` needs an episode: call `reset()` first")
        verdict, info = self._verdict(self.problem, self._model_text)
        retry = None if verdict.correct else self.wrong_answer_reply(verdict)
        if retry:
            return StepOutcome(retry, 0.0, False, False, info)
        return StepOutcome("", float(verdict.reward), True, False, info)

    def _verdict(self, problem: Problem, model_text: list[str]) -> tuple[Verdict, dict[str, Any]]:
        answer = self.extract_answer("\n".join(model_text))
        v = self.score_answer(answer, problem)
        return v, {"answer": answer, "correct": bool(v.correct), "check": v.check, **v.info}

    def rescore(self, problem: Problem, model_text: list[str]) -> tuple[float, dict[str, Any]] | None:
        """The end-of-episode verdict on saved model text (`None` when not `rescorable`)."""
        if not self.rescorable:
            return None
        verdict, info = self._verdict(problem, model_text)
        return float(verdict.reward), info

    def _final_info(self, answer: Any) -> dict[str, Any]:
        if answer is None and self._model_text:
            answer = self.extract_answer("\n".join(self._model_text))
        return {"answer": answer, "correct": False}

    def _on_episode_end(self) -> None:
        self._model_text = []
