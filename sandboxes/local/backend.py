"""The `local` backend: Python sessions forked from one pre-warmed worker per backend.

The backend owns the worker (`zygote.py`), hands forks of it to sessions (`session.py`), caps
their processes when running as root (`cgroups.py`) and stops the worker at exit.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import warnings
import weakref
from pathlib import Path
from typing import Any

from spo_agents.errors import ConfigError, SandboxError, did_you_mean
from spo_agents.processes import LiveRegistry

from ..base import SandboxBackend, SandboxLimits, merge_limits
from .cgroups import PidsCap, rmdir_retrying
from .session import LocalSession
from .zygote import Exit, Zygote, ZygoteConfig, bwrap_works, python_default

logger = logging.getLogger(__name__)

ISOLATION_LEVELS = ("auto", "bubblewrap", "unshare", "none")


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
        self._pids_cap = PidsCap()
        self._stale_cgroups: list[Path] = []  # groups of ended sessions not yet empty, retried at each start
        self._stale_lock = threading.Lock()
        self._releasing: set[Path] = set()  # groups of ended sessions being removed as their trees leave
        self._release_tasks: set[asyncio.Task[None]] = set()

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
            _WORKERS.add(self)
        return self._zygote

    def _spawn_runner(self, limits: dict[str, Any], fds: list[int]) -> tuple[int, int, int]:
        """Fork a runner (blocking; called in an executor thread), after reaping orphans."""
        zygote = self._zygote_for_spawn()
        while self._orphans:
            pid, pgid, generation, workdir, group = self._orphans.pop()
            self._zygote_kill(pid, pgid, generation)
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            if group is not None and not rmdir_retrying(group):
                self._stale(group)
        self._sweep_cgroups()
        return zygote.spawn(limits, fds)

    def _cap_processes(self, host_pid: int, max_processes: int | None) -> Path | None:
        """Put a new runner (its pid as this process sees it) into its own pids cgroup when
        running as root (`PidsCap`)."""
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
            while not rmdir_retrying(group, tries=1):
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
            if not [g for g in pending if not rmdir_retrying(g, tries=1)] or loop.time() > deadline:
                self._sweep_cgroups()
                return
            await asyncio.sleep(0.02)

    def _stale(self, group: Path) -> None:
        with self._stale_lock:
            self._stale_cgroups.append(group)

    def _sweep_cgroups(self) -> None:
        """Remove the groups of ended sessions whose tasks are gone (no waiting)."""
        with self._stale_lock:
            self._stale_cgroups = [g for g in self._stale_cgroups if not rmdir_retrying(g, tries=1)]

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
        _WORKERS.discard(self)
        await self._release_all()

    def close(self) -> None:
        if self._zygote is not None:
            self._zygote.stop()
            self._zygote = None
        _WORKERS.discard(self)
        self._sweep_cgroups()


# Workers still running at interpreter exit are stopped then (bubblewrap's --die-with-parent
# covers a crash of this process).
_WORKERS: LiveRegistry[LocalBackend] = LiveRegistry("local sandbox worker", LocalBackend.close)
