"""The multi-turn text environment interface (a `gymnasium.Env`).

One episode is one problem. The interaction, as rollouts drive it:

    messages, info = env.reset(seed=..., options={"problem_id": "..."})   # chat messages
    prompt tokens  = chat template of `messages` with the generation prompt
    loop:
        text   = policy output, generated until one of `env.stop_sequences` or end-of-turn
        obs, reward, terminated, truncated, info = env.step(text)
        if terminated or truncated: break
        `obs` is the environment's reply. With `reply_role = None` it continues the same
        assistant turn as raw text (e.g. "\\n<interpreter>\\n42\\n</interpreter>\\n"); with
        `reply_role = "user"` / `"tool"` it is a new chat message of that role.
        Its tokens are appended with loss mask 0 and generation resumes.

Rules (see STYLE.md):
- malformed model output (no answer, unclosed tags, giant code, undecodable text) is an
  observation and a reward, never an exception; envs raise only on programmer errors;
- `terminated`: the task ended (an answer was given); `truncated`: a budget ran out;
- randomness comes from `self.np_random` (seeded by `reset(seed=...)`), never the global RNG;
- bump the env's version (`-v1`, ...) when its prompt, parser or reward changes.

Environments are synchronous; rollouts call `step` in worker threads, so blocking work
(sandbox calls, answer checking) never runs on the event loop.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from spo_agents.types import Problem


class TextSpace(gym.spaces.Space[str]):
    """Any Python string of at most `max_length` characters (LLM output is arbitrary text,
    which Gymnasium's `Text` space rejects)."""

    def __init__(self, max_length: int = 1_000_000, seed: int | None = None) -> None:
        super().__init__(shape=None, dtype=None, seed=seed)
        self.max_length = max_length

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and len(x) <= self.max_length

    def sample(self, mask: Any = None, probability: Any = None) -> str:
        n = int(self.np_random.integers(0, min(self.max_length, 64) + 1))
        chars = self.np_random.integers(32, 127, size=n)
        return "".join(map(chr, chars))

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"TextSpace(max_length={self.max_length})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TextSpace) and other.max_length == self.max_length


class MultiTurnEnv(gym.Env[list, str]):
    """Base class of the suite's environments. Subclasses implement `_reset_episode` and
    `_step_episode`; see the module docstring for the protocol.

    Class attributes a subclass sets:
        stop_sequences: strings at which generation must stop and hand control to `step`.
        reply_role: `None` (replies continue the assistant turn) or a chat role.
    """

    metadata: dict[str, Any] = {"render_modes": []}
    stop_sequences: list[str] = []
    reply_role: str | None = None

    def __init__(self, problems: list[Problem], *, max_action_chars: int = 200_000) -> None:
        super().__init__()
        if not problems:
            raise ValueError("an environment needs at least one problem")
        self.problems = list(problems)
        self._by_id = {p.id: p for p in self.problems}
        if len(self._by_id) != len(self.problems):
            raise ValueError("problem ids must be unique")
        self.action_space = TextSpace(max_action_chars)
        self.observation_space = TextSpace(10_000_000)
        self.problem: Problem | None = None

    @property
    def problem_ids(self) -> list[str]:
        return [p.id for p in self.problems]

    def get_problem(self, problem_id: str) -> Problem:
        try:
            return self._by_id[problem_id]
        except KeyError:
            raise KeyError(f"problem `{problem_id}` is not in this environment's problem set") from None

    def answers_equivalent(self, a: Any, b: Any) -> bool:
        """Whether two final answers count as the same (used by maj@k). Default: equal strings."""
        return a is not None and b is not None and str(a).strip() == str(b).strip()
