"""One episode's interpreter in the `local` backend: a forked runner, its calls, its restarts.

A call's code failing, timing out or exceeding a limit is a `SandboxResult`; a session ended by
something outside the sandbox (its worker vanishing, a SIGKILL the sandbox did not send) raises
`SandboxError`, and the next call reports `session_restarted` (sandboxes/README.md, "The code's
doing, or the infrastructure's").
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from spo_agents.errors import SandboxError

from ..base import SandboxLimits, SandboxResult, SandboxSession
from .channel import Runner, read_hello
from .zygote import Exit

if TYPE_CHECKING:
    from .backend import LocalBackend

_SIGKILL_STATUS = 128 + 9
_SIGXCPU_STATUS = 128 + 24


class LocalSession(SandboxSession):
    """One episode's interpreter in the `local` backend (see the package docstring)."""

    def __init__(self, backend: LocalBackend, stateless: bool, limits: SandboxLimits) -> None:
        self._backend = backend
        self.stateless = stateless
        self.limits = limits
        self._runner: Runner | None = None
        self._next: asyncio.Task[Runner] | None = None  # stateless: the fork for the next call
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task[int | None]] = set()
        self._closed = False
        self._lost = False  # an infrastructure failure took the session's state: the next result says so
        self.restarts = 0
        self.start_s = 0.0

    # --- process management ---
    def _limits_msg(self, workdir: str | None) -> dict[str, Any]:
        d = asdict(self.limits)
        d["drop_capabilities"] = self._backend.isolation != "none"
        d["workdir"] = workdir
        return d

    async def _spawn(self) -> Runner:
        loop = asyncio.get_running_loop()
        # Namespaced isolation mounts a private tmpfs inside the session; without namespaces the
        # work dir is a host temp dir of the session's own, removed when the session ends.
        workdir = tempfile.mkdtemp(prefix="spo-sandbox-") if self._backend.isolation == "none" else None
        host, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # The runner's first message then carries its sender's pid as this process sees it (see
        # `read_hello`): that is how the session's host pid is known, whatever its namespaces.
        host.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            pid, pgid, generation = await loop.run_in_executor(
                None, self._backend._spawn_runner, self._limits_msg(workdir), [child.fileno(), out_w, err_w]
            )
        except BaseException:
            for fd in (out_r, err_r):
                os.close(fd)
            host.close()
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            raise
        finally:
            child.close()
            os.close(out_w)
            os.close(err_w)
        runner = Runner(pid, pgid, generation, host, out_r, err_r, self.limits.max_output_bytes)
        runner.loop = loop
        runner.workdir = workdir
        for name, fd in runner.fds.items():
            os.set_blocking(fd, False)
            loop.add_reader(fd, runner.on_readable, name)
        try:
            hello, host_pid = await read_hello(host, 60)
            if not hello or hello.get("op") != "ready":
                detail = hello.get("error") if hello else "it exited before it was ready"
                raise SandboxError(f"a `local` sandbox session failed to start ({self._backend.isolation}): {detail}")
            if not host_pid:
                raise SandboxError("a `local` sandbox session started, but the kernel did not say which process it is")
            host.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 0)
            runner.host_pid = host_pid
            runner.reader, runner.writer = await asyncio.open_unix_connection(sock=host)
            # before any user code: the process cap that holds for root too
            runner.cgroup = await loop.run_in_executor(
                None, self._backend._cap_processes, host_pid, self.limits.max_processes
            )
        except BaseException:
            await self._kill(runner)
            raise
        return runner

    async def _kill(self, runner: Runner, settle: bool = False) -> Exit | None:
        """Kill the runner's tree and release what it held (channels, work dir, pids cgroup).

        With `settle`, a runner that hung up first gets a moment to exit by itself; how it ended
        is returned then (None when it had not, or its worker is gone): the sandbox sent it no
        signal, so a signal in it came from elsewhere. The pids cgroup is removed in the background
        as soon as the killed tree has left it (milliseconds; seconds for a fork bomb on a busy
        machine), so neither a timed-out call nor `close` waits for that."""
        loop = asyncio.get_running_loop()
        backend = self._backend
        ended = None
        try:
            if settle:
                for _ in range(100):
                    if not backend._holds(runner.generation):
                        break  # the worker itself is gone, and the session with it
                    ended = await loop.run_in_executor(None, backend._zygote_wait, runner.pid, runner.generation)
                    if ended is not None:
                        break
                    await asyncio.sleep(0.005)
            if ended is None:
                await loop.run_in_executor(None, backend._zygote_kill, runner.pid, runner.pgid, runner.generation)
        finally:
            runner.drain()
            runner.close()
            if runner.workdir is not None:
                shutil.rmtree(runner.workdir, ignore_errors=True)
            if runner.cgroup is not None:
                backend._release_later(runner.cgroup)
        return ended

    async def _current(self) -> Runner:
        if self._runner is None and self._next is not None:
            task, self._next = self._next, None
            self._runner = await task
        if self._runner is not None and self.stateless and not self._backend._holds(self._runner.generation):
            # A stateless session keeps nothing between calls: a fork whose worker has gone since
            # is replaced without a word.
            stale, self._runner = self._runner, None
            await self._kill(stale)
        if self._runner is None:
            t0 = time.perf_counter()
            self._runner = await self._spawn()
            self.start_s = time.perf_counter() - t0
        return self._runner

    async def start(self) -> None:
        async with self._lock:
            await self._current()

    # --- protocol ---
    async def run(self, code: str, timeout: float | None = None) -> SandboxResult:
        if not isinstance(code, str):
            raise TypeError(f"`code` must be a str, got {type(code).__name__}")
        async with self._lock:
            if self._closed:
                raise SandboxError(
                    "this `local` sandbox session is closed; open a new one with `backend.open_session()`"
                )
            timeout = self.limits.timeout_s if timeout is None else float(timeout)
            runner = await self._current()
            restarted, self._lost = self._lost, False
            t0 = time.perf_counter()
            reply: dict[str, Any] | None = None
            timed_out = False
            try:
                await runner.send(
                    {"code": code, "cpu_s": self.limits.cpu_s, "echo": self._backend.echo_last_expression}
                )
            except (ConnectionError, OSError):
                pass  # the runner is already gone: reported below as a lost session
            except asyncio.CancelledError:
                self._abandon(runner)
                raise
            else:
                try:
                    reply = await asyncio.wait_for(runner.recv(), timeout)
                except asyncio.TimeoutError:
                    timed_out = True
                except asyncio.CancelledError:
                    # The caller gave up mid-call: the runner is still busy with this code, so
                    # it is killed and the next call starts a fresh one.
                    self._abandon(runner)
                    raise
            duration = time.perf_counter() - t0
            result = SandboxResult(duration_s=duration, session_restarted=restarted)
            if reply is not None:
                runner.drain()
                result.exit_status = int(reply["exit_status"])
                result.exception = reply["exception"]
                result.memory_exceeded = bool(reply["memory_error"])
                self._collect(runner, result)
                if self.stateless:
                    self._recycle()
                return result
            # The session is gone (timeout) or died (os._exit, a signal, a crash, or a kill from
            # outside): kill what is left of its tree, report, and start a fresh one.
            ended = await self._kill(runner, settle=not timed_out)
            self._runner = None
            self.restarts += 1
            self._collect(runner, result)
            outside = None if timed_out else self._killed_from_outside(runner, ended)
            if outside is not None:
                self._lost = not self.stateless  # the next call starts a fresh session and says so
                raise SandboxError(
                    f"{outside} while a call ran: an infrastructure failure, not the code's. The session's state "
                    f"is lost; its next call starts a fresh one (`session_restarted`)."
                )
            status = ended.status if ended is not None else None
            result.timed_out = timed_out or status == _SIGXCPU_STATUS
            if status == _SIGXCPU_STATUS:
                result.extra["cpu_exceeded"] = True
            if timed_out:
                result.exit_status = _SIGKILL_STATUS
                msg = f"timed out after {timeout:g} s; the session was restarted (earlier variables are lost)"
            else:
                result.exit_status = int(status) if status is not None else _SIGKILL_STATUS
                msg = (
                    f"the session process exited with status {result.exit_status}; "
                    "it was restarted (earlier variables are lost)"
                )
            result.stderr = result.stderr + ("\n" if result.stderr and not result.stderr.endswith("\n") else "") + msg
            result.session_restarted = True
            try:
                self._runner = await self._spawn()
            except SandboxError as e:
                result.extra["restart_error"] = str(e)
            return result

    def _killed_from_outside(self, runner: Runner, ended: Exit | None) -> str | None:
        """Why a runner that hung up did not end by the code's doing, or None when it may have.

        The sandbox sent it nothing (it is asked to settle first), and in a namespaced session the
        code cannot SIGKILL its runner (pid 1 of its own pid namespace ignores it from inside) nor
        reach the worker; so the worker vanishing, or a SIGKILL, came from outside. With isolation
        `none` the code can SIGKILL itself, so there only the worker's death counts."""
        if not self._backend._holds(runner.generation):
            return "the `local` sandbox worker ended (killed or died outside the sandbox's control)"
        if ended is not None and ended.signal == signal.SIGKILL and self._backend.isolation != "none":
            return "the session's process was killed from outside the sandbox (a SIGKILL the sandbox did not send)"
        return None

    def __del__(self) -> None:
        # Dropped without `close()`: hand the runner to the backend, which kills it at its next
        # request (a finaliser must not block on the worker's lock).
        runner = getattr(self, "_runner", None)
        if runner is not None and not self._closed:
            self._backend._orphans.append((runner.pid, runner.pgid, runner.generation, runner.workdir, runner.cgroup))
            try:
                runner.close()
            except Exception:  # noqa: BLE001 - the loop may be gone already
                pass

    def _collect(self, runner: Runner, result: SandboxResult) -> None:
        result.stdout, t1 = runner.captures["stdout"].take()
        result.stderr, t2 = runner.captures["stderr"].take()
        result.output_truncated = t1 or t2

    def _abandon(self, runner: Runner) -> None:
        self._runner = None
        self.restarts += 1
        self._lost = not self.stateless
        task = asyncio.get_running_loop().create_task(self._kill(runner))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _recycle(self) -> None:
        """Stateless mode: retire this fork and start the next one in the background."""
        old, self._runner = self._runner, None
        loop = asyncio.get_running_loop()
        if old is not None:
            task = loop.create_task(self._kill(old))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        self._next = loop.create_task(self._spawn())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        async with self._lock:
            runners = [r for r in [self._runner] if r is not None]
            self._runner = None
            if self._next is not None:
                task, self._next = self._next, None
                try:
                    runners.append(await task)
                except (SandboxError, asyncio.CancelledError):
                    pass
            for r in runners:
                try:
                    await self._kill(r)
                except SandboxError:
                    r.close()
            if self._background:
                await asyncio.gather(*self._background, return_exceptions=True)
        self._backend._sessions.discard(self)
