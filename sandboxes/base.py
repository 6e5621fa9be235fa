"""The sandbox protocol: one interface, several backends.

A *backend* (`local`, `docker`, `e2b`, or a plugin) opens *sessions*. A session is one episode's
Python interpreter: variables survive between `run` calls unless the session is stateless.

- User-code failure (an exception, a timeout, too much memory or output) is data in the
  `SandboxResult`; only infrastructure failure (cannot start a worker, engine down, a session
  killed from outside the sandbox, ...) raises `SandboxError`.
- Async first, because many episodes are in flight at once; `SyncSession` wraps a session for
  synchronous callers (environments' `step`, which rollouts run in worker threads).
- `close()` is safe to call twice; sessions are (async) context managers.
"""

from __future__ import annotations

import abc
import asyncio
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TypeVar

from spo_agents.errors import ConfigError, did_you_mean

T = TypeVar("T")


@dataclass
class SandboxLimits:
    """Resource limits of one session. `None` means the backend's default."""

    timeout_s: float = 10.0  # wall clock per `run`
    cpu_s: float | None = None  # CPU seconds per `run`
    memory_mb: int | None = 1024
    max_processes: int | None = 64
    max_open_files: int | None = 256
    max_file_size_mb: int | None = 64
    max_output_bytes: int = 64 * 1024  # kept per stream (stdout, stderr): head and tail, the middle is cut
    disk_mb: int | None = 256  # writable work dir (a size-limited tmpfs in the `local` backend)


def split_limits(options: dict[str, Any], base: SandboxLimits | None = None) -> tuple[SandboxLimits, dict[str, Any]]:
    """`base` (default `SandboxLimits()`) with the `SandboxLimits` fields among `options` applied,
    and the options that are not limits."""
    known = set(SandboxLimits.__dataclass_fields__)
    limits = {k: v for k, v in options.items() if k in known}
    rest = {k: v for k, v in options.items() if k not in known}
    return replace(base or SandboxLimits(), **limits), rest


def merge_limits(
    backend: str, limits: SandboxLimits | None, fields: dict[str, Any], options: Sequence[str]
) -> SandboxLimits:
    """`limits` (default `SandboxLimits()`) with the `SandboxLimits` fields in `fields` applied.

    `fields` are a backend's keyword arguments that are not among its own `options`; a name that
    is neither a limit nor an option is a `ConfigError` that lists both.
    """
    merged, unknown = split_limits(fields, limits)
    if unknown:
        first = sorted(unknown)[0]
        names = set(SandboxLimits.__dataclass_fields__) | set(options)
        raise ConfigError(
            f"unknown option `{first}` for the `{backend}` sandbox.{did_you_mean(first, names)} "
            f"Known options: {', '.join(sorted(names))}."
        )
    return merged


@dataclass
class SandboxResult:
    """The outcome of running one piece of code.

    `exit_status` is 0 when the code ran to completion; `exception` holds the traceback text when
    it raised. `session_restarted` is set when the session was lost (timeout, crash, `os._exit`)
    and had to be started afresh, so earlier variables are gone; after a call that raised
    `SandboxError` because the session was killed from outside, the next call's result says so.
    """

    stdout: str = ""
    stderr: str = ""
    exit_status: int = 0
    exception: str | None = None
    timed_out: bool = False
    memory_exceeded: bool = False
    output_truncated: bool = False
    session_restarted: bool = False
    duration_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.exit_status == 0 and self.exception is None and not self.timed_out and not self.memory_exceeded

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


class SandboxSession(abc.ABC):
    """One episode's interpreter."""

    @abc.abstractmethod
    async def run(self, code: str, timeout: float | None = None) -> SandboxResult:
        """Run `code`; `timeout` (seconds) overrides the session's wall-clock limit for this call."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release everything the session holds. Safe to call more than once."""

    async def __aenter__(self) -> SandboxSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class SandboxBackend(abc.ABC):
    """Opens sessions. Backends describe their isolation in `isolation` (e.g. `bubblewrap`)."""

    name: str = "?"

    @abc.abstractmethod
    async def open_session(
        self, *, stateless: bool | None = None, limits: SandboxLimits | None = None
    ) -> SandboxSession:
        """Start a session. `stateless=None` means the backend's own default (False unless the
        backend was built stateless)."""

    @property
    def isolation(self) -> str:
        return "unknown"

    async def aclose(self) -> None:
        """Release pools and workers shared by sessions. Safe to call more than once."""

    def close(self) -> None:
        run_sync(self.aclose())


# --- synchronous use ------------------------------------------------------------------------
class _LoopThread:
    """One background event loop shared by every synchronous caller in the process."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def loop(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None or cls._loop.is_closed():
                loop = asyncio.new_event_loop()
                t = threading.Thread(target=loop.run_forever, name="spo-sandbox-loop", daemon=True)
                t.start()
                cls._loop = loop
            return cls._loop


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run a coroutine on the shared background loop from synchronous code (any thread)."""
    loop = _LoopThread.loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        raise RuntimeError("run_sync called from the sandbox loop thread itself; await the coroutine instead")
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


class SyncSession:
    """Synchronous wrapper of a `SandboxSession` (for `gymnasium.Env.step`, which is sync)."""

    def __init__(self, session: SandboxSession) -> None:
        self._session = session

    def run(self, code: str, timeout: float | None = None) -> SandboxResult:
        return run_sync(self._session.run(code, timeout))

    def close(self) -> None:
        run_sync(self._session.close())

    def __enter__(self) -> SyncSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
