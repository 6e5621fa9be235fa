"""A tiny two-turn environment for the rollout, policy and evaluation tests.

"Say something twice": the first reply gets an environment message back, the second one is
scored. The parsed answer is the number of words of the second reply modulo 3, correct when it
equals the problem's target. With a random-init model the answers spread over 0, 1 and 2, so
avg@k, pass@k and maj@k take non-trivial values.
"""

from __future__ import annotations

from spo_agents.envs.base import MultiTurnEnv, StepOutcome
from spo_agents.types import Problem, ToolCall


class SayEnv(MultiTurnEnv):
    stop_sequences = ["!"]
    reply_role: str | None = None

    def __init__(
        self,
        num_problems: int = 6,
        *,
        split: str = "test",
        reply_role: str | None = None,
        turns: int = 2,
        stop: list[str] | None = None,
        reply: str = "\nAgain:",
    ) -> None:
        problems = [
            Problem(id=f"{split}-{i}", prompt=f"Say something ({i}).", answer=str(i % 3)) for i in range(num_problems)
        ]
        super().__init__(problems)
        self.reply_role = reply_role
        self.turns = turns
        self.reply = reply
        if stop is not None:
            self.stop_sequences = list(stop)
        self.actions: list[str] = []

    def _reset_episode(self, problem: Problem) -> list[dict[str, str]]:
        self.actions = []
        return [{"role": "user", "content": problem.prompt}]

    def _step_episode(self, action: str) -> StepOutcome:
        self.actions.append(action)
        if self.turn < self.turns:
            call = ToolCall(code=action[:20], output=self.reply, ok=True, duration_s=0.001)
            return StepOutcome(self.reply, 0.0, False, False, {"tool_call": call})
        answer = str(len(action.split()) % 3)
        correct = answer == self.problem.answer
        return StepOutcome("", float(correct), True, False, {"answer": answer, "correct": correct})


class FailingSandboxEnv(SayEnv):
    """Raises an infrastructure error on its first step (to check errors become data)."""

    def _step_episode(self, action: str) -> StepOutcome:
        from spo_agents.errors import SandboxError

        raise SandboxError("the test sandbox is down")
