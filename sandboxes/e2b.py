"""The `e2b` sandbox backend: sessions are E2B cloud sandboxes (Firecracker microVMs).

Built on `e2b-code-interpreter` (`pip install 'spo-agents[e2b]'`) and `E2B_API_KEY`. One session
is one E2B sandbox with a Jupyter code context of its own. How our timeouts map to E2B's, what a
result holds and what is (not) covered: docs/sandbox.md.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from typing import Any

from spo_agents.errors import SandboxError
from spo_agents.sandboxes.base import SandboxBackend, SandboxLimits, SandboxResult, SandboxSession, merge_limits

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
NO_KEY_MESSAGE = (
    "the `e2b` sandbox backend needs an E2B API key: set E2B_API_KEY (from https://e2b.dev/dashboard) "
    "or pass `api_key=`; to run without a cloud account use the `local` or `docker` backend"
)


def strip_ansi(text: str) -> str:
    """Jupyter tracebacks carry terminal colour codes; results hold plain text."""
    return _ANSI.sub("", text)


def keep_head_and_tail(text: str, limit: int) -> tuple[str, bool]:
    """Cut the middle of `text` to at most `limit` UTF-8 bytes (head and tail kept, a marker
    says how much was cut). Returns the text and whether it was cut."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text, False
    half = max(limit, 0) // 2
    # "ignore" drops a character split by the cut, so the edges stay valid text.
    head = data[: limit - half].decode("utf-8", "ignore")
    tail = data[len(data) - half :].decode("utf-8", "ignore") if half else ""
    cut = len(data) - len(head.encode("utf-8")) - len(tail.encode("utf-8"))
    return head + f"\n[... {cut} bytes of output cut ...]\n" + tail, True


def _exit_status(value: str) -> int:
    """`SystemExit`'s value as Jupyter reports it (`''`, `'3'`, `'None'` or a message)."""
    v = value.strip()
    if v in ("", "None", "0"):
        return 0
    try:
        return int(v) & 0xFF
    except ValueError:
        return 1


def execution_to_result(
    execution: Any, limits: SandboxLimits, *, duration_s: float = 0.0, extra: dict[str, Any] | None = None
) -> SandboxResult:
    """Map an `e2b_code_interpreter.Execution` to a `SandboxResult` (see the module docstring)."""
    stdout = "".join(execution.logs.stdout)
    stderr = "".join(execution.logs.stderr)
    exit_status, exception, memory = 0, None, False
    error = execution.error
    if error is not None:
        if error.name == "SystemExit":
            exit_status = _exit_status(error.value)
            if exit_status and not error.value.strip().isdigit():
                stderr += error.value.strip() + "\n"
        else:
            exception = strip_ansi(error.traceback or f"{error.name}: {error.value}")
            if not exception.rstrip().endswith(f"{error.name}: {error.value}".rstrip()):
                exception = exception.rstrip("\n") + f"\n{error.name}: {error.value}"
            exception = exception.rstrip("\n") + "\n"
            exit_status = 1
            memory = error.name == "MemoryError"
            stderr += exception
    stdout, cut_out = keep_head_and_tail(stdout, limits.max_output_bytes)
    stderr, cut_err = keep_head_and_tail(stderr, limits.max_output_bytes)
    info = dict(extra or {})
    display = execution.text
    if display is not None:
        info["display"] = display
    if execution.execution_count is not None:
        info["execution_count"] = execution.execution_count
    return SandboxResult(
        stdout=stdout,
        stderr=stderr,
        exit_status=exit_status,
        exception=exception,
        memory_exceeded=memory,
        output_truncated=cut_out or cut_err,
        duration_s=duration_s,
        extra=info,
    )


def _kinds(e: BaseException) -> set[str]:
    # By class name along the MRO, so the SDK is imported only when it is used.
    return {c.__name__ for c in type(e).__mro__}


def _is_execution_timeout(e: BaseException) -> bool:
    """`run_code`'s own execution timeout (not a request timeout, not a dead sandbox)."""
    return "TimeoutException" in _kinds(e) and "Execution timed out" in str(e)


def _sandbox_gone(e: BaseException) -> bool:
    """The sandbox was killed, evicted at the end of its lifetime, or cannot be reached."""
    gone = {"SandboxNotFoundException", "SandboxNotRunningException", "SandboxUnreachableException"}
    return bool(gone & _kinds(e)) or ("TimeoutException" in _kinds(e) and "sandbox was killed" in str(e))


class E2BBackend(SandboxBackend):
    """Sessions in E2B cloud sandboxes (see the module docstring for the timeout mapping).

    Arguments: `template` (E2B template; default the SDK's code-interpreter template),
    `api_key` (default `E2B_API_KEY`), `limits` (session defaults; only `timeout_s` and
    `max_output_bytes` apply), `sandbox_timeout_s` (lifetime), `request_timeout_s`,
    `allow_internet_access` (default False), `metadata` (tags shown in E2B's dashboard),
    `sandbox_class` (an `AsyncSandbox`-compatible class; the SDK's by default), and any
    `SandboxLimits` field as an option (`timeout_s=5`).
    """

    name = "e2b"

    def __init__(
        self,
        *,
        template: str | None = None,
        api_key: str | None = None,
        limits: SandboxLimits | None = None,
        sandbox_timeout_s: int = 600,
        request_timeout_s: float = 30.0,
        allow_internet_access: bool = False,
        metadata: dict[str, str] | None = None,
        sandbox_class: Any = None,
        **limit_fields: Any,
    ) -> None:
        options = (
            "template",
            "api_key",
            "limits",
            "sandbox_timeout_s",
            "request_timeout_s",
            "allow_internet_access",
            "metadata",
            "sandbox_class",
        )
        limits = merge_limits("e2b", limits, limit_fields, options)
        if sandbox_timeout_s <= 0 or request_timeout_s <= 0:
            raise SandboxError(
                f"`sandbox_timeout_s` and `request_timeout_s` must be > 0, got {sandbox_timeout_s} and "
                f"{request_timeout_s}; the sandbox lifetime is in seconds (E2B's maximum: 3600 on the free tier)"
            )
        self.template, self.limits = template, limits or SandboxLimits()
        self.api_key = api_key
        self.sandbox_timeout_s, self.request_timeout_s = int(sandbox_timeout_s), float(request_timeout_s)
        self.allow_internet_access, self.metadata = allow_internet_access, dict(metadata or {"app": "spo-agents"})
        self._sandbox_class = sandbox_class
        self._sessions: set[E2BSession] = set()

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Whether the SDK is importable and an API key is set, and why not."""
        try:
            import e2b_code_interpreter  # noqa: F401
        except ImportError:
            return False, "the E2B SDK is not installed: `pip install 'spo-agents[e2b]'`"
        if not os.environ.get("E2B_API_KEY"):
            return False, "E2B_API_KEY is not set (the `e2b` backend needs an E2B account and network access)"
        return True, "E2B SDK installed and E2B_API_KEY set"

    @property
    def isolation(self) -> str:
        return "e2b (cloud Firecracker microVM per session" + (
            ", internet allowed)" if self.allow_internet_access else ", no internet)"
        )

    def _class(self) -> Any:
        if self._sandbox_class is not None:
            return self._sandbox_class
        try:
            from e2b_code_interpreter import AsyncSandbox
        except ImportError as e:
            raise SandboxError("the `e2b` backend needs the E2B SDK: `pip install 'spo-agents[e2b]'`") from e
        return AsyncSandbox

    def _key(self) -> str:
        key = self.api_key or os.environ.get("E2B_API_KEY")
        if not key:
            raise SandboxError(NO_KEY_MESSAGE)
        return key

    async def _create_sandbox(self) -> Any:
        cls, key = self._class(), self._key()
        try:
            return await cls.create(
                template=self.template,
                timeout=self.sandbox_timeout_s,
                metadata=self.metadata,
                allow_internet_access=self.allow_internet_access,
                api_key=key,
                request_timeout=self.request_timeout_s,
            )
        except Exception as e:  # noqa: BLE001 - any failure to create is infrastructure
            raise SandboxError(
                f"could not create an E2B sandbox (template `{self.template or 'default'}`): {type(e).__name__}: {e}. "
                "Check E2B_API_KEY, network access to E2B and your plan's concurrency limit."
            ) from e

    async def open_session(self, *, stateless: bool | None = None, limits: SandboxLimits | None = None) -> E2BSession:
        self._key()  # fail before any network call when no key is set
        sandbox = await self._create_sandbox()
        session = E2BSession(self, sandbox, stateless=bool(stateless), limits=limits or self.limits)
        try:
            await session._open_context()
        except BaseException:
            await session.close()
            raise
        self._sessions.add(session)
        return session

    async def aclose(self) -> None:
        sessions, self._sessions = list(self._sessions), set()
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)


class E2BSession(SandboxSession):
    """One E2B sandbox and its code context. Calls on one session run one at a time."""

    def __init__(self, backend: E2BBackend, sandbox: Any, *, stateless: bool, limits: SandboxLimits) -> None:
        self.backend, self.sandbox, self.stateless, self.limits = backend, sandbox, stateless, limits
        self.context: Any = None
        self._renewed_at = time.monotonic()
        self._closed = False
        self._lock: asyncio.Lock | None = None

    @property
    def sandbox_id(self) -> str | None:
        return getattr(self.sandbox, "sandbox_id", None)

    async def _open_context(self) -> None:
        if not self.stateless:
            self.context = await self.sandbox.create_code_context(request_timeout=self.backend.request_timeout_s)

    async def _renew_if_needed(self, run_timeout: float) -> None:
        """Extend the sandbox's lifetime when this call could outlive it."""
        life = self.backend.sandbox_timeout_s
        if time.monotonic() - self._renewed_at + run_timeout + self.backend.request_timeout_s >= life * 0.5:
            await self.sandbox.set_timeout(max(life, int(run_timeout + self.backend.request_timeout_s) + 60))
            self._renewed_at = time.monotonic()

    async def run(self, code: str, timeout: float | None = None) -> SandboxResult:
        if self._closed:
            raise SandboxError("this e2b sandbox session is closed; open a new one with `backend.open_session()`")
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            return await self._run(code, float(self.limits.timeout_s if timeout is None else timeout))

    async def _run(self, code: str, t: float) -> SandboxResult:
        start = time.monotonic()
        extra = {"sandbox_id": self.sandbox_id}
        try:
            await self._renew_if_needed(t)
            context = self.context
            if self.stateless:
                context = await self.sandbox.create_code_context(request_timeout=self.backend.request_timeout_s)
            try:
                # The outer bound only guards against a transport that ignores both timeouts.
                execution = await asyncio.wait_for(
                    self.sandbox.run_code(
                        code, context=context, timeout=t, request_timeout=self.backend.request_timeout_s
                    ),
                    t + self.backend.request_timeout_s + 5.0,
                )
            finally:
                if self.stateless and context is not None:
                    try:
                        await self.sandbox.remove_code_context(context)
                    except Exception:  # noqa: BLE001 - the sandbox lifetime reclaims it anyway
                        pass
        except (asyncio.TimeoutError, Exception) as e:  # noqa: BLE001 - sorted below
            if isinstance(e, asyncio.TimeoutError) or _is_execution_timeout(e):
                restarted = await self._restart_context()
                return SandboxResult(
                    exit_status=137,
                    exception=f"TimeoutError: the code ran longer than {t:g} s (wall clock) and was interrupted"
                    + ("; the session restarted, earlier variables are gone" if restarted else ""),
                    timed_out=True,
                    session_restarted=restarted,
                    duration_s=time.monotonic() - start,
                    extra=extra,
                )
            if _sandbox_gone(e):
                await self._replace_sandbox()
                return SandboxResult(
                    exit_status=137,
                    exception=f"the E2B sandbox was lost ({type(e).__name__}: {e}); the session restarted in a new "
                    "sandbox, earlier variables are gone",
                    session_restarted=True,
                    duration_s=time.monotonic() - start,
                    extra={**extra, "infrastructure_error": f"{type(e).__name__}: {e}"},
                )
            raise SandboxError(f"E2B call failed: {type(e).__name__}: {e}") from e
        return execution_to_result(execution, self.limits, duration_s=time.monotonic() - start, extra=extra)

    async def _restart_context(self) -> bool:
        """After a timeout the kernel may still be running the code: restart it (stateful) or
        leave it (stateless contexts are removed). Returns whether state was lost."""
        if self.stateless:
            return False
        try:
            await self.sandbox.restart_code_context(self.context)
        except Exception:  # noqa: BLE001 - a wedged kernel: start over in a new sandbox
            await self._replace_sandbox()
        return True

    async def _replace_sandbox(self) -> None:
        old = self.sandbox
        try:
            await old.kill(request_timeout=self.backend.request_timeout_s)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.sandbox = await self.backend._create_sandbox()
        self._renewed_at = time.monotonic()
        self.context = None
        await self._open_context()

    async def close(self) -> None:
        """Kill the sandbox. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self.backend._sessions.discard(self)
        try:
            await self.sandbox.kill(request_timeout=self.backend.request_timeout_s)
        except Exception:  # noqa: BLE001 - gone already, or E2B reclaims it at the end of its lifetime
            pass
