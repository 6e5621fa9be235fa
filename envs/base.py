"""`MultiTurnEnv`: the base class of the suite's multi-turn text environments (a `gymnasium.Env`).

`reset` returns chat messages, `step(text)` takes what the policy generated and returns the env's
reply, a reward and whether the episode ended. The base class picks the episode's problem, cleans
the action, counts turns and tool calls, enforces the turn and token budgets, turns a sandbox
failure into a truncated episode with `info["error"]`, owns the episode's sandbox session and
supplies every member of `spo_agents.envs.protocol.TextEnv`. The contract, the `info` keys and
how to write an environment: docs/environments.md.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym

from spo_agents.envs.problems import ProblemSet
from spo_agents.envs.spaces import ChatSpace, Message, TextSpace, Timings, clean_text, head_tail
from spo_agents.errors import EnvError, SandboxError
from spo_agents.types import Problem

__all__ = [
    "ChatSpace",
    "Message",
    "MultiTurnEnv",
    "StepOutcome",
    "TextSpace",
    "Timings",
    "clean_text",
    "head_tail",
    "open_sync_session",
    "shared_backend",
]


@dataclass
class StepOutcome:
    """What a subclass's `_step_episode` returns; the base class adds the common `info` keys.

    `observation` is the env's reply ("" when it has nothing to say), `reward` the reward of
    this step (outcome envs: 0 until the end), `terminated` / `truncated` as in Gymnasium.
    """

    observation: str = ""
    reward: float = 0.0
    terminated: bool = False
    truncated: bool = False
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Shared sandbox backends
# --------------------------------------------------------------------------------------------
_BACKENDS: dict[str, Any] = {}
_BACKENDS_LOCK = threading.Lock()


def shared_backend(sandbox: Any) -> Any:
    """The sandbox backend an env uses: the instance itself, or one process-wide instance per
    backend name (so the many env instances of a run share one backend and its worker pool)."""
    if sandbox is None or not isinstance(sandbox, str):
        return sandbox
    with _BACKENDS_LOCK:
        if sandbox not in _BACKENDS:
            from spo_agents.sandboxes import make_backend

            _BACKENDS[sandbox] = make_backend(sandbox)
        return _BACKENDS[sandbox]


def open_sync_session(backend: Any, *, stateless: bool | None, limits: Any) -> Any:
    """Open a synchronous session on `backend` (raises `SandboxError` on infrastructure failure).
    `stateless=None` leaves the choice to the backend's own default."""
    from spo_agents.sandboxes import open_session_sync

    return open_session_sync(backend, stateless=stateless, limits=limits)


# --------------------------------------------------------------------------------------------
# The base class
# --------------------------------------------------------------------------------------------
class MultiTurnEnv(gym.Env[Any, str]):
    """Base class of the suite's environments. Subclasses implement `_reset_episode` (the first
    chat messages) and `_step_episode` (the reply to one generation, a `StepOutcome`).

    Class attributes a subclass sets:
        stop_sequences: strings at which generation must stop and hand control to `step`.
        reply_role: `None` (replies continue the assistant turn) or a chat role.

    Constructor arguments (subclasses pass them through):
        problems: the problem set of this instance (`env.problems`, `env.problem_ids`): a list,
            or a shared `ProblemSet` from `load_problems` (not copied; treat it as read-only).
        max_action_chars: bound of the action space; longer actions end the episode (truncated).
        max_turns: steps per episode before it is truncated (`None`: no limit).
        max_episode_tokens: budget on the tokens of all actions and replies of an episode
            (`None`: no budget; rollouts usually enforce their own exact budget). Counted with
            `tokenizer.encode` when a tokenizer is given, else estimated as UTF-8 bytes / 4.
        sandbox, sandbox_limits, sandbox_stateless: the code sandbox of tool environments (a
            backend name or `SandboxBackend` instance, shared by all instances of a run);
            `sandbox_stateless=None` keeps the backend's own default.
    """

    metadata: dict[str, Any] = {"render_modes": []}
    stop_sequences: list[str] = []
    reply_role: str | None = None
    #: whether `rescore` scores saved text (set True where you override it)
    rescorable: bool = False

    def __init__(
        self,
        problems: list[Problem] | ProblemSet,
        *,
        max_action_chars: int = 200_000,
        max_turns: int | None = None,
        max_episode_tokens: int | None = None,
        tokenizer: Any = None,
        sandbox: Any = None,
        sandbox_limits: Any = None,
        sandbox_stateless: bool | None = None,
    ) -> None:
        super().__init__()
        if not problems:
            raise EnvError(
                f"`{type(self).__name__}` needs at least one problem, got an empty problem set; "
                f"check the env's `source` / `dataset_path` / `num_problems` arguments"
            )
        if isinstance(problems, ProblemSet):  # shared and already indexed: no per-instance copy
            self.problem_set: ProblemSet | None = problems
            self.problems = problems.problems
            self._by_id = problems.by_id
        else:
            self.problem_set = None
            self.problems = list(problems)
            self._by_id = {}
            for p in self.problems:
                if p.id in self._by_id:
                    raise EnvError(f"problem ids must be unique, `{p.id}` appears more than once")
                self._by_id[p.id] = p
        self._ids: list[str] | None = None
        self.action_space = TextSpace(max_action_chars)
        self.observation_space = ChatSpace(10_000_000)
        self.max_turns = max_turns
        self.max_episode_tokens = max_episode_tokens
        self.tokenizer = tokenizer
        self._sandbox_spec = sandbox
        self._sandbox_backend: Any = None
        self.sandbox_limits = sandbox_limits
        self.sandbox_stateless = sandbox_stateless
        self._session: Any = None
        self.problem: Problem | None = None
        self._active = False
        self._turn = 0
        self._tool_calls = 0
        self._episode_tokens = 0
        self._timings: dict[str, float] = {}

    # --- problems -------------------------------------------------------------------------
    @property
    def problem_ids(self) -> list[str]:
        if self._ids is None:
            self._ids = self.problem_set.ids if self.problem_set is not None else [p.id for p in self.problems]
        return self._ids

    def get_problem(self, problem_id: str) -> Problem:
        try:
            return self._by_id[problem_id]
        except KeyError:
            raise EnvError(
                f"problem `{problem_id}` is not in this environment's problem set "
                f"({len(self.problems)} problems, e.g. `{self.problems[0].id}`); check the split and source"
            ) from None

    def answers_equivalent(self, a: Any, b: Any) -> bool:
        """Whether two final answers count as the same (used by maj@k). Default: equal strings."""
        return a is not None and b is not None and str(a).strip() == str(b).strip()

    @property
    def env_id(self) -> str:
        """The id trajectories and transcripts record: the registered id that `envs.make` puts in
        `self.spec` (`math-python-v0`), else the class as `package.module:Class`."""
        spec = self.unwrapped.spec
        if spec is not None and spec.id:
            return str(spec.id)
        cls = type(self)
        return f"{cls.__module__}:{cls.__qualname__}"

    def rescore(self, problem: Problem, model_text: list[str]) -> tuple[float, dict[str, Any]] | None:
        """Score saved model text again (`spo-agent rescore`): `(reward, info)` with `answer`,
        `correct` and `check` in `info`, or `None` when the reward is not a pure function of the
        text (it runs code, or depends on the episode's replies). Default: `None`."""
        return None

    # --- the Gymnasium API ----------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[list[Message], dict[str, Any]]:
        super().reset(seed=seed)
        self._end_episode()
        options = dict(options or {})
        if options.get("problem") is not None:
            problem = options["problem"]
            if not isinstance(problem, Problem):
                raise EnvError(f"`options['problem']` must be a `Problem`, got {type(problem).__name__}")
        elif options.get("problem_id") is not None:
            problem = self.get_problem(str(options["problem_id"]))
        else:
            problem = self.problems[int(self.np_random.integers(len(self.problems)))]
        self.problem = problem
        self._turn = 0
        self._tool_calls = 0
        self._episode_tokens = 0
        self._active = True
        self._timings = {}
        start = time.perf_counter()
        messages = self._reset_episode(problem)
        self._check_messages(messages)
        self._episode_tokens += sum(self._count_tokens(m["content"]) for m in messages)
        self._timings["step_s"] = time.perf_counter() - start
        info = self._info(self._timings)
        return [dict(m) for m in messages], info

    def step(self, action: Any) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if not self._active:
            raise EnvError(
                "`step` called outside an episode: call `reset()` first (and again after an episode "
                "terminated or was truncated)"
            )
        start = time.perf_counter()
        self._turn += 1
        text = clean_text(action)
        if text is None:
            raise EnvError(f"an action must be text (`str`, or UTF-8 `bytes`), got {type(action).__name__}")
        self._timings = {}
        if len(text) > self.action_space.max_length:
            outcome = StepOutcome(
                truncated=True,
                info={
                    "malformed": f"action of {len(text)} characters exceeds the limit of {self.action_space.max_length}"
                },
            )
            outcome.info.update(self._final_info(None))
        else:
            try:
                outcome = self._step_episode(text)
            except SandboxError as e:
                outcome = StepOutcome(truncated=True, info={"error": f"sandbox failure: {e}"})
                outcome.info.update(self._final_info(None))
        if not (outcome.terminated or outcome.truncated):
            self._episode_tokens += self._count_tokens(text) + self._count_tokens(outcome.observation)
            budget = None
            if self.max_turns is not None and self._turn >= self.max_turns:
                budget = f"turn budget of {self.max_turns} reached"
            elif self.max_episode_tokens is not None and self._episode_tokens >= self.max_episode_tokens:
                budget = f"token budget of {self.max_episode_tokens} reached"
            if budget is not None:
                outcome = StepOutcome(outcome.observation, 0.0, False, True, {**outcome.info, "budget": budget})
                outcome.info.update(self._final_info(None))
        if outcome.terminated or outcome.truncated:
            self._end_episode()
        self._timings["step_s"] = time.perf_counter() - start
        info = {**outcome.info, **self._info(self._timings)}
        return outcome.observation, float(outcome.reward), bool(outcome.terminated), bool(outcome.truncated), info

    def close(self) -> None:
        """End the current episode and release its sandbox session. Safe to call twice.
        The sandbox backend is shared and is not closed here."""
        self._end_episode()
        super().close()

    # --- for subclasses -------------------------------------------------------------------
    def _reset_episode(self, problem: Problem) -> list[Message]:
        """Start an episode on `problem`; return the initial chat messages."""
        raise NotImplementedError

    def _step_episode(self, action: str) -> StepOutcome:
        """Consume one model output (already valid UTF-8, within the action bound)."""
        raise NotImplementedError

    def _final_info(self, answer: Any) -> dict[str, Any]:
        """The end-of-episode `info` keys for an episode that ended without a scored answer
        (budget, malformed action, sandbox failure). Subclasses may extend it."""
        return {"answer": answer, "correct": False}

    def _on_episode_end(self) -> None:
        """Hook: release per-episode resources (the sandbox session is closed by the base)."""

    def add_timing(self, key: str, seconds: float) -> None:
        """Add `seconds` to this step's timing `key` (e.g. `sandbox_s`, `check_s`)."""
        self._timings[key] = self._timings.get(key, 0.0) + seconds

    def count_tool_call(self) -> int:
        """Record one tool call of this episode; returns the count so far."""
        self._tool_calls += 1
        return self._tool_calls

    @property
    def tool_calls_made(self) -> int:
        return self._tool_calls

    @property
    def turn(self) -> int:
        return self._turn

    @property
    def sandbox_backend(self) -> Any:
        if self._sandbox_backend is None and self._sandbox_spec is not None:
            self._sandbox_backend = shared_backend(self._sandbox_spec)
        return self._sandbox_backend

    def sandbox_session(self) -> Any:
        """The episode's sandbox session (a `SyncSession`-like object with `run(code, timeout)`
        and `close()`), opened on first use. Raises `SandboxError` when it cannot be opened."""
        if self._session is None:
            backend = self.sandbox_backend
            if backend is None:
                raise EnvError(
                    f'`{type(self).__name__}` needs a sandbox to run code: pass `sandbox="local"` '
                    f"(or another backend name or a `SandboxBackend` instance)"
                )
            self._session = open_sync_session(backend, stateless=self.sandbox_stateless, limits=self.sandbox_limits)
        return self._session

    # --- internals ------------------------------------------------------------------------
    def _end_episode(self) -> None:
        was_active = self._active
        self._active = False
        session, self._session = self._session, None
        if session is not None:
            try:
                session.close()
            except Exception:  # closing is best effort; the backend reclaims lost sessions
                pass
        if was_active:
            self._on_episode_end()

    def _check_messages(self, messages: Any) -> None:
        """`_reset_episode` must give a non-empty list of `{"role": str, "content": str}` dicts."""
        ok = isinstance(messages, list) and bool(messages)
        ok = ok and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
        if not (ok and all(isinstance(m.get("content"), str) for m in messages)):
            raise EnvError(
                f"`{type(self).__name__}._reset_episode` must return the first chat messages, a non-empty list of "
                f'`{{"role": str, "content": str}}` dicts, e.g. `[{{"role": "user", "content": problem.prompt}}]`; '
                f"it returned {repr(messages)[:120]}"
            )

    def _count_tokens(self, text: str) -> int:
        if self.max_episode_tokens is None or not text:
            return 0
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text, add_special_tokens=False))
        return math.ceil(len(text.encode("utf-8")) / 4)

    def _info(self, timings: Mapping[str, float]) -> dict[str, Any]:
        return {
            "problem_id": self.problem.id if self.problem is not None else None,
            "turn": self._turn,
            "tool_calls": self._tool_calls,
            "timings": Timings(timings),
        }
