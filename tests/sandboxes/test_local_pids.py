"""The `local` backend's per-session pids cgroups (root only, cgroup v1 `pids` controller).

Checked from outside, through /proc and the cgroup file system: a session's processes are the
processes in its pid namespace (which the session's own code names), and its group must hold
exactly those, never the worker or its zygote; and the groups go away as their sessions end.
"""

from __future__ import annotations

import asyncio
import gc
import os
from pathlib import Path

import psutil
import pytest

from spo_agents.sandboxes import SandboxLimits
from spo_agents.sandboxes.local import LocalBackend, pids_root

PIDS_V1 = Path("/sys/fs/cgroup/pids")


def _why_not_applicable() -> str | None:
    if os.geteuid() != 0:
        return f"not root (euid {os.geteuid()}): sessions are capped by RLIMIT_NPROC and no pids cgroup is used"
    if not (PIDS_V1 / "cgroup.procs").is_file():
        return f"no cgroup v1 `pids` controller at {PIDS_V1}: the per-session cap cannot apply here"
    if pids_root() is None:
        return f"the cgroup v1 `pids` controller at {PIDS_V1} is not writable here"
    return None


_WHY = _why_not_applicable()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"per-session pids cgroups do not apply: {_WHY}")

CAP = 10
NS_AND_CHILDREN = (
    "import os, time\n"
    "for _ in range(3):\n"
    "    if os.fork() == 0:\n"
    "        time.sleep(60)\n"
    "        os._exit(0)\n"
    "print(os.readlink('/proc/self/ns/pid'))"
)


def _pids_group(pid: int) -> str | None:
    """The pids cgroup of a host pid, relative to the controller's root."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if "pids" in controllers.split(","):
                    return path
    except OSError:
        return None
    return None


def _in_namespace(ns: str) -> set[int]:
    """Host pids of every live process whose pid namespace is `ns` (e.g. `pid:[4026532]`)."""
    found = set()
    for p in psutil.pids():
        try:
            if os.readlink(f"/proc/{p}/ns/pid") == ns and psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                found.add(p)
        except (OSError, psutil.NoSuchProcess):
            pass
    return found


def _ours() -> set[str]:
    root = pids_root()
    assert root is not None
    return {g.name for g in root.iterdir() if g.is_dir()}


async def _kill_worker(backend: LocalBackend) -> None:
    worker = psutil.Process(backend.worker_pid)
    tree = [worker, *worker.children(recursive=True)]
    worker.kill()
    await asyncio.to_thread(psutil.wait_procs, tree, 10)


@pytest.mark.parametrize("isolation", ["auto", "unshare"])
@pytest.mark.parametrize("start", ["fresh", "restarted"])
async def test_each_group_holds_its_session_tree_and_never_the_worker(start, isolation):
    """The first four sessions of a worker, opened before any runs code (as a batch of rollouts)."""
    backend = LocalBackend(preload=[], isolation=isolation)
    root = pids_root()
    try:
        if start == "restarted":
            async with await backend.open_session() as s:
                await s.run("pass")
            await _kill_worker(backend)
        sessions = [await backend.open_session(limits=SandboxLimits(max_processes=CAP)) for _ in range(4)]
        groups = []
        for i, s in enumerate(sessions):
            r = await s.run(NS_AND_CHILDREN)
            assert r.ok, r
            tree = _in_namespace(r.stdout.strip())
            assert len(tree) == 4, f"session {i + 1}: expected its runner and 3 children in {r.stdout}, got {tree}"
            names = {_pids_group(p) for p in tree}
            assert len(names) == 1, f"session {i + 1}: its processes are spread over the groups {names}"
            (name,) = names
            group = PIDS_V1 / name.lstrip("/")
            assert group.parent == root, f"session {i + 1} runs in {group}, not in a group of its own under {root}"
            procs = {int(p) for p in (group / "cgroup.procs").read_text().split()}
            assert procs == tree, f"session {i + 1}: its group holds {procs}, its pid namespace {tree}"
            assert (group / "pids.max").read_text().strip() == str(CAP + 1)
            groups.append(group)
        assert len(set(groups)) == len(sessions)
        worker = psutil.Process(backend.worker_pid)
        sessions_pids = set().union(*[{int(p) for p in (g / "cgroup.procs").read_text().split()} for g in groups])
        outside = [p.pid for p in [worker, *worker.children(recursive=True)] if p.pid not in sessions_pids]
        assert len(outside) >= 1
        for pid in outside:  # bubblewrap, the worker's main process and the zygote
            where = str(_pids_group(pid))
            assert not where.startswith(f"/{root.name}"), f"worker process {pid} is in the session group {where}"
        for s in sessions:
            await s.close()
    finally:
        await backend.aclose()


async def test_groups_are_removed_as_sessions_end():
    """Normal, timed-out, crashed, forking, stateless, cancelled and dropped sessions: once they
    have ended, none of their groups is left, with the backend still open."""
    backend = LocalBackend(preload=[])
    before = _ours()
    lim = SandboxLimits(max_processes=CAP, timeout_s=10)
    try:
        async with await backend.open_session(limits=lim) as s:
            await s.run("x = 1")
        async with await backend.open_session(limits=lim) as s:
            r = await s.run("while True:\n    pass", timeout=0.5)
            assert r.timed_out
            r = await s.run("import os\nos._exit(3)")
            assert r.exit_status == 3 and r.session_restarted
        async with await backend.open_session(limits=lim) as s:
            r = await s.run(NS_AND_CHILDREN)
            assert r.ok, r
            r = await s.run(
                "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", timeout=1.0
            )
            assert r.timed_out
            await s.run(NS_AND_CHILDREN)
        async with await backend.open_session(limits=lim, stateless=True) as s:
            for _ in range(3):
                assert (await s.run("print(1)")).ok
        async with await backend.open_session(limits=lim) as s:
            task = asyncio.ensure_future(s.run("import time\ntime.sleep(30)"))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        dropped = await backend.open_session(limits=lim)
        await dropped.run(NS_AND_CHILDREN)
        del dropped
        gc.collect()
        async with await backend.open_session(limits=lim) as s:  # its start reaps the dropped session
            await s.run("pass")
        assert backend.worker_pid is not None
        # A timed-out call's group goes in the background, once its killed tree has left it.
        for _ in range(300):
            left = _ours() - before
            if not left:
                break
            await asyncio.sleep(0.1)
        root = pids_root()
        held = {g: (root / g / "cgroup.procs").read_text().split() for g in left}
        assert not left, f"session groups left 30 s after their sessions ended (group: its processes): {held}"
    finally:
        await backend.aclose()
    assert not _ours() - before
