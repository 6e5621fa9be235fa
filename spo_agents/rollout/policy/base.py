"""The policy backend protocol: token ids in, token ids and log-probs out.

A backend samples a continuation of `prompt_ids` until a stop string, the end-of-turn token or
`max_new_tokens`, and returns exactly the sampled tokens with the behaviour policy's log-prob of
each. Rollouts append these tokens to the trajectory as they are (token-in, token-out); nothing
is re-tokenised from text.

Backends are async (many episodes are in flight); heavy work runs off the event loop thread.
`version` is the learner step whose weights the backend currently serves; every `Generation`
records the version its request was handed by the backend's `VersionGate`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class SamplingParams:
    """Sampling settings of one generation call. `top_k = 0` disables top-k."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    @classmethod
    def of(cls, section: Any, max_new_tokens: int) -> SamplingParams:
        """The settings of a config section holding `temperature`, `top_p` and `top_k`: `rollout`
        for training and offline values, `eval` for held-out evaluation."""
        return cls(section.temperature, section.top_p, section.top_k, max_new_tokens=max_new_tokens)


@dataclass
class Generation:
    """The sampled continuation.

    `token_ids` end with the stop string's tokens or the end-of-turn token when generation
    stopped there (both are part of what the policy sampled and are trained on).
    `finish_reason`: `stop` (a stop string), `eos` (end-of-turn / end-of-sequence token),
    `length` (`max_new_tokens`). `logprobs` may be empty only for backends that cannot return
    them (`supports_token_io = False`), which are usable for evaluation only.
    """

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: Literal["stop", "eos", "length"]
    stop_string: str | None = None
    policy_version: int = 0
    info: dict[str, Any] = field(default_factory=dict)


class VersionGate:
    """Hands each request the weight version that will serve it, and drains before a sync.

    `async with gate.request() as version:` waits while a sync is pending, then counts the
    request as in flight; `await gate.pause()` closes the gate and returns once nothing is in
    flight; `gate.resume(version)` sets the new version and reopens. A policy backend that
    wraps each server call in `request()` can never attribute tokens to the wrong version.
    """

    def __init__(self, version: int = 0) -> None:
        self.version = version
        self._in_flight = 0
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def paused(self) -> bool:
        return not self._open.is_set()

    @contextlib.asynccontextmanager
    async def request(self) -> AsyncIterator[int]:
        while not self._open.is_set():  # re-check: a pause may land between wake-up and here
            await self._open.wait()
        self._in_flight += 1
        self._idle.clear()
        try:
            yield self.version
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def pause(self) -> None:
        self._open.clear()
        await self._idle.wait()

    def resume(self, version: int | None = None) -> None:
        """Reopen, with `version` as the new version (None: keep the current one)."""
        if version is not None:
            self.version = version
        self._open.set()


class Session:
    """One episode's handle on a backend (`PolicyBackend.session()`): an episode sends every turn
    through it, so a backend over several servers keeps the episode on one of them (its prefix
    cache holds the conversation). This default passes each call to the backend."""

    def __init__(self, policy: PolicyBackend) -> None:
        self.policy = policy

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        return await self.policy.generate(prompt_ids, params)


class PolicyBackend(abc.ABC):
    """Samples from the current policy. Every backend holds a `VersionGate` (`_gate`): generation
    runs inside `_gate.request()`, which hands it the version to stamp; `pause` drains it before
    new weights, `resume(version)` reopens it with them."""

    #: True when the backend returns sampled token ids and their log-probs (trainable rollouts).
    supports_token_io: bool = True

    def __init__(self) -> None:
        self._gate = VersionGate()

    @property
    def version(self) -> int:
        """The learner step whose weights the backend serves now."""
        return self._gate.version

    @version.setter
    def version(self, value: int) -> None:
        self._gate.version = value

    @property
    @abc.abstractmethod
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer matching the served model (chat template included)."""

    @abc.abstractmethod
    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        """Sample one continuation of `prompt_ids`."""

    def session(self) -> Session:
        """A handle for one episode's turns (see `Session`)."""
        return Session(self)

    async def connect(self) -> None:
        """Reach whatever serves the model once, so an unreachable one fails before any episode
        (a server backend's probe); in-process backends have nothing to reach."""

    async def close(self) -> None:
        """Release resources. Safe to call more than once."""

    async def pause(self) -> None:
        """Hold new generations and return once none is running (before new weights)."""
        await self._gate.pause()

    def resume(self, version: int) -> None:
        """Serve the weights of `version` and let generations run again."""
        self._gate.resume(version)

    def set_served_model(self, name: str) -> None:
        """Name the served weights in later requests (a server that loaded a LoRA adapter under
        `name`); backends that generate in this process ignore it."""
