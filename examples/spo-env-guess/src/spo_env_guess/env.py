"""`guess-number-v0`: find a secret number with higher/lower hints.

## Description
The environment picks a secret whole number from 1 to `high`. The model guesses with
`\\boxed{n}`; after each wrong guess the environment answers as the user with "Higher." or
"Lower.", and the model guesses again in a new assistant turn. Binary search finds any number
from 1 to 100 in 7 guesses.

## Observation
`reset`: one user message with the rules. `step`: the hint ("Higher." / "Lower.", or a
reminder of the answer format), `""` when the episode ends.

## Action
Any text; the last `\\boxed{n}` is the guess. A reply without one costs a guess.

## Reward
1.0 when the secret is guessed within `max_guesses`, else 0.0.

## Termination/Truncation
`terminated` when the secret is guessed or the guesses are used up (the game is over either
way). Never truncated by the environment itself (the base class's `max_turns` /
`max_episode_tokens` budgets still apply).

## Arguments
`split` (`train`: secrets not divisible by 10; `test`: multiples of 10), `high` (100),
`max_guesses` (7). `sandbox` / `sandbox_limits` are accepted and unused (no code runs).

## Version history
- v0: initial version.
"""

from __future__ import annotations

import re
from typing import Any

from spo_agents.envs.base import MultiTurnEnv, StepOutcome
from spo_agents.types import Problem

_GUESS = re.compile(r"\\boxed\{\s*(-?\d{1,12})\s*\}")


class GuessNumberEnv(MultiTurnEnv):
    """Guess a secret number from 1 to 100 with higher/lower hints (an example plugin)."""

    reply_role = "user"  # hints are new user messages; no stop sequences (turns end at end-of-turn)

    def __init__(
        self,
        split: str = "train",
        *,
        high: int = 100,
        max_guesses: int = 7,
        sandbox: Any = None,
        sandbox_limits: Any = None,
        **kwargs: Any,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"`split` must be `train` or `test`, got `{split}`")
        secrets = [n for n in range(1, high + 1) if (n % 10 == 0) == (split == "test")]
        problems = [Problem(f"guess/{high}/{n}", self._rules(high, max_guesses), str(n)) for n in secrets]
        super().__init__(problems, **kwargs)
        self.high, self.max_guesses = high, max_guesses
        self._guesses = 0

    @staticmethod
    def _rules(high: int, max_guesses: int) -> str:
        return (
            f"I am thinking of a whole number from 1 to {high}. You have {max_guesses} guesses. "
            f"Write each guess as \\boxed{{n}}; I will say whether my number is higher or lower."
        )

    def _reset_episode(self, problem: Problem) -> list[dict[str, str]]:
        self._guesses = 0
        return [{"role": "user", "content": problem.prompt}]

    def _step_episode(self, action: str) -> StepOutcome:
        self._guesses += 1
        found = _GUESS.findall(action)
        guess = int(found[-1]) if found else None
        secret = int(self.problem.answer)
        info = {"answer": guess, "guesses": self._guesses}
        if guess == secret:
            return StepOutcome("", 1.0, True, False, {**info, "correct": True})
        if self._guesses >= self.max_guesses:
            return StepOutcome("", 0.0, True, False, {**info, "correct": False})
        if guess is None:
            hint = "I found no guess. Write it as \\boxed{n}."
        else:
            hint = "Higher." if secret > guess else "Lower."
        return StepOutcome(f"{hint} ({self.max_guesses - self._guesses} guesses left)", 0.0, False, False, info)
