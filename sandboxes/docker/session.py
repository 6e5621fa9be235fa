"""One episode's interpreter in the `docker` backend: a container, its calls, its replacement.

A call's code failing, timing out or exceeding a limit is a `SandboxResult` (the in-container
supervisor measures it); a container that ends under a call by no doing of the code raises
`SandboxError` and the next call continues in a fresh container with `session_restarted`
(sandboxes/README.md, `docker`).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from spo_agents.errors import SandboxError

from ..base import SandboxLimits, SandboxResult, SandboxSession
from .channel import Box, EngineGone
from .pool import Key

if TYPE_CHECKING:
    from .backend import DockerBackend

#: The in-container supervisor enforces a call's timeout; the host kills the whole container only
#: when the supervisor has not answered this long after the timeout (it is wedged or gone).
HOST_GRACE_S = 5.0
#: Exit status reported for a run the host killed (the shell's 128 + SIGKILL).
KILLED_STATUS = 137


class DockerSession(SandboxSession):
    """One episode's interpreter in its own container. Calls on one session run one at a time."""

    def __init__(self, backend: DockerBackend, key: Key, box: Box, limits: SandboxLimits) -> None:
        self.backend, self.key, self.box = backend, key, box
        self.limits = limits
        self.stateless = key.stateless
        self._run_lock = threading.Lock()  # one call at a time (held in the backend's threads)
        self._box_lock = threading.Lock()  # guards `box` and `_closed`
        self._closed = False
        self._lost = False  # its container ended by no doing of the code: the next result says so

    @property
    def container_id(self) -> str | None:
        return self.box.id if self.box is not None else None

    async def run(self, code: str, timeout: float | None = None) -> SandboxResult:
        if self._closed:
            raise SandboxError("this docker sandbox session is closed; open a new one with `backend.open_session()`")
        return await self.backend._in_thread(self._run_blocking, code, timeout)

    async def close(self) -> None:
        """Remove the container (a call in flight ends with "session closed"). Idempotent."""
        if self._closed:
            return
        await asyncio.to_thread(self._close_blocking)

    def _run_blocking(self, code: str, timeout: float | None) -> SandboxResult:
        with self._run_lock:
            return self._run_locked(code, timeout)

    def _run_locked(self, code: str, timeout: float | None) -> SandboxResult:
        backend = self.backend
        limits = self.limits
        t = float(limits.timeout_s if timeout is None else timeout)
        restarted_before, self._lost = self._lost, False
        if self.box is None:  # lost in an earlier call and no warm container was ready then
            box = backend._acquire(self.key)
            with self._box_lock:
                if not self._closed:
                    self.box, box = box, None
            if box is not None:
                backend._remove(box)
            restarted_before = True
        box = self.box
        if self._closed or box is None:
            raise SandboxError("this docker sandbox session is closed; open a new one with `backend.open_session()`")
        start = time.monotonic()
        try:
            box.send({"code": code, "timeout": t, "cpu_s": limits.cpu_s})
            msg = box.recv(start + t + HOST_GRACE_S)
        except socket.timeout:
            self._replace()
            if self._closed:
                return _closed_result(time.monotonic() - start)
            return SandboxResult(
                stderr=f"timed out after {t:g} s and the container did not recover; the session was restarted "
                "in a new container (earlier variables are lost)",
                exit_status=KILLED_STATUS,
                timed_out=True,
                session_restarted=True,
                duration_s=time.monotonic() - start,
                extra={"container": box.id[:12]},
            )
        except EngineGone as e:
            if self._closed:
                return _closed_result(time.monotonic() - start)
            state = self._inspect_state(box.id)
            self._replace()
            status = int(state.get("ExitCode") or 0) or KILLED_STATUS
            if not state.get("OOMKilled"):
                self._lost = not self.stateless
                raise SandboxError(
                    f"the session's container {box.id[:12]} ended (status {status}) while a call ran, not by the "
                    "code's doing: it was killed from outside, or the engine or the sandbox's supervisor failed. "
                    "The session's state is lost; its next call continues in a new container (`session_restarted`)."
                ) from e
            return SandboxResult(
                stderr=f"the session's container was killed by the out-of-memory killer (limit {limits.memory_mb} MB); "
                "the session was restarted in a new container (earlier variables are lost)",
                exit_status=status,
                memory_exceeded=True,
                session_restarted=True,
                duration_s=time.monotonic() - start,
                extra={"container": box.id[:12]},
            )
        lost = bool(msg.get("worker_lost"))
        stderr = msg["stderr"]
        if lost:
            if msg.get("timed_out"):
                note = f"timed out after {t:g} s"
            else:
                note = f"the session's interpreter exited with status {msg['exit_status']}"
            if int(msg.get("oom_kills") or 0) > 0:
                note += f" (killed by the out-of-memory killer, limit {limits.memory_mb} MB)"
            note += "; the session was restarted (earlier variables are lost)" if not self.stateless else ""
            stderr += ("\n" if stderr and not stderr.endswith("\n") else "") + note
        return SandboxResult(
            stdout=msg["stdout"],
            stderr=stderr,
            exit_status=int(msg["exit_status"]),
            exception=msg["exception"],
            timed_out=bool(msg.get("timed_out")) or bool(msg.get("cpu_exceeded")),
            memory_exceeded=bool(msg.get("memory_error")) or int(msg.get("oom_kills") or 0) > 0,
            output_truncated=bool(msg.get("output_truncated")),
            session_restarted=restarted_before or lost,
            duration_s=time.monotonic() - start,
            extra={
                "container": box.id[:12],
                "run_s": msg.get("duration_s"),
                **({"cpu_exceeded": True} if msg.get("cpu_exceeded") else {}),
            },
        )

    def _inspect_state(self, cid: str) -> dict[str, Any]:
        api = self.backend._api
        # The stream closes a moment before the engine records the exit; wait for it briefly.
        state: dict[str, Any] = {}
        for _ in range(40):
            try:
                state = api.inspect_container(cid)["State"]
            except Exception:  # noqa: BLE001
                return state
            if not state.get("Running"):
                return state
            time.sleep(0.025)
        return state

    def _replace(self) -> None:
        """Kill the session's container; continue in a warm one if ready (else on the next call)."""
        backend = self.backend
        with self._box_lock:
            old, self.box = self.box, None
        if old is not None:
            try:
                backend._api.kill(old.id)
            except Exception:  # noqa: BLE001 - already dead
                pass
            backend._discard_later(old)
        new = backend._pool.pop(self.key)
        backend._pool.refill(self.key)
        with self._box_lock:
            if not self._closed:
                self.box, new = new, None
        if new is not None:
            backend._discard_later(new)

    def _close_blocking(self) -> None:
        backend = self.backend
        with self._box_lock:
            self._closed = True
            box, self.box = self.box, None
        if box is not None:
            backend._remove(box)


def _closed_result(duration: float) -> SandboxResult:
    return SandboxResult(
        exit_status=KILLED_STATUS,
        exception="the session was closed while the code ran",
        session_restarted=False,
        duration_s=duration,
    )
