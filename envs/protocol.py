"""`TextEnv`: what rollouts and evaluation need from an environment, and a check of it.

`spo_agents.envs.base.MultiTurnEnv` supplies every member with a default; `protocol_problems`
says, in words, what an object lacks (`envs.make` and `spo-agent check-env` use it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

Message = dict[str, str]


@runtime_checkable
class TextEnv(Protocol):
    """A multi-turn text environment as the rollout and the evaluation drive it.

    - `env_id`: the id trajectories and transcripts record (the registered `name-vN`).
    - `problem_ids`: the stable ids of the env's problems (keys of the value tracker).
    - `stop_sequences`: where generation stops and control goes to `step`.
    - `reply_role`: `None` (a reply continues the assistant turn) or the chat role of a reply.
    - `answers_equivalent(a, b)`: whether two final answers count as the same (maj@k).
    - `reset` / `step` / `close`: Gymnasium's, with chat messages and text.
    """

    stop_sequences: Sequence[str]
    reply_role: str | None

    @property
    def env_id(self) -> str: ...

    @property
    def problem_ids(self) -> list[str]: ...

    def answers_equivalent(self, a: Any, b: Any) -> bool: ...

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[list[Message], dict[str, Any]]: ...

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]: ...

    def close(self) -> None: ...


_HINT = "subclass `spo_agents.envs.MultiTurnEnv`, which supplies it"


def protocol_problems(env: Any) -> list[str]:
    """What `env` lacks of `TextEnv`, one sentence per missing or malformed member ([] if none)."""
    problems = []
    for name in ("reset", "step", "close", "answers_equivalent"):
        if not callable(getattr(env, name, None)):
            problems.append(f"it has no `{name}` method ({_HINT})")
    stops = getattr(env, "stop_sequences", None)
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        problems.append(f"`stop_sequences` must be a list of non-empty strings, found {stops!r}")
    role = getattr(env, "reply_role", "missing")
    if role == "missing" or (role is not None and not isinstance(role, str)):
        problems.append(f"`reply_role` must be None or a chat role such as 'user', found {role!r}")
    env_id = getattr(env, "env_id", None)
    if not isinstance(env_id, str) or not env_id:
        problems.append(f"`env_id` must be the env's id as a string, found {env_id!r} ({_HINT})")
    try:
        ids = env.problem_ids
    except Exception as e:  # noqa: BLE001 - reported, not raised
        problems.append(f"`problem_ids` is missing or raised {type(e).__name__}: {e} ({_HINT})")
    else:
        if not isinstance(ids, (list, tuple)) or not ids or not all(isinstance(i, str) for i in ids):
            problems.append(f"`problem_ids` must be a non-empty list of strings, found {str(ids)[:80]}")
    return problems
