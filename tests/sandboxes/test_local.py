"""Properties specific to the `local` backend: options, isolation reporting, worker lifecycle,
limits that the shared suites do not pin down, and the registry glue in `sandboxes/__init__.py`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from spo_agents.config import SandboxConfig
from spo_agents.errors import ConfigError, SandboxError, SandboxNotFound
from spo_agents.registry import SANDBOXES
from spo_agents.sandboxes import (
    SandboxLimits,
    available_backends,
    backend_from_config,
    make_backend,
    open_session_sync,
)
from spo_agents.sandboxes.base import split_limits
from spo_agents.sandboxes.local import LocalBackend
from spo_agents.sandboxes.local.channel import Capture

from .conftest import session_processes

QUICK = {"preload": []}  # these tests do not need numpy / sympy in the worker


@pytest.fixture
def local():
    """A backend of the test's own (for tests that kill or close it)."""
    b = make_backend("local", **QUICK)
    yield b
    b.close()


@pytest.fixture(scope="module")
def shared():
    b = make_backend("local", **QUICK)
    yield b
    b.close()


# --- registry glue ---
def test_builtins_are_registered_lazily():
    ids = {s.id for s in SANDBOXES.list()}
    assert {"local", "docker", "e2b"} <= ids
    assert SANDBOXES.spec("docker").entry_point == "spo_agents.sandboxes.docker.backend:DockerBackend"
    assert SANDBOXES.spec("e2b").entry_point == "spo_agents.sandboxes.e2b:E2BBackend"


def test_unknown_backend_suggests_the_closest_name():
    with pytest.raises(SandboxNotFound, match="Did you mean `local`"):
        make_backend("locl")


def test_a_plugin_backend_is_listed_with_its_availability():
    class Toy(LocalBackend):
        @classmethod
        def available(cls):
            return False, "toy is never available"

    SANDBOXES.register("toy-test-backend", Toy, override=True)
    try:
        assert available_backends()["toy-test-backend"] == (False, "toy is never available")
    finally:
        SANDBOXES._specs.pop("toy-test-backend")


def test_backend_from_config_maps_limits_and_options():
    cfg = SandboxConfig(
        backend="local",
        timeout_s=3.0,
        memory_mb=300,
        options={"isolation": "auto", "max_output_bytes": 123, "preload": []},
    )
    b = backend_from_config(cfg)
    try:
        assert isinstance(b, LocalBackend)
        assert (b.limits.timeout_s, b.limits.memory_mb, b.limits.max_output_bytes) == (3.0, 300, 123)
    finally:
        b.close()


def test_split_limits_applies_limit_fields_over_the_base_and_returns_the_rest():
    base = SandboxLimits(timeout_s=3.0, memory_mb=300)
    limits, rest = split_limits({"memory_mb": 128, "isolation": "unshare", "cpu_s": 2.0}, base)
    assert (limits.timeout_s, limits.memory_mb, limits.cpu_s) == (3.0, 128, 2.0)
    assert limits.disk_mb == SandboxLimits().disk_mb
    assert rest == {"isolation": "unshare"}
    assert base.memory_mb == 300 and base.cpu_s is None  # the base is not changed


def test_a_limit_in_the_options_wins_over_the_config_field():
    cfg = SandboxConfig(backend="local", timeout_s=3.0, memory_mb=300, options={"memory_mb": 200, "preload": []})
    b = backend_from_config(cfg)
    try:
        assert (b.limits.timeout_s, b.limits.memory_mb) == (3.0, 200)
    finally:
        b.close()


# --- options ---
def test_unknown_option_is_a_config_error_with_a_suggestion():
    with pytest.raises(ConfigError, match="Did you mean `memory_mb`"):
        LocalBackend(memory_md=10)


def test_bad_isolation_is_a_config_error():
    with pytest.raises(ConfigError, match="bubblewrap"):
        LocalBackend(isolation="bwrap")


def test_isolation_none_warns():
    with pytest.warns(RuntimeWarning, match="isolation `none`"):
        b = LocalBackend(isolation="none", **QUICK)
    assert b.isolation == "none"


def test_auto_picks_an_isolating_level(shared):
    assert shared.isolation in ("bubblewrap", "unshare")
    ok, reason = LocalBackend.available()
    assert ok and "isolation" in reason


def test_the_interpreter_is_configurable(tmp_path):
    import sys

    b = make_backend("local", python=sys.executable, **QUICK)
    try:
        with open_session_sync(b) as s:
            r = s.run("import sys\nprint(sys.version_info[:2])")
        assert r.stdout.strip() == str(tuple(sys.version_info[:2]))
    finally:
        b.close()


def test_a_missing_interpreter_is_an_infrastructure_error():
    b = make_backend("local", python="/nonexistent/python3", **QUICK)
    with pytest.raises(SandboxError, match="/nonexistent/python3"):
        open_session_sync(b)
    b.close()


# --- output capture ---
def test_capture_keeps_head_and_tail_within_the_limit():
    c = Capture(10)
    for chunk in (b"abc", b"defgh", b"ijklmnop", b"qrstuvwxyz"):
        c.feed(chunk)
    text, truncated = c.take()
    assert truncated
    assert text.startswith("abcde") and text.endswith("vwxyz")
    assert "[16 bytes truncated]" in text
    assert c.take() == ("", False)  # take() resets


def test_capture_under_the_limit_is_exact():
    c = Capture(100)
    c.feed("é✓".encode())
    assert c.take() == ("é✓", False)


# --- limits ---
@pytest.mark.slow  # burns a few CPU seconds on purpose
async def test_cpu_limit_stops_a_busy_loop(shared):
    async with await shared.open_session(limits=SandboxLimits(timeout_s=30, cpu_s=1)) as s:
        r = await s.run("while True:\n    pass")
        assert r.timed_out and r.extra.get("cpu_exceeded"), r
        assert r.duration_s < 25
        assert (await s.run("print(1)")).stdout == "1\n"


async def test_open_files_limit(shared):
    async with await shared.open_session(limits=SandboxLimits(max_open_files=32)) as s:
        r = await s.run(
            "fs = []\ntry:\n    while True:\n        fs.append(open('/dev/null'))\n"
            "except OSError as e:\n    print(len(fs), type(e).__name__)"
        )
    n, err = r.stdout.split()
    assert int(n) < 32 and err == "OSError"


async def test_file_size_limit(shared):
    async with await shared.open_session(limits=SandboxLimits(max_file_size_mb=1)) as s:
        r = await s.run(
            "try:\n    open('big', 'wb').write(b'x' * 3 * 2**20)\n    print('wrote')\n"
            "except OSError as e:\n    print('refused', e.errno)"
        )
    assert "refused 27" in r.stdout, r  # EFBIG


async def test_restarted_session_has_a_fresh_work_dir(shared):
    async with await shared.open_session() as s:
        await s.run("open('note.txt', 'w').write('x')")
        assert (await s.run("import os\nprint(os.path.exists('note.txt'))")).stdout == "True\n"
        await s.run("while True:\n    pass", timeout=0.5)
        r = await s.run("import os\nprint(os.path.exists('note.txt'), os.getcwd())")
    assert r.stdout.split()[0] == "False"


# --- lifecycle ---
async def test_worker_death_between_calls_is_an_infrastructure_error_then_survived(local):
    async with await local.open_session() as s:
        await s.run("x = 1")
        worker = psutil.Process(local.worker_pid)
        tree = [worker, *worker.children(recursive=True)]
        os.kill(worker.pid, signal.SIGKILL)
        psutil.wait_procs(tree, timeout=10)
        with pytest.raises(SandboxError, match="outside"):
            await s.run("print('x' in globals())")
        r = await s.run("print('x' in globals())")
        assert r.session_restarted and r.ok and r.stdout == "False\n", r
        after = await s.run("print('back')")
    assert after.stdout == "back\n" and not after.session_restarted


def _runner_of(ns: str) -> int:
    """Host pid of the session process that is pid 1 of the pid namespace `ns`."""
    for p in psutil.pids():
        try:
            if os.readlink(f"/proc/{p}/ns/pid") != ns:
                continue
            with open(f"/proc/{p}/status") as f:
                nspid = next(line.split()[1:] for line in f if line.startswith("NSpid:"))
        except (OSError, StopIteration):
            continue
        if nspid[-1] == "1":
            return p
    raise AssertionError(f"no process is pid 1 of {ns}")


@pytest.mark.parametrize("isolation", ["auto", "unshare"])
@pytest.mark.parametrize("victim", ["worker", "session"])
async def test_a_kill_from_outside_mid_call_is_an_infrastructure_error(victim, isolation):
    """Killing the worker, or the session's own process, while code runs is not the code's doing:
    the call raises `SandboxError`, and the next call runs in a fresh session that says so."""
    local = make_backend("local", isolation=isolation, **QUICK)
    try:
        async with await local.open_session() as s:
            ns = (await s.run("import os\nx = 1\nprint(os.readlink('/proc/self/ns/pid'))")).stdout.strip()
            call = asyncio.ensure_future(s.run("import time\ntime.sleep(30)\nprint('done')"))
            await asyncio.sleep(0.5)
            os.kill(local.worker_pid if victim == "worker" else _runner_of(ns), signal.SIGKILL)
            with pytest.raises(SandboxError, match="killed from outside|ended"):
                await asyncio.wait_for(call, 20)
            r = await s.run("print('x' in globals())")
            assert r.ok and r.stdout == "False\n" and r.session_restarted, r
            again = await s.run("print('again')")
            assert again.stdout == "again\n" and not again.session_restarted
    finally:
        await local.aclose()


async def test_closing_a_session_of_a_dead_worker_leaves_the_new_workers_sessions_alone(local):
    """The restarted worker numbers its sessions from the same pids: ending a session of the dead
    worker must not kill the new worker's session that got the same number."""
    old = await local.open_session()
    await old.run("pass")
    worker = psutil.Process(local.worker_pid)
    tree = [worker, *worker.children(recursive=True)]
    worker.kill()
    psutil.wait_procs(tree, timeout=10)
    async with await local.open_session() as new:
        await new.run("x = 7")
        await old.close()
        r = await new.run("print(x)")
    assert r.stdout == "7\n" and not r.session_restarted, r


async def test_a_stateless_session_replaces_a_fork_its_worker_took_down(local):
    async with await local.open_session(stateless=True) as s:
        assert (await s.run("print(1)")).ok
        await asyncio.wait([s._next])  # the next call's fork, started in the background, is ready
        worker = psutil.Process(local.worker_pid)
        tree = [worker, *worker.children(recursive=True)]
        worker.kill()
        psutil.wait_procs(tree, timeout=10)
        r = await s.run("print(2)")
    assert r.ok and r.stdout == "2\n", r


async def test_deaths_the_code_or_the_sandbox_cause_stay_results(local):
    """The same exit status as a SIGKILL (137), a timeout, an uncaught signal handler exit, an
    exception and `sys.exit` are the code's outcome: data in the result, never `SandboxError`."""
    async with await local.open_session(limits=SandboxLimits(timeout_s=10, memory_mb=256)) as s:
        r = await s.run("import os\nos._exit(137)")
        assert r.exit_status == 137 and r.session_restarted and not r.ok, r
        r = await s.run("while True:\n    pass", timeout=0.5)
        assert r.timed_out and r.session_restarted, r
        r = await s.run("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\nimport time\ntime.sleep(5)")
        assert r.session_restarted and r.exit_status == 128 + signal.SIGTERM, r
        r = await s.run("raise ValueError('no')")
        assert r.exception and "ValueError" in r.exception and not r.session_restarted, r
        r = await s.run("import sys\nsys.exit(4)")
        assert r.exit_status == 4 and not r.session_restarted, r
        r = await s.run("x = bytearray(2 * 1024**3)")
        assert r.memory_exceeded, r
        assert (await s.run("print('ok')")).stdout == "ok\n"


async def test_backend_close_leaves_no_process(local):
    sessions = [await local.open_session() for _ in range(3)]
    await asyncio.gather(
        *[
            s.run("import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])")
            for s in sessions
        ]
    )
    worker = psutil.Process(local.worker_pid)
    tree = [worker, *worker.children(recursive=True)]
    assert len(session_processes(local)) >= 6
    await local.aclose()
    await local.aclose()  # safe twice
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree):
        await asyncio.sleep(0.05)
    assert not [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


async def test_session_start_forks_the_warm_worker(shared):
    shared.start()
    pid = shared.worker_pid
    s1 = await shared.open_session()
    s2 = await shared.open_session()
    try:
        assert shared.worker_pid == pid  # no new worker per session
        forked = {p.pid for p in psutil.Process(pid).children(recursive=True)}
        assert {s1._runner.host_pid, s2._runner.host_pid} <= forked  # forks of the warm worker, not new interpreters
    finally:
        await s1.close()
        await s2.close()


def test_sync_sessions_from_many_threads(shared):
    from concurrent.futures import ThreadPoolExecutor

    def episode(i: int) -> str:
        with open_session_sync(shared) as s:
            s.run(f"v = {i}")
            return s.run("print(v + 1)").stdout

    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(episode, range(8)))
    assert outs == [f"{i + 1}\n" for i in range(8)]


@pytest.mark.parametrize("isolation", ["auto", "none"])
async def test_no_temp_dir_is_left_behind(tmp_path, monkeypatch, isolation):
    import tempfile
    import warnings

    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        b = make_backend("local", isolation=isolation, **QUICK)
    try:
        s = await b.open_session()
        await s.run("open('scratch.bin', 'wb').write(b'x' * 1000)\nimport os\nprint(os.getcwd())")
        await s.run("while True:\n    pass", timeout=0.5)  # timed out: restarted
        await s.run("import os\nos._exit(1)")  # crashed: restarted
        await s.close()
        st = await b.open_session(stateless=True)
        await st.run("open('a', 'w').write('1')")
        await st.run("open('b', 'w').write('2')")
        await st.close()
    finally:
        await b.aclose()
    assert list(private.iterdir()) == []


async def test_a_session_dropped_without_close_is_killed_later(shared):
    import gc

    before = set(session_processes(shared))
    s = await shared.open_session()
    await s.run("x = 1")
    pid_count = len(session_processes(shared))
    assert pid_count > len(before)
    del s
    gc.collect()
    s2 = await shared.open_session()  # the next request to the worker reaps the orphan
    await s2.close()
    for _ in range(200):
        if set(session_processes(shared)) <= before:
            break
        await asyncio.sleep(0.02)
    assert set(session_processes(shared)) <= before


async def test_a_cancelled_call_does_not_leak_into_the_next(shared):
    async with await shared.open_session() as s:
        task = asyncio.ensure_future(s.run("import time\ntime.sleep(3)\nprint('late')"))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        r = await s.run("print('next')")
    assert r.stdout == "next\n"


async def test_echo_last_expression_is_opt_in():
    plain = make_backend("local", **QUICK)
    echo = make_backend("local", echo_last_expression=True, **QUICK)
    try:
        async with await plain.open_session() as s:
            quiet = await s.run("x = 6\nx * 7")
        async with await echo.open_session() as s:
            shown = await s.run("x = 6\nx * 7")
            none = await s.run("print('p')\nNone")
            statement = await s.run("y = 1")
            error = await s.run("1 +")
    finally:
        await plain.aclose()
        await echo.aclose()
    assert quiet.stdout == ""
    assert shown.stdout == "42\n"
    assert none.stdout == "p\n"
    assert statement.stdout == ""
    assert error.exception is not None and "SyntaxError" in error.exception


async def test_an_interpreter_under_tmp_is_not_hidden_by_the_session_work_dir(tmp_path):
    """A clone (and its venv) under /tmp, as in `mktemp -d`: the sessions' private /tmp must not
    hide the interpreter or its site-packages."""
    import subprocess
    import sys

    if not str(tmp_path).startswith("/tmp/"):
        pytest.skip(f"the test needs a temp dir under /tmp, got {tmp_path}")
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    site = subprocess.check_output(
        [env_dir / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    ).strip()
    (Path(site) / "spo_probe_mod.py").write_text("VALUE = 41\n")
    backend = LocalBackend(python=str(env_dir / "bin" / "python"), preload=())
    if backend.isolation != "bubblewrap":
        await backend.aclose()
        pytest.skip(f"bubblewrap isolation not available here ({backend.isolation})")
    try:
        async with await backend.open_session() as s:
            r = await s.run("import spo_probe_mod, sys\nprint(spo_probe_mod.VALUE + 1)\nopen('/tmp/w', 'w').write('x')")
        assert r.ok, r.stderr
        assert r.stdout.strip() == "42"
    finally:
        await backend.aclose()
