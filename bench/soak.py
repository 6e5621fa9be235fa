"""Adversarial soak of the `local` sandbox: many episodes with hostile code mixed in, then leak checks.

Episodes run in rounds of `--concurrency` sessions opened together (as a batch of rollouts is).
Each episode is one session with 1 to 4 calls drawn from a mix of ordinary code, code that fails
(exceptions, `sys.exit`, `os._exit`, signals to itself) and hostile code: infinite loops, fork
bombs (an exponential one, and a counting one that says how many processes it got), memory bombs,
huge output, background processes that try to outlive the session, attempts to kill the parent,
the zygote and every visible process, writes outside the work dir, filling the disk. Some rounds
start just after the worker was (re)started: stopped cleanly, or killed from outside between
rounds. Some calls are killed from outside on purpose, the session's own process or the whole
worker, and must come back as `SandboxError` (an infrastructure failure), never as a result.

Checked during the run (each failure is a containment violation; the goal is 0):
- a counting fork bomb got more than `max_processes` processes;
- (as root with cgroup v1 `pids`) a session's process is not in a pids group of ours, or a worker
  process (bubblewrap, the worker's main process, the zygote: the session's ancestors) is in one;
- a process of an ended session is still alive;
- a file the code tried to write outside its work dir exists on the host;
- the worker was restarted by a call that did not kill it on purpose;
- a kill from outside came back as a result, or a `SandboxError` came without one;
- a session group is left once a round's sessions have all ended (the backend still open): an
  empty one at all, or one still holding processes 30 s later.

Afterwards (backend closed): processes left under this one, pids cgroups of ours, temp files the
backend or the code could have left on the host, file descriptors of this process, and its RSS at
the start and the end.

    .venv/bin/python bench/soak.py                # 1,200 calls (the recorded run)
    .venv/bin/python bench/soak.py --quick        # about 60 calls
    .venv/bin/python bench/soak.py --calls 2000 --concurrency 8 --json /tmp/soak.json

Results, with the machine they were measured on, go in bench/RESULTS.md (`## Sandbox soak`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from spo_agents.errors import SandboxError
from spo_agents.sandboxes import SandboxLimits
from spo_agents.sandboxes.local import LocalBackend, pids_root

CAP = 64  # max_processes, the default
MARK = f"spo-soak-{os.getpid()}"
HOST_TARGETS = [  # files hostile code tries to create on the host
    f"/tmp/{MARK}-tmp",
    f"/etc/{MARK}",
    f"/usr/{MARK}",
    f"/{MARK}",
    f"/root/{MARK}",
    str(Path(__file__).resolve().parent / MARK),
    str(Path(sys.prefix) / MARK),
]


@dataclass
class Case:
    """One kind of call: its code, its wall clock, and what it checks afterwards."""

    name: str
    code: str
    timeout: float = 5.0
    weight: float = 1.0


COUNTING_BOMB = (
    f"import os, time\nn = 0\nfor _ in range({3 * CAP}):\n    try:\n        if os.fork() == 0:\n"
    "            time.sleep(60)\n            os._exit(0)\n        n += 1\n    except OSError:\n        break\n"
    "print('made', n)"
)
CASES = [
    # ordinary code
    Case("arith", "print(sum(i * i for i in range(1000)))", weight=6),
    Case("numpy", "import numpy as np\nprint(int(np.arange(100).reshape(10, 10).trace()))", weight=3),
    Case("sympy", "import sympy as sp\nt = sp.symbols('t')\nprint(sp.factor(t**2 - 1))", weight=2),
    Case("state", "print('x=', x)", weight=4),  # the variable of the episode's first call
    Case("cpu", "print(sum(range(2 * 10**6)))", weight=2),
    # code that fails
    Case("exception", "raise ValueError('no')", weight=2),
    Case("sys_exit", "import sys\nsys.exit(3)"),
    Case("os_exit", "import os\nos._exit(137)"),
    Case("sigterm_self", "import os, signal, time\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(5)"),
    # hostile code
    Case("infinite_loop", "while True:\n    pass", timeout=0.5, weight=2),
    Case(
        "fork_bomb",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        timeout=1.0,
        weight=2,
    ),
    Case("counting_bomb", COUNTING_BOMB, timeout=15.0, weight=2),
    Case("memory_at_once", "blob = bytearray(8 * 1024**3)\nprint('allocated')"),
    Case("memory_growing", "b = []\nwhile True:\n    b.append(bytearray(32 * 2**20))", timeout=10.0),
    Case(
        "huge_output",
        "import sys\nblock = 'y' * 2**20\nfor _ in range(20):\n    sys.stdout.write(block)\nprint('END')",
        timeout=10.0,
    ),
    Case(
        "background",
        (
            "import os, subprocess, sys, time\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
            "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(600)\n    os._exit(0)\n"
            "print('spawned')"
        ),
        weight=2,
    ),
    Case(
        "kill_parent",
        (
            "import os, signal\nfor pid in {os.getppid(), 1, -1}:\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
            "    except OSError:\n        pass\n"
            "for p in os.listdir('/proc'):\n    if p.isdigit() and int(p) != os.getpid():\n        try:\n"
            "            os.kill(int(p), signal.SIGKILL)\n        except OSError:\n            pass\n"
            "print('still here')"
        ),
        weight=2,
    ),
    Case(
        "write_outside",
        (
            f"import os\nfor p in {HOST_TARGETS!r}:\n    try:\n        open(p, 'w').write('x')\n"
            "    except OSError:\n        pass\nopen('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())"
        ),
        weight=2,
    ),
    Case(
        "disk_fill",
        (
            "chunk = b'x' * 2**20\ni = 0\ntry:\n    while i < 4096:\n        with open(f'fill{i}', 'wb') as f:\n"
            "            f.write(chunk * 8)\n        i += 1\n"
            "except OSError as e:\n    print('stopped', type(e).__name__)"
        ),
        timeout=10.0,
    ),
]
SLEEP = "import time\ntime.sleep(10)\nprint('woke')"  # the call an outside kill interrupts


@dataclass
class Soak:
    backend: LocalBackend
    rng: random.Random
    outcomes: Counter = field(default_factory=Counter)
    violations: Counter = field(default_factory=Counter)
    details: list = field(default_factory=list)
    calls: int = 0
    episodes: int = 0
    most_made: int = 0  # the most processes a counting fork bomb got
    group_wait_s: float = 0.0  # the longest wait, after a round, for the groups of its sessions to go
    namespaces: set = field(default_factory=set)  # pid namespaces of sessions that have ended
    capped: bool = False

    def violate(self, kind: str, detail: str) -> None:
        self.violations[kind] += 1
        if len(self.details) < 40:
            self.details.append(f"{kind}: {detail}")


# --- host-side inspection ------------------------------------------------------------------------
def _pids_group(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if "pids" in controllers.split(","):
                    return path
    except OSError:
        return None
    return None


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _group_members() -> dict[str, set[int]]:
    root = pids_root()
    out: dict[str, set[int]] = {}
    if root is None:
        return out
    for g in root.iterdir():
        if g.is_dir():
            try:
                out[g.name] = {int(p) for p in (g / "cgroup.procs").read_text().split()}
            except OSError:
                pass
    return out


def _alive_in(namespaces: set[str]) -> list[int]:
    """Live processes under this one in any of `namespaces` (namespace ids are reused once a
    namespace is gone, so only this process's own descendants are considered)."""
    found = []
    for p in _descendants():
        if _ns(p) in namespaces:
            try:
                with open(f"/proc/{p}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        found.append(int(p))
            except OSError:
                pass
    return found


def _describe(pids: list[int]) -> str:
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                st = {k: v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:60].decode(errors="replace")
            out.append(
                f"{pid} {st.get('State')} ppid={st.get('PPid')} nspid={st.get('NSpid')} "
                f"group={_pids_group(pid)} {cmd!r}"
            )
        except OSError:
            out.append(f"{pid} gone")
    return "; ".join(out)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _descendants() -> set[int]:
    me, kids = os.getpid(), set()
    parents = {me}
    changed = True
    table = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            pp = _ppid(int(p))
            if pp is not None:
                table[int(p)] = pp
    while changed:
        changed = False
        for pid, pp in table.items():
            if pp in parents and pid not in parents:
                parents.add(pid)
                kids.add(pid)
                changed = True
    return kids


def _temp_leftovers() -> list[str]:
    tmp = Path(tempfile.gettempdir())
    left = [str(p) for p in tmp.glob("spo-sandbox-*")]
    return left + [p for p in HOST_TARGETS if os.path.exists(p)]


# --- one episode ---------------------------------------------------------------------------------
def _check_groups(soak: Soak, session, where: str) -> None:
    """The session's process is in a group of ours, and no ancestor of it (a worker process) is."""
    if not soak.capped:
        return
    runner = getattr(session, "_runner", None)
    host = getattr(runner, "host_pid", None)
    if host is None:
        return
    root = pids_root()
    group = _pids_group(host)
    if group is None:
        return  # gone meanwhile
    if not group.startswith(f"/{root.name}/"):
        soak.violate("uncapped_session", f"{where}: session process {host} is in the pids group {group!r}")
    members = set().union(set(), *_group_members().values())
    worker = soak.backend.worker_pid
    pid = _ppid(host)
    while pid and pid > 1:
        if pid in members:
            soak.violate("worker_in_session_group", f"{where}: worker process {pid} is in a session group")
        if pid == worker:
            break
        pid = _ppid(pid)


def _worker_identity(backend: LocalBackend) -> tuple:
    return backend.worker_pid, getattr(backend._zygote, "generation", None)


def _session_ns(s) -> str | None:
    """The pid namespace of the session's current process (None when it has none now)."""
    return _ns(getattr(s._runner, "host_pid", None) or -1) if s._runner is not None else None


async def _call(soak: Soak, s, case: Case) -> tuple[str, object]:
    soak.calls += 1
    worker = _worker_identity(soak.backend)
    try:
        r = await s.run(case.code, timeout=case.timeout)
    except SandboxError as e:
        soak.violate("unexpected_sandbox_error", f"{case.name}: {e}")
        soak.outcomes["sandbox_error(unexpected)"] += 1
        return "error", None
    if _worker_identity(soak.backend) != worker:
        soak.violate("worker_restarted_by_code", f"{case.name} restarted the worker")
    kind = (
        "timed_out"
        if r.timed_out
        else "memory_exceeded"
        if r.memory_exceeded
        else "restarted"
        if r.session_restarted
        else "exception"
        if r.exception
        else "exit_status"
        if r.exit_status
        else "ok"
    )
    soak.outcomes[kind] += 1
    if r.output_truncated:
        soak.outcomes["output_truncated"] += 1
    if case.name == "counting_bomb" and "made" in r.stdout:
        made = int(r.stdout.split("made")[-1].split()[0])
        soak.most_made = max(soak.most_made, made)
        if made > CAP:
            soak.violate("process_cap", f"a counting fork bomb made {made} processes (cap {CAP})")
    if case.name == "kill_parent" and "still here" not in r.stdout:
        soak.violate("kill_parent", f"the code did not go on after its kills: {r}")
    if case.name in ("infinite_loop", "fork_bomb") and not r.timed_out:
        soak.violate("timeout", f"{case.name} was not stopped by its timeout: {r}")
    for p in HOST_TARGETS:
        if os.path.exists(p):
            soak.violate("wrote_outside", f"{case.name}: {p} exists on the host")
            os.unlink(p)
    return kind, r


def _pid_one_of(ns: str) -> int | None:
    """The process under this one that is pid 1 of the pid namespace `ns` (a session's own)."""
    for pid in _descendants():
        if _ns(pid) == ns:
            try:
                with open(f"/proc/{pid}/status") as f:
                    if next(line for line in f if line.startswith("NSpid:")).split()[-1] == "1":
                        return pid
            except (OSError, StopIteration):
                pass
    return None


async def _outside_kill(soak: Soak, s, victim: str) -> None:
    """Kill the session's own process from outside while it sleeps; expect SandboxError."""
    probe = await s.run("import os\nprint(os.readlink('/proc/self/ns/pid'))")
    soak.calls += 1
    pid = _pid_one_of(probe.stdout.strip())
    if pid is None:
        soak.violate("outside_kill_setup", f"no process is pid 1 of the session's namespace {probe.stdout!r}")
        return
    soak.calls += 1
    task = asyncio.ensure_future(s.run(SLEEP, timeout=20))
    await asyncio.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    try:
        r = await task
    except SandboxError:
        soak.outcomes[f"sandbox_error(killed {victim})"] += 1
        after = await s.run("print('back')")
        if not after.session_restarted or after.stdout != "back\n":
            soak.violate("after_outside_kill", f"the call after an outside kill: {after}")
        soak.calls += 1
        soak.outcomes["ok" if after.ok else "other"] += 1
        return
    soak.violate("outside_kill_as_result", f"a {victim} killed from outside came back as a result: {r}")


async def _episode(soak: Soak, s, n_calls: int, kill: str | None) -> None:
    soak.episodes += 1
    ident = soak.rng.randrange(10**6)
    r = await s.run(f"x = {ident}\nprint(x)")
    soak.calls += 1
    soak.outcomes["ok" if r.stdout == f"{ident}\n" else "other"] += 1
    _check_groups(soak, s, "episode start")
    namespaces = {_session_ns(s)}
    lost = False
    if kill == "session":
        await _outside_kill(soak, s, "session")
        lost = True
    weights = [c.weight for c in CASES]
    for _ in range(n_calls - 1):
        case = soak.rng.choices(CASES, weights)[0]
        _, r = await _call(soak, s, case)
        namespaces.add(_session_ns(s))
        if case.name == "counting_bomb":
            _check_groups(soak, s, "counting bomb")
        if r is not None and r.session_restarted:
            lost = True
        if case.name == "state" and r is not None:
            expect = f"x= {ident}\n"
            if not lost and r.stdout != expect:
                soak.violate("state_lost", f"expected {expect!r}, got {r}")
    soak.namespaces |= {n for n in namespaces if n}


async def _round(soak: Soak, size: int, lengths: list[int], kill: str | None, limits: SandboxLimits) -> None:
    sessions = await asyncio.gather(*[soak.backend.open_session(limits=limits) for _ in range(size)])
    try:
        if kill == "worker":
            tasks = [asyncio.ensure_future(s.run(SLEEP, timeout=20)) for s in sessions]
            await asyncio.sleep(0.5)
            os.kill(soak.backend.worker_pid, signal.SIGKILL)
            for t in tasks:
                soak.calls += 1
                try:
                    r = await t
                    soak.violate("outside_kill_as_result", f"the worker killed from outside came back as {r}")
                except SandboxError:
                    soak.outcomes["sandbox_error(killed worker)"] += 1
            kill = None
        victim = soak.rng.randrange(size) if kill == "session" else -1
        await asyncio.gather(
            *[
                _episode(soak, s, n, "session" if i == victim else None)
                for i, (s, n) in enumerate(zip(sessions, lengths))
            ]
        )
    finally:
        for s in sessions:
            await s.close()
    if soak.capped:
        # A timed-out call's group is removed in the background once its killed tree has left it
        # (seconds for a fork bomb on a busy machine): wait for that, then name what is left.
        t0 = time.perf_counter()
        left = _group_members()
        while left and time.perf_counter() - t0 < 30:
            await asyncio.sleep(0.05)
            left = _group_members()
        soak.group_wait_s = max(soak.group_wait_s, time.perf_counter() - t0)
        empty = sorted(g for g, members in left.items() if not members)
        if empty:
            soak.violate("empty_cgroup_left", f"empty groups left 30 s after a round's sessions ended: {empty}")
        busy = {g: members for g, members in left.items() if members}
        if busy:
            soak.violate(
                "busy_cgroup_left",
                f"groups still holding processes 30 s after their sessions ended: "
                f"{sorted(busy)}: {_describe(sorted(set().union(*busy.values()))[:3])}",
            )
    alive = _alive_in(soak.namespaces)
    t0 = time.perf_counter()
    while alive and time.perf_counter() - t0 < 30:  # a killed tree takes a moment to go
        await asyncio.sleep(0.05)
        alive = _alive_in(soak.namespaces)
    if alive:
        soak.violate(
            "process_outlived_session",
            f"{len(alive)} processes of ended sessions still run 30 s later: {_describe(alive[:3])}",
        )
        for p in alive:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
    soak.namespaces.clear()


async def _kill_worker_idle(backend: LocalBackend) -> None:
    pid = backend.worker_pid
    if pid is None:
        return
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        if backend.worker_pid is None:
            return
        await asyncio.sleep(0.01)


async def soak(calls: int, concurrency: int, seed: int, verbose: bool) -> dict:
    rng = random.Random(seed)
    fds0, rss0 = _fds(), _rss_mb()
    kids0 = _descendants()
    temp0 = set(_temp_leftovers())
    backend = LocalBackend()  # numpy and sympy preloaded, as in training
    limits = SandboxLimits(
        timeout_s=5.0, memory_mb=256, max_processes=CAP, disk_mb=32, max_file_size_mb=16, max_output_bytes=16 * 1024
    )
    s = Soak(backend, rng, capped=backend._pids_cap.available)
    t0 = time.perf_counter()
    starts = Counter()
    rounds = 0
    rss_warm = None
    while s.calls < calls:
        rounds += 1
        kill = None
        if rounds == 1:
            starts["first start"] += 1
        elif rounds % 9 == 0:
            backend.close()  # a clean restart: this round's sessions are the first of a fresh worker
            starts["clean restart"] += 1
        elif rounds % 13 == 0:
            await _kill_worker_idle(backend)  # killed from outside between rounds
            starts["killed between rounds"] += 1
        elif rounds % 17 == 0:
            kill = "worker"  # killed from outside under the round's first calls
            starts["killed mid-call"] += 1
        elif rounds % 5 == 0:
            kill = "session"
        lengths = [rng.randint(2, 5) for _ in range(concurrency)]
        await _round(s, concurrency, lengths, kill, limits)
        if rss_warm is None:
            rss_warm = _rss_mb()
        if verbose and rounds % 10 == 0:
            print(
                f"  round {rounds}: {s.calls} calls, {time.perf_counter() - t0:.0f} s, "
                f"violations {sum(s.violations.values())}",
                flush=True,
            )
    wall = time.perf_counter() - t0
    rss_end_open = _rss_mb()
    await backend.aclose()
    await asyncio.sleep(0.5)
    kids = sorted(_descendants() - kids0)
    temp = sorted(set(_temp_leftovers()) - temp0)
    groups = sorted(_group_members())
    fds1 = _fds()
    leaks = {"processes": kids, "pids_groups": groups, "temp_files": temp, "fds_before": fds0, "fds_after": fds1}
    if kids:
        s.violate("leak_processes", str(kids))
    if groups:
        s.violate("leak_pids_groups", str(groups))
    if temp:
        s.violate("leak_temp_files", str(temp))
    if fds1 > fds0:
        s.violate("leak_fds", f"{fds0} -> {fds1}")
    return {
        "calls": s.calls,
        "episodes": s.episodes,
        "rounds": rounds,
        "concurrency": concurrency,
        "wall_s": round(wall, 1),
        "calls_per_s": round(s.calls / wall, 1),
        "worker_starts": dict(starts),
        "isolation": backend.isolation,
        "pids_cgroup_cap": s.capped,
        "outcomes": dict(sorted(s.outcomes.items())),
        "counting_bomb_most_processes": s.most_made,
        "longest_wait_for_groups_s": round(s.group_wait_s, 2),
        "process_cap": CAP,
        "violations": dict(s.violations),
        "violation_total": sum(s.violations.values()),
        "details": s.details,
        "rss_mb": {
            "start": round(rss0, 1),
            "after_first_round": round(rss_warm or 0, 1),
            "end_backend_open": round(rss_end_open, 1),
            "end": round(_rss_mb(), 1),
        },
        "leaks": leaks,
    }


def machine() -> dict:
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parent,
    ).stdout.strip()
    return {
        "uname": " ".join(platform.uname()),
        "python": sys.version.split()[0],
        "cores": os.cpu_count(),
        "euid": os.geteuid(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": git,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=1200, help="calls in all (default 1200)")
    ap.add_argument("--quick", action="store_true", help="about 60 calls")
    ap.add_argument("--concurrency", type=int, default=4, help="sessions per round, opened together (default 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the report here too")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args()
    calls = 60 if args.quick else args.calls
    report = {"machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv])}
    report.update(asyncio.run(soak(calls, args.concurrency, args.seed, not args.quiet)))
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    sys.exit(1 if report["violation_total"] else 0)


if __name__ == "__main__":
    main()
