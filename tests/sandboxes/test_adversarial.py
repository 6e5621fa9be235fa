"""Adversarial code (issue "Sandboxes", item 7): one hostile behaviour per test, run against every
available backend. Each test checks that the behaviour is contained, that the host is unaffected
and that the session (or its restarted successor) answers the next call.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import threading

import pytest

from spo_agents.sandboxes import make_backend

from .conftest import describe_processes, limits, session_processes


@pytest.fixture(autouse=True)
def _isolated(backend):
    if getattr(backend, "isolation", "") == "none":
        pytest.skip("isolation `none` contains nothing by design; the adversarial suite needs isolation")


async def _open(backend, **lim):
    return await backend.open_session(limits=limits(**lim))


async def _next_call_works(session) -> None:
    r = await session.run("print(6 * 7)")
    assert r.stdout == "42\n", r


async def _no_leftovers(backend, before) -> None:
    if before is None:
        return
    for _ in range(500):
        if set(session_processes(backend)) <= set(before):
            return
        await asyncio.sleep(0.02)
    left = set(session_processes(backend)) - set(before)
    assert not left, f"session processes survived the session: {describe_processes(left)}"


async def test_infinite_loop(backend):
    async with await _open(backend) as s:
        r = await s.run("while True:\n    pass", timeout=1.0)
        assert r.timed_out and r.session_restarted
        await _next_call_works(s)


async def test_fork_bomb(backend):
    before = session_processes(backend)
    async with await _open(backend, max_processes=12) as s:
        r = await s.run(
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
            timeout=1.0,
        )
        assert r.timed_out and r.session_restarted
        await _next_call_works(s)
    await _no_leftovers(backend, before)
    # The host can still start processes.
    assert os.system("true") == 0


COUNTING_BOMB = (
    "import os, time\nn = 0\nfor _ in range({tries}):\n    try:\n        if os.fork() == 0:\n"
    "            time.sleep(60)\n            os._exit(0)\n        n += 1\n    except OSError:\n        break\nprint(n)"
)
EXPONENTIAL_BOMB = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"


def _why_no_process_cap(backend) -> str | None:
    """Why `max_processes` is not enforced by this backend here (None when it is)."""
    if backend.name == "local" and os.geteuid() == 0 and not backend._pids_cap.available:
        return (
            "running as root without a writable cgroup v1 `pids` controller, `max_processes` is not enforced: "
            "the kernel exempts host root from RLIMIT_NPROC (sandboxes/README.md); run as a user, or use `docker`"
        )
    return None


async def _kill_worker(backend) -> None:
    """Kill the backend's worker from outside and wait until its processes are gone."""
    import psutil

    worker = psutil.Process(backend.worker_pid)
    tree = [worker, *worker.children(recursive=True)]
    worker.kill()
    await asyncio.to_thread(psutil.wait_procs, tree, 10)


@pytest.mark.parametrize("start", ["fresh", "restarted"])
async def test_fork_bomb_is_capped_in_each_session_after_a_worker_start(backend, start):
    """The first sessions of a worker, opened together before any of them runs code (as a batch of
    rollouts does), each hold the process cap: a fork bomb in any of them stops at `max_processes`."""
    why = _why_no_process_cap(backend)
    if why:
        pytest.skip(why)
    cap, n_sessions = 12, 4
    slack = 1 if backend.name == "docker" else 0  # docker's pids limit leaves the code one more (docker/backend.py)
    fresh = make_backend(backend.name, **dict(getattr(backend, "options", {})))
    try:
        if start == "restarted":
            if not hasattr(fresh, "worker_pid"):
                pytest.skip(f"the `{backend.name}` backend has no shared worker to restart")
            async with await _open(fresh) as s:
                await _next_call_works(s)
            await _kill_worker(fresh)
        sessions = [await _open(fresh, max_processes=cap) for _ in range(n_sessions)]
        try:
            for i, s in enumerate(sessions):
                r = await s.run(COUNTING_BOMB.format(tries=3 * cap), timeout=20.0)
                assert r.ok, r
                made = int(r.stdout.strip())
                assert made <= cap + slack, f"session {i + 1}/{n_sessions} of a {start} worker made {made} processes"
                r = await s.run(EXPONENTIAL_BOMB, timeout=1.0)
                assert r.timed_out and r.session_restarted, r
                await _next_call_works(s)
        finally:
            for s in sessions:
                await s.close()
    finally:
        await fresh.aclose()


async def test_memory_bomb_at_once(backend):
    async with await _open(backend, memory_mb=256) as s:
        r = await s.run("x = bytearray(4 * 1024**3)\nprint('allocated')")
        assert "allocated" not in r.stdout
        assert r.memory_exceeded or r.session_restarted, r
        await _next_call_works(s)


async def test_memory_bomb_growing(backend):
    async with await _open(backend, memory_mb=256) as s:
        r = await s.run("chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024**2))", timeout=20.0)
        assert not r.timed_out, r
        assert r.memory_exceeded or r.session_restarted, r
        await _next_call_works(s)


async def test_disk_fill(backend, tmp_path):
    free_before = shutil.disk_usage(tmp_path).free
    async with await _open(backend, disk_mb=32, max_file_size_mb=16) as s:
        r = await s.run(
            "import os\nwritten = 0\nchunk = b'x' * 2**20\ni = 0\n"
            "try:\n"
            "    while written < 2**31:\n"
            "        with open(f'fill{i}', 'wb') as f:\n"
            "            for _ in range(8):\n"
            "                f.write(chunk); written += len(chunk)\n"
            "        i += 1\n"
            "except OSError as e:\n"
            "    print('stopped', type(e).__name__)\n"
            "print('MB', written // 2**20)",
            timeout=20.0,
        )
        assert "stopped" in r.stdout, r
        written_mb = int(r.stdout.split("MB")[-1].strip())
        assert written_mb <= 64
        await _next_call_works(s)
    # Nothing of it landed on the host's disk (allow for other activity on the machine).
    assert shutil.disk_usage(tmp_path).free > free_before - 256 * 2**20


async def test_hundred_megabytes_of_stdout(backend):
    async with await _open(backend, max_output_bytes=10_000) as s:
        r = await s.run(
            "import sys\nblock = 'y' * 2**20\nfor _ in range(100):\n    sys.stdout.write(block)\nprint('END')",
            timeout=30.0,
        )
        assert r.output_truncated
        assert len(r.stdout) < 10_000 + 200
        assert r.stdout.rstrip().endswith("END")
        await _next_call_works(s)


async def test_network_is_unreachable(backend):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted = []

    def accept() -> None:
        try:
            conn, _ = server.accept()
            accepted.append(conn)
        except OSError:
            pass

    t = threading.Thread(target=accept)
    t.start()
    try:
        async with await _open(backend) as s:
            r = await s.run(
                "import socket\n"
                "try:\n"
                f"    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                "    print('CONNECTED')\n"
                "except OSError as e:\n"
                "    print('blocked', type(e).__name__)",
                timeout=10.0,
            )
            ext = await s.run(
                "import socket\n"
                "try:\n"
                "    socket.create_connection(('1.1.1.1', 53), timeout=2)\n"
                "    print('CONNECTED')\n"
                "except OSError as e:\n"
                "    print('blocked', type(e).__name__)",
                timeout=10.0,
            )
    finally:
        t.join()
        server.close()
    assert "blocked" in r.stdout and "CONNECTED" not in r.stdout, r
    assert "blocked" in ext.stdout, ext
    assert not accepted


async def test_secret_in_the_parents_environment_is_not_visible(backend, monkeypatch):
    token = "spo-secret-" + secrets.token_hex(8)
    monkeypatch.setenv("SPO_TEST_SECRET", token)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", token)
    # A fresh backend, started after the secret is planted.
    options = dict(getattr(backend, "options", {}))
    if backend.name == "local":
        options["preload"] = []  # a quicker start; the environment is what is under test
    fresh = make_backend(backend.name, **options)
    try:
        async with await fresh.open_session(limits=limits()) as s:
            r = await s.run(
                "import os, glob\n"
                "print(dict(os.environ))\n"
                "for p in glob.glob('/proc/*/environ'):\n"
                "    try:\n"
                "        print(open(p, 'rb').read())\n"
                "    except OSError:\n"
                "        pass"
            )
    finally:
        await fresh.aclose()
    assert r.ok, r
    assert token not in r.stdout + r.stderr


async def test_secret_file_outside_the_sandbox_is_not_readable(backend, tmp_path):
    token = "spo-secret-" + secrets.token_hex(8)
    secret = tmp_path / "secret.txt"
    secret.write_text(token)
    secret.chmod(0o644)
    async with await _open(backend) as s:
        r = await s.run(
            "for p in [%r, '/etc/shadow', '/root/.bash_history']:\n"
            "    try:\n"
            "        print(open(p).read())\n"
            "    except OSError as e:\n"
            "        print('denied', p, type(e).__name__)" % str(secret)
        )
        await _next_call_works(s)
    assert token not in r.stdout + r.stderr
    assert "denied" in r.stdout


async def test_writing_outside_the_work_dir_fails(backend, tmp_path):
    targets = [str(tmp_path / "pwned"), "/usr/pwned", "/etc/pwned", "/pwned"]
    async with await _open(backend) as s:
        r = await s.run(
            f"for p in {targets!r}:\n"
            "    try:\n"
            "        open(p, 'w').write('x')\n"
            "        print('WROTE', p)\n"
            "    except OSError as e:\n"
            "        print('denied', p)\n"
            "open('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())"
        )
        await _next_call_works(s)
    for p in targets:
        assert not os.path.exists(p), f"the sandbox wrote {p} on the host"
    assert r.stdout.strip().endswith("ok"), r


async def test_killing_the_parent(backend):
    before = session_processes(backend)
    async with await _open(backend) as s:
        r = await s.run(
            "import os, signal\n"
            "for pid in {os.getppid(), 1}:\n"
            "    try:\n"
            "        os.kill(pid, signal.SIGKILL)\n"
            "    except OSError as e:\n"
            "        print('refused', pid, type(e).__name__)\n"
            "print('still here')",
            timeout=5.0,
        )
        assert not r.timed_out
        await _next_call_works(s)
    await _no_leftovers(backend, before)
    # This process (the trainer's stand-in) is unharmed, and the backend still opens sessions.
    async with await _open(backend) as s2:
        await _next_call_works(s2)


async def test_killing_every_visible_process(backend):
    async with await _open(backend) as s:
        await s.run("import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass", timeout=5.0)
        await _next_call_works(s)
    async with await _open(backend) as s2:
        await _next_call_works(s2)


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM", "SIGSEGV", "SIGSTOP"])
async def test_signal_to_itself(backend, sig):
    # Either the session dies and is restarted (a normal process), or the signal is ignored and
    # the code goes on (`local` runs the code as pid 1 of its own pid namespace, which ignores
    # signals it sends itself that have no handler). Never a hang, never a dead sandbox.
    async with await _open(backend) as s:
        r = await s.run(f"import os, signal\nos.kill(os.getpid(), signal.{sig})\nprint('went on')", timeout=10.0)
        assert not r.timed_out, r
        if r.session_restarted:
            assert r.exit_status != 0
        else:
            assert "went on" in r.stdout
        await _next_call_works(s)


async def test_segfault(backend):
    async with await _open(backend) as s:
        r = await s.run("import ctypes\nctypes.string_at(0)", timeout=10.0)
        assert r.session_restarted and r.exit_status != 0, r
        await _next_call_works(s)


async def test_threads_and_children_do_not_survive_the_session(backend):
    before = session_processes(backend)
    s = await _open(backend)
    r = await s.run(
        "import os, subprocess, sys, threading, time\n"
        "def spin():\n"
        "    while True:\n"
        "        time.sleep(0.01)\n"
        "threading.Thread(target=spin, daemon=False).start()\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(600)\n"
        "    os._exit(0)\n"
        "print('started')"
    )
    assert r.stdout == "started\n"
    after_call = await s.run("print('call returned with a thread and children running')")
    assert after_call.ok
    await s.close()
    await _no_leftovers(backend, before)


async def test_sys_exit_is_data(backend):
    async with await _open(backend) as s:
        r = await s.run("import sys\nprint('bye')\nsys.exit(3)")
        assert r.exit_status == 3 and r.stdout == "bye\n"
        assert not r.ok
        await _next_call_works(s)


async def test_os_exit_restarts_the_session(backend):
    async with await _open(backend) as s:
        r = await s.run("import os, sys\nprint('bye', flush=True)\nos._exit(5)")
        assert r.exit_status == 5 and r.session_restarted, r
        assert "bye" in r.stdout
        await _next_call_works(s)


async def test_closing_stdout_does_not_break_the_session(backend):
    async with await _open(backend) as s:
        r = await s.run("import os, sys\nsys.stdout.close()\nos.close(1)\nos.close(2)", timeout=5.0)
        assert not r.timed_out
        await _next_call_works(s)


async def test_process_cap_holds(backend):
    why = _why_no_process_cap(backend)
    if why:
        pytest.skip(why)
    async with await _open(backend, max_processes=12) as s:
        r = await s.run(
            "import os, time\nn = 0\nfor _ in range(40):\n"
            "    try:\n        if os.fork() == 0:\n            time.sleep(5)\n"
            "            os._exit(0)\n        n += 1\n    except OSError:\n        break\nprint(n)",
            timeout=8.0,
        )
        assert r.stdout.strip() and int(r.stdout.strip()) < 40, r
