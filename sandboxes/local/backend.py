"""The `local` sandbox backend: the embedded default, a persistent Python session per episode.

How it works (see `sandboxes/README.md` for the threat model): one pre-warmed *zygote* per
backend has numpy and sympy imported; each session is a fork of it, so a session starts in a few
milliseconds and a call costs a round trip over a socket. Variables survive between the calls of
one session (the episode's tool calls); `stateless=True` gives every call a fresh fork instead.

Isolation is layered, and `backend.isolation` says which layer is in force:

- `bubblewrap` (default when `bwrap` works): the zygote runs in bubblewrap with every namespace
  unshared (no network, only the interpreter and `/usr` mounted read-only, environment replaced by
  a fixed one) and each session adds its own user, pid and mount namespaces (and, with
  `network_per_session`, network), a size-limited private tmpfs as its writable work dir (`/tmp`),
  no capabilities and no new privileges. The code runs as pid 1 of its pid namespace, so killing
  it kills everything it started.
- `unshare`: the same per-session namespaces without bubblewrap: the host's file system is visible
  but read-only (except the private work dir), scratch dirs outside the interpreter are hidden,
  and root drops to `nobody` when the interpreter is world-readable.
- `none`: plain fork with rlimits and a process-group kill; chosen only when asked for, with a
  warning.

In every mode: per-call wall clock (a timeout kills the session's whole process tree, starts a
new session and says so), CPU seconds, memory (address space on top of the pre-imported
interpreter), processes (as root: a pids cgroup per session, see `_PidsCap`), open files, file
size, disk (work dir size) and output (head and tail kept per stream, `output_truncated` set).

The code's doing or the infrastructure's. What the code or the sandbox's own limits cause is data
in the `SandboxResult`: an exception, `sys.exit`, `os._exit(n)` (any n, 137 included), a signal
the code sends itself, a crash in C code, the timeout, the CPU, memory, output and process limits
(`session_restarted` when the session was lost). A session ended by something else raises
`SandboxError` (its state is lost; the next call starts a fresh session and reports
`session_restarted`):
- the worker (bubblewrap, the zygote) vanishing, whoever killed it;
- a SIGKILL of the session's process that the sandbox did not send. The sandbox knows its own
  kills (timeouts, cancelled calls, `close`), and the code cannot send one: the session's process
  is pid 1 of its pid namespace, which ignores SIGKILL from inside it, and other sessions cannot
  address it. The zygote reports a death by signal apart from an exit code, so `os._exit(137)`
  stays a result.
What this does not cover: the kernel's own SIGKILLs count as outside kills (the OOM killer, when
the machine runs out of memory; a hard `RLIMIT_CPU` the code lowered itself); another signal from
outside (SIGTERM, SIGSEGV) cannot be told from one the code sent itself and stays a result; with
isolation `none` the code can SIGKILL itself and kill the worker, so there a SIGKILL stays a result
and only the worker's death raises.

What it does not guarantee: protection against kernel exploits (it is not a VM: use `docker` or
`e2b` for a stronger boundary); CPU seconds are a soft limit code can raise (the wall clock is
not); sessions of one backend share the zygote's /proc view.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
import warnings
import weakref
from dataclasses import asdict
from pathlib import Path
from typing import Any

from spo_agents.errors import ConfigError, SandboxError, did_you_mean

from ._local_zygote import Exit, Zygote, ZygoteConfig, bwrap_works, python_default
from .base import SandboxBackend, SandboxLimits, SandboxResult, SandboxSession, merge_limits

logger = logging.getLogger(__name__)

ISOLATION_LEVELS = ("auto", "bubblewrap", "unshare", "none")
_READ_CHUNK = 1 << 18
_SIGKILL_STATUS = 128 + 9
_SIGXCPU_STATUS = 128 + 24
_CREDENTIALS_SPACE = socket.CMSG_SPACE(struct.calcsize("3i"))  # struct ucred: pid, uid, gid


class _Capture:
    """Keeps the head and the tail of a byte stream, at most `limit` bytes in all."""

    def __init__(self, limit: int) -> None:
        self.limit = max(int(limit), 0)
        self.reset()

    def reset(self) -> None:
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        half = self.limit // 2
        room = self.limit - half
        if len(self.head) < half:
            take = half - len(self.head)
            self.head += data[:take]
            data = data[take:]
        if data:
            self.tail += data
            if len(self.tail) > room:
                del self.tail[: len(self.tail) - room]

    def take(self) -> tuple[str, bool]:
        kept = len(self.head) + len(self.tail)
        truncated = self.total > kept
        if truncated:
            cut = self.total - kept
            text = (
                self.head.decode("utf-8", "replace")
                + f"\n... [{cut} bytes truncated] ...\n"
                + self.tail.decode("utf-8", "replace")
            )
        else:
            text = (bytes(self.head) + bytes(self.tail)).decode("utf-8", "replace")
        self.reset()
        return text, truncated


class _Runner:
    """One forked session process tree and the host ends of its channels.

    `pid` and `pgid` are the zygote's view of it (its pid namespace); `generation` is the start of
    the worker that forked it (`Zygote.generation`); `host_pid` is the session process as this
    process sees it."""

    def __init__(
        self, pid: int, pgid: int, generation: int, ctrl: socket.socket, out_fd: int, err_fd: int, limit: int
    ) -> None:
        self.pid, self.pgid, self.generation = pid, pgid, generation
        self.host_pid: int | None = None
        self.ctrl = ctrl
        self.fds = {"stdout": out_fd, "stderr": err_fd}
        self.captures = {"stdout": _Capture(limit), "stderr": _Capture(limit)}
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.workdir: str | None = None  # a host temp dir (isolation `none` only), removed on kill
        self.cgroup: Path | None = None  # its pids cgroup (root only, see `_PidsCap`), removed on kill

    def on_readable(self, name: str) -> None:
        fd = self.fds[name]
        try:
            data = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            assert self.loop is not None
            self.loop.remove_reader(fd)
            return
        self.captures[name].feed(data)

    def drain(self) -> None:
        """Read what is already in the pipes (bounded, in case something keeps writing)."""
        for name, fd in self.fds.items():
            for _ in range(64):
                try:
                    data = os.read(fd, _READ_CHUNK)
                except (BlockingIOError, OSError):
                    break
                if not data:
                    break
                self.captures[name].feed(data)

    async def send(self, obj: dict[str, Any]) -> None:
        assert self.writer is not None
        data = json.dumps(obj).encode()
        self.writer.write(struct.pack(">I", len(data)) + data)
        await self.writer.drain()

    async def recv(self) -> dict[str, Any] | None:
        assert self.reader is not None
        try:
            head = await self.reader.readexactly(4)
            (n,) = struct.unpack(">I", head)
            return json.loads(await self.reader.readexactly(n))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    def close(self) -> None:
        if self.loop is not None:
            for fd in self.fds.values():
                try:
                    self.loop.remove_reader(fd)
                except (ValueError, RuntimeError):
                    pass
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        if self.writer is not None:
            self.writer.close()
        else:
            self.ctrl.close()


class LocalSession(SandboxSession):
    """One episode's interpreter in the `local` backend (see the module docstring)."""

    def __init__(self, backend: LocalBackend, stateless: bool, limits: SandboxLimits) -> None:
        self._backend = backend
        self.stateless = stateless
        self.limits = limits
        self._runner: _Runner | None = None
        self._next: asyncio.Task[_Runner] | None = None  # stateless: the fork for the next call
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

    async def _spawn(self) -> _Runner:
        loop = asyncio.get_running_loop()
        # Namespaced isolation mounts a private tmpfs inside the session; without namespaces the
        # work dir is a host temp dir of the session's own, removed when the session ends.
        workdir = tempfile.mkdtemp(prefix="spo-sandbox-") if self._backend.isolation == "none" else None
        host, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # The runner's first message then carries its sender's pid as this process sees it (see
        # `_read_hello`): that is how the session's host pid is known, whatever its namespaces.
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
        runner = _Runner(pid, pgid, generation, host, out_r, err_r, self.limits.max_output_bytes)
        runner.loop = loop
        runner.workdir = workdir
        for name, fd in runner.fds.items():
            os.set_blocking(fd, False)
            loop.add_reader(fd, runner.on_readable, name)
        try:
            hello, host_pid = await _read_hello(host, 60)
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

    async def _kill(self, runner: _Runner, settle: bool = False) -> Exit | None:
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

    async def _current(self) -> _Runner:
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

    def _killed_from_outside(self, runner: _Runner, ended: Exit | None) -> str | None:
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

    def _collect(self, runner: _Runner, result: SandboxResult) -> None:
        result.stdout, t1 = runner.captures["stdout"].take()
        result.stderr, t2 = runner.captures["stderr"].take()
        result.output_truncated = t1 or t2

    def _abandon(self, runner: _Runner) -> None:
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


# --------------------------------------------------------------------------------------------
# A process cap that holds for root
# --------------------------------------------------------------------------------------------
_PIDS_V1 = Path("/sys/fs/cgroup/pids")


class _PidsCap:
    """Per-session pids cgroups (cgroup v1 `pids` controller), for a trainer running as root.

    The kernel exempts host root from RLIMIT_NPROC, and the sessions' uid maps back to host root,
    so `max_processes` alone does not hold there. When this process is root and the v1 `pids`
    controller is writable, each runner is moved into a cgroup of its own with `pids.max` =
    `max_processes` + 1 (itself), before any user code runs; the processes and threads the code
    starts inherit it. The runner is named by the pid the kernel stamped on its first message
    (`_read_hello`), never looked up by its pid inside the namespaces, which other processes (the
    zygote) share. Elsewhere (not root, or no such controller) `available` is False and
    RLIMIT_NPROC is the cap. A session's group is removed as the session ends (once its killed
    tree has left it); the groups live under one directory per trainer process, removed at exit
    (and, for a process that was killed, by the next trainer that starts)."""

    def __init__(self) -> None:
        self.root = _pids_root()

    @property
    def available(self) -> bool:
        return self.root is not None

    def apply(self, host_pid: int, max_processes: int) -> Path | None:
        """Move `host_pid` into a new cgroup capped at `max_processes` + 1 tasks; its path."""
        if self.root is None:
            return None
        group = self.root / f"s{next(_GROUP_IDS)}"
        try:
            group.mkdir()
            (group / "pids.max").write_text(str(int(max_processes) + 1))
            (group / "cgroup.procs").write_text(str(host_pid))
        except OSError as e:
            _rmdir_retrying(group)
            raise SandboxError(f"cannot cap the session's processes with the pids cgroup `{group}`: {e}") from e
        return group


_PIDS_ROOT: Path | None = None
_PIDS_LOCK = threading.Lock()
_PIDS_PREFIX = "spo-agents-sandbox-"
_GROUP_IDS = itertools.count(1)  # session groups under this process's root


def _pids_root() -> Path | None:
    """This process's directory under the v1 pids controller (created once); None if unusable."""
    global _PIDS_ROOT
    if os.geteuid() != 0 or not (_PIDS_V1 / "cgroup.procs").is_file():
        return None
    with _PIDS_LOCK:
        if _PIDS_ROOT is None:
            for old in _PIDS_V1.glob(_PIDS_PREFIX + "*"):  # left by trainers that were killed
                pid = old.name[len(_PIDS_PREFIX) :]
                if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                    _remove_tree(old)
            root = _PIDS_V1 / f"{_PIDS_PREFIX}{os.getpid()}"
            try:
                root.mkdir(exist_ok=True)
            except OSError:
                return None
            _PIDS_ROOT = root
            atexit.register(_remove_tree, root)
        return _PIDS_ROOT


def _rmdir_retrying(group: Path, tries: int = 50) -> bool:
    """Remove an empty cgroup; a killed tree may take a moment to leave it. Whether it is gone."""
    for i in range(tries):
        try:
            group.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError:
            if i + 1 < tries:
                time.sleep(0.01)
    return False


def _remove_tree(root: Path) -> None:
    for group in list(root.glob("*")):
        if group.is_dir():
            _rmdir_retrying(group)
    _rmdir_retrying(root, tries=5)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _read_hello(sock: socket.socket, timeout: float) -> tuple[dict[str, Any] | None, int | None]:
    """The runner's first frame, and the pid of the process that sent it as this process sees it.

    With SO_PASSCRED on the receiving socket, the kernel stamps every message with its sender's
    credentials and translates the pid into the receiver's pid namespace. The first frame is sent
    by the runner itself before any user code exists, so this pid is the session's host pid,
    however deeply its pid namespaces nest. (None, pid) when it hung up or timed out first."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    fd = sock.fileno()
    buf = bytearray()
    pid = None
    deadline = loop.time() + timeout
    while True:
        want = 4 - len(buf) if len(buf) < 4 else 4 + struct.unpack(">I", buf[:4])[0] - len(buf)
        if len(buf) >= 4 and want == 0:
            return json.loads(bytes(buf[4:])), pid
        try:
            data, ancdata, _, _ = sock.recvmsg(want, _CREDENTIALS_SPACE)
        except BlockingIOError:
            readable = loop.create_future()
            loop.add_reader(fd, _wake, readable)
            try:
                await asyncio.wait_for(readable, max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                return None, pid
            finally:
                loop.remove_reader(fd)
            continue
        except OSError:
            return None, pid
        if not data:
            return None, pid
        for level, kind, value in ancdata:
            if pid is None and level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", value[: struct.calcsize("3i")])[0]
        buf += data


class LocalBackend(SandboxBackend):
    """Python sessions forked from a pre-warmed worker, isolated with bubblewrap / namespaces.

    Options (`SandboxConfig.options`): `python` (interpreter path; default: this one),
    `isolation` (`auto` | `bubblewrap` | `unshare` | `none`), `stateless` (default for sessions),
    `preload` (modules imported once in the worker; default numpy, sympy), `network_per_session`
    (a network namespace per session, so sessions cannot reach each other over loopback either;
    default false: the worker's network namespace, shared by its sessions, has loopback only),
    `env` (extra variables for the code), `ro_binds` (extra host paths visible read-only under
    bubblewrap), `echo_last_expression` (print the value of a final expression statement, as a
    REPL does; default false: code runs exactly as `python -c` would), and any `SandboxLimits` field
    (`timeout_s`, `cpu_s`, `memory_mb`, `max_processes`, `max_open_files`, `max_file_size_mb`,
    `max_output_bytes`, `disk_mb`).
    """

    name = "local"

    def __init__(
        self,
        *,
        python: str | None = None,
        isolation: str = "auto",
        stateless: bool = False,
        limits: SandboxLimits | None = None,
        preload: tuple[str, ...] | list[str] = ("numpy", "sympy"),
        network_per_session: bool = False,
        env: dict[str, str] | None = None,
        ro_binds: tuple[str, ...] | list[str] = (),
        echo_last_expression: bool = False,
        **limit_fields: Any,
    ) -> None:
        if isolation not in ISOLATION_LEVELS:
            raise ConfigError(
                f"`isolation` of the `local` sandbox must be one of {', '.join(ISOLATION_LEVELS)}; "
                f"got `{isolation}`.{did_you_mean(isolation, ISOLATION_LEVELS)}"
            )
        options = ("python", "isolation", "stateless", "preload", "network_per_session", "env", "ro_binds")
        self.limits = merge_limits("local", limits, limit_fields, (*options, "echo_last_expression"))
        self.stateless = stateless
        self.echo_last_expression = bool(echo_last_expression)
        self.python = python or python_default()
        self._requested = isolation
        self._isolation = self._resolve(isolation)
        self._cfg = ZygoteConfig(
            python=self.python,
            isolation=self._isolation,
            preload=tuple(preload),
            new_net=network_per_session,
            env=dict(env or {}),
            extra_ro_binds=tuple(ro_binds),
        )
        self._zygote: Zygote | None = None
        self._sessions: weakref.WeakSet[LocalSession] = weakref.WeakSet()
        # runners of sessions never closed: pid, pgid, generation, work dir, pids cgroup
        self._orphans: list[tuple[int, int, int, str | None, Path | None]] = []
        self._pids_cap = _PidsCap()
        self._stale_cgroups: list[Path] = []  # groups of ended sessions not yet empty, retried at each start
        self._stale_lock = threading.Lock()
        self._releasing: set[Path] = set()  # groups of ended sessions being removed as their trees leave
        self._release_tasks: set[asyncio.Task[None]] = set()
        _LIVE.add(self)

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """The backend always runs; the reason names the isolation `auto` would pick."""
        ok, why = bwrap_works()
        if ok:
            return True, f"isolation `bubblewrap` ({why})"
        return True, f"isolation `unshare` at best: {why}"

    @staticmethod
    def _resolve(isolation: str) -> str:
        if isolation == "none":
            warnings.warn(
                "the `local` sandbox runs with isolation `none`: the code runs as this user with only "
                "rlimits; use it only for trusted code",
                RuntimeWarning,
                stacklevel=3,
            )
            return "none"
        if isolation == "auto":
            ok, why = bwrap_works()
            if ok:
                return "bubblewrap"
            logger.warning("local sandbox: %s; falling back to `unshare` isolation (namespaces + rlimits)", why)
            return "unshare"
        if isolation == "bubblewrap":
            ok, why = bwrap_works()
            if not ok:
                raise SandboxError(f"isolation `bubblewrap` was requested but {why}. Install it or pick `unshare`.")
        return isolation

    @property
    def isolation(self) -> str:
        return self._isolation

    def _zygote_for_spawn(self) -> Zygote:
        if self._zygote is None:
            self._zygote = Zygote(self._cfg)
            _register_exit_hook()
        return self._zygote

    def _spawn_runner(self, limits: dict[str, Any], fds: list[int]) -> tuple[int, int, int]:
        """Fork a runner (blocking; called in an executor thread), after reaping orphans."""
        zygote = self._zygote_for_spawn()
        while self._orphans:
            pid, pgid, generation, workdir, group = self._orphans.pop()
            self._zygote_kill(pid, pgid, generation)
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            if group is not None and not _rmdir_retrying(group):
                self._stale(group)
        self._sweep_cgroups()
        return zygote.spawn(limits, fds)

    def _cap_processes(self, host_pid: int, max_processes: int | None) -> Path | None:
        """Put a new runner (its pid as this process sees it) into its own pids cgroup when
        running as root (`_PidsCap`)."""
        if max_processes is None or not self._pids_cap.available:
            return None
        return self._pids_cap.apply(host_pid, max_processes)

    async def _release_group(self, group: Path, patience_s: float = 30.0) -> None:
        """Remove an ended session's pids cgroup as soon as its killed tree has left it (usually
        milliseconds; seconds for a fork bomb on a busy machine). One still busy after
        `patience_s` is retried at each session start and by `aclose`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience_s
        pause = 0.005
        with self._stale_lock:
            self._releasing.add(group)
        try:
            while not _rmdir_retrying(group, tries=1):
                if loop.time() > deadline:
                    self._stale(group)
                    return
                await asyncio.sleep(pause)
                pause = min(pause * 1.5, 0.1)
        except asyncio.CancelledError:  # its event loop is shutting down
            self._stale(group)
            raise
        finally:
            with self._stale_lock:
                self._releasing.discard(group)

    def _release_later(self, group: Path) -> None:
        task = asyncio.get_running_loop().create_task(self._release_group(group))
        self._release_tasks.add(task)
        task.add_done_callback(self._release_tasks.discard)

    async def _release_all(self, patience_s: float = 10.0) -> None:
        """Remove every group of an ended session, waiting for their trees to leave them (at most
        `patience_s`; what is left then is removed at exit)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience_s
        while True:
            with self._stale_lock:
                pending = set(self._stale_cgroups) | self._releasing
            if not [g for g in pending if not _rmdir_retrying(g, tries=1)] or loop.time() > deadline:
                self._sweep_cgroups()
                return
            await asyncio.sleep(0.02)

    def _stale(self, group: Path) -> None:
        with self._stale_lock:
            self._stale_cgroups.append(group)

    def _sweep_cgroups(self) -> None:
        """Remove the groups of ended sessions whose tasks are gone (no waiting)."""
        with self._stale_lock:
            self._stale_cgroups = [g for g in self._stale_cgroups if not _rmdir_retrying(g, tries=1)]

    def _holds(self, generation: int) -> bool:
        """Whether the worker that forked runners of `generation` is still running."""
        z = self._zygote
        return z is not None and z.current(generation)

    def _zygote_kill(self, pid: int, pgid: int, generation: int) -> None:
        """Kill a runner without waiting for its teardown (nobody needs the status of a kill)."""
        if self._zygote is None:
            return
        try:
            self._zygote.kill(pid, pgid, generation, wait=False)
        except SandboxError:
            pass

    def _zygote_wait(self, pid: int, generation: int) -> Exit | None:
        if self._zygote is None:
            return None
        try:
            return self._zygote.wait(pid, generation, block=False)
        except SandboxError:
            return None

    def start(self) -> None:
        """Start the pre-warmed worker now (blocking; otherwise the first session does it)."""
        z = self._zygote_for_spawn()
        if not z.alive:
            z.start()

    @property
    def worker_pid(self) -> int | None:
        """Host pid of the worker (bubblewrap's, under that isolation); None when not running."""
        z = self._zygote
        return z.pid if z is not None and z.alive else None

    async def open_session(self, *, stateless: bool | None = None, limits: SandboxLimits | None = None) -> LocalSession:
        session = LocalSession(self, self.stateless if stateless is None else stateless, limits or self.limits)
        await session.start()
        self._sessions.add(session)
        return session

    async def aclose(self) -> None:
        for s in list(self._sessions):
            try:
                await s.close()
            except RuntimeError:
                pass  # a session bound to another (closed) loop: the worker's death ends it
        if self._zygote is not None:
            self._zygote.stop()
            self._zygote = None
        await self._release_all()

    def close(self) -> None:
        if self._zygote is not None:
            self._zygote.stop()
            self._zygote = None
        self._sweep_cgroups()


_LIVE: weakref.WeakSet[LocalBackend] = weakref.WeakSet()
_HOOKED = False


def _stop_all() -> None:
    for b in list(_LIVE):
        b.close()


def _register_exit_hook() -> None:
    """Stop every worker at interpreter exit (bubblewrap's --die-with-parent covers crashes)."""
    global _HOOKED
    if not _HOOKED:
        _HOOKED = True
        atexit.register(_stop_all)
