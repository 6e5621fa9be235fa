"""`PromptLimit`: what an episode does with a prompt longer than the model can take.

Checked on the prompt's tokens before the first generation (`run_episode`): `refuse` ends the
episode at once with `Trajectory.error` (no generation; training leaves it out, evaluation counts
it as a failed sample), `truncate` keeps the head and the tail of the prompt (the tail holds the
question and the generation prompt) and records the tokens cut in `info["prompt_cut_tokens"]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from spo_agents.errors import ConfigError

OVERFLOW = ("refuse", "truncate")
#: share of a truncated prompt's budget kept from its head (the rest comes from its tail)
HEAD_SHARE = 0.25


@dataclass(frozen=True)
class PromptLimit:
    """At most `max_tokens` prompt tokens; longer prompts are refused or truncated (`overflow`)."""

    max_tokens: int
    overflow: Literal["refuse", "truncate"] = "refuse"

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 8:
            raise ConfigError(f"the prompt limit must be a whole number of tokens >= 8, got {self.max_tokens!r}")
        if self.overflow not in OVERFLOW:
            raise ConfigError(f"the prompt overflow must be one of {', '.join(OVERFLOW)}, got {self.overflow!r}")

    def refusal(self, n: int) -> str:
        """The error of a refused prompt of `n` tokens."""
        return (
            f"the prompt has {n} tokens, more than the limit of {self.max_tokens}; it was refused without "
            "generating (set the overflow to `truncate` to keep its head and tail, or drop the problem)"
        )

    def truncate(self, prompt_ids: list[int]) -> tuple[list[int], int]:
        """(the head and tail of `prompt_ids` within `max_tokens`, the number of tokens cut)."""
        if len(prompt_ids) <= self.max_tokens:
            return prompt_ids, 0
        head = int(self.max_tokens * HEAD_SHARE)
        tail = self.max_tokens - head
        return prompt_ids[:head] + prompt_ids[len(prompt_ids) - tail :], len(prompt_ids) - self.max_tokens
