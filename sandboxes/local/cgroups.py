"""A process cap that holds for root: one cgroup v1 `pids` group per session.

The kernel exempts host root from RLIMIT_NPROC, so a trainer running as root caps each session's
processes with a `pids` cgroup instead (sandboxes/README.md, `local`).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path

from spo_agents.errors import SandboxError
from spo_agents.processes import LiveRegistry

_PIDS_V1 = Path("/sys/fs/cgroup/pids")


class PidsCap:
    """Per-session pids cgroups (cgroup v1 `pids` controller), for a trainer running as root.

    The kernel exempts host root from RLIMIT_NPROC, and the sessions' uid maps back to host root,
    so `max_processes` alone does not hold there. When this process is root and the v1 `pids`
    controller is writable, each runner is moved into a cgroup of its own with `pids.max` =
    `max_processes` + 1 (itself), before any user code runs; the processes and threads the code
    starts inherit it. The runner is named by the pid the kernel stamped on its first message
    (`read_hello`), never looked up by its pid inside the namespaces, which other processes (the
    zygote) share. Elsewhere (not root, or no such controller) `available` is False and
    RLIMIT_NPROC is the cap. A session's group is removed as the session ends (once its killed
    tree has left it); the groups live under one directory per trainer process, removed at exit
    (and, for a process that was killed, by the next trainer that starts)."""

    def __init__(self) -> None:
        self.root = pids_root()

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
            rmdir_retrying(group)
            raise SandboxError(f"cannot cap the session's processes with the pids cgroup `{group}`: {e}") from e
        return group


_PIDS_ROOT: Path | None = None
_PIDS_LOCK = threading.Lock()
_PIDS_PREFIX = "spo-agents-sandbox-"
_GROUP_IDS = itertools.count(1)  # session groups under this process's root


def pids_root() -> Path | None:
    """This process's directory under the v1 pids controller (created once); None if unusable."""
    global _PIDS_ROOT
    if os.geteuid() != 0 or not (_PIDS_V1 / "cgroup.procs").is_file():
        return None
    with _PIDS_LOCK:
        if _PIDS_ROOT is None:
            for old in _PIDS_V1.glob(_PIDS_PREFIX + "*"):  # left by trainers that were killed
                pid = old.name[len(_PIDS_PREFIX) :]
                if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                    remove_tree(old)
            root = _PIDS_V1 / f"{_PIDS_PREFIX}{os.getpid()}"
            try:
                root.mkdir(exist_ok=True)
            except OSError:
                return None
            _PIDS_ROOT = root
            _ROOTS.add(root)
        return _PIDS_ROOT


def rmdir_retrying(group: Path, tries: int = 50) -> bool:
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


def remove_tree(root: Path) -> None:
    """Remove a directory of session groups and the groups in it (those already empty)."""
    for group in list(root.glob("*")):
        if group.is_dir():
            rmdir_retrying(group)
    rmdir_retrying(root, tries=5)


_ROOTS: LiveRegistry[Path] = LiveRegistry("sandbox pids cgroup", remove_tree, weak=False)  # removed at exit
