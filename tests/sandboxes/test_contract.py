"""The sandbox contract (issue "Sandboxes", item 6), run against every available backend.

Each test checks one property of the protocol in `sandboxes/base.py`: output capture, exceptions
with tracebacks, state persistence and the stateless mode, timeouts, truncation, unicode and
binary output, concurrency, and the session lifecycle.
"""

from __future__ import annotations

import asyncio

import pytest

from spo_agents.errors import SandboxError
from spo_agents.sandboxes import SandboxResult, SyncSession, open_session_sync

from .conftest import limits, session_processes


async def _open(backend, stateless=False, **lim):
    return await backend.open_session(stateless=stateless, limits=limits(**lim))


# --- output capture ---
async def test_stdout_is_captured(backend):
    async with await _open(backend) as s:
        r = await s.run("print('hello', 6 * 7)")
    assert isinstance(r, SandboxResult)
    assert r.stdout == "hello 42\n"
    assert r.exit_status == 0 and r.exception is None and r.ok


async def test_stderr_is_captured_separately(backend):
    async with await _open(backend) as s:
        r = await s.run("import sys\nprint('out')\nprint('err', file=sys.stderr)")
    assert r.stdout == "out\n"
    assert "err" in r.stderr and "out" not in r.stderr


async def test_output_of_child_processes_is_captured(backend):
    async with await _open(backend) as s:
        r = await s.run(
            "import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'print(\"from child\")'], check=True)"
        )
    assert "from child" in r.stdout, r


async def test_numpy_and_sympy_are_importable(backend):
    async with await _open(backend) as s:
        r = await s.run(
            "import numpy as np, sympy as sp\nx = sp.Symbol('x')\nprint(int(np.arange(5).sum()), sp.solve(x**2 - 4, x))"
        )
    assert r.ok, r
    assert r.stdout.strip() == "10 [-2, 2]"


# --- exceptions ---
async def test_exception_is_data_with_a_traceback(backend):
    async with await _open(backend) as s:
        r = await s.run("def f():\n    raise ValueError('boom')\nf()")
    assert not r.ok
    assert r.exit_status != 0
    assert r.exception is not None
    assert "Traceback" in r.exception and "ValueError: boom" in r.exception
    assert "in f" in r.exception  # the user's own frames are in it
    frames = [line for line in r.exception.splitlines() if line.lstrip().startswith("File ")]
    assert len(frames) == 2, r.exception  # <module> and f: none of the sandbox's own frames


async def test_syntax_error_is_data(backend):
    async with await _open(backend) as s:
        r = await s.run("def broken(:\n    pass")
    assert not r.ok
    assert r.exception is not None and "SyntaxError" in r.exception


async def test_session_survives_an_exception(backend):
    async with await _open(backend) as s:
        await s.run("kept = 'yes'")
        await s.run("raise RuntimeError('x')")
        r = await s.run("print(kept)")
    assert r.stdout == "yes\n"
    assert not r.session_restarted


# --- state ---
async def test_state_persists_between_calls(backend):
    async with await _open(backend) as s:
        await s.run("import math\nx = 41\ndef inc(v):\n    return v + 1")
        r = await s.run("print(inc(x), math.floor(2.5))")
    assert r.stdout == "42 2\n"


async def test_stateless_session_forgets_between_calls(backend):
    async with await _open(backend, stateless=True) as s:
        first = await s.run("x = 1\nprint(x)")
        second = await s.run("print(x)")
        third = await s.run("print('still works')")
    assert first.stdout == "1\n"
    assert second.exception is not None and "NameError" in second.exception
    assert third.stdout == "still works\n"


async def test_sessions_do_not_share_state(backend):
    async with await _open(backend) as a, await _open(backend) as b:
        await a.run("secret_a = 1")
        r = await b.run("print('secret_a' in globals())")
    assert r.stdout == "False\n"


# --- timeouts ---
async def test_timeout_is_reported_and_the_session_restarts(backend):
    async with await _open(backend) as s:
        await s.run("before = 1")
        r = await s.run("while True:\n    pass", timeout=1.0)
        after = await s.run("print('alive'); print('before' in globals())")
    assert r.timed_out and not r.ok
    assert r.session_restarted
    assert r.duration_s < 1.0 + 5.0
    assert after.stdout == "alive\nFalse\n"


async def test_per_call_timeout_overrides_the_session_limit(backend):
    async with await _open(backend, timeout_s=30.0) as s:
        r = await s.run("import time\ntime.sleep(20)", timeout=0.5)
    assert r.timed_out
    assert r.duration_s < 10.0


async def test_code_that_finishes_in_time_is_not_timed_out(backend):
    async with await _open(backend) as s:
        r = await s.run("import time\ntime.sleep(0.2)\nprint('done')", timeout=5.0)
    assert r.ok and not r.timed_out and r.stdout == "done\n"
    assert r.duration_s >= 0.2


async def test_output_before_a_timeout_is_kept(backend):
    async with await _open(backend) as s:
        r = await s.run("import sys, time\nprint('partial')\nsys.stdout.flush()\ntime.sleep(30)", timeout=1.0)
    assert r.timed_out
    assert "partial" in r.stdout


# --- truncation ---
async def test_long_output_keeps_head_and_tail(backend):
    async with await _open(backend, max_output_bytes=1000) as s:
        r = await s.run("print('HEAD' + 'x' * 100000 + 'TAIL')")
    assert r.output_truncated
    assert r.stdout.startswith("HEAD")
    assert r.stdout.rstrip("\n").endswith("TAIL")
    assert len(r.stdout.encode()) < 1000 + 200  # the limit plus a short truncation marker
    assert r.ok


async def test_short_output_is_not_truncated(backend):
    async with await _open(backend, max_output_bytes=1000) as s:
        r = await s.run("print('y' * 500)")
    assert not r.output_truncated
    assert r.stdout == "y" * 500 + "\n"


# --- unicode and binary ---
async def test_unicode_round_trips(backend):
    text = "héllo wörld ✓ 数学 🎉 ∑ᵢ xᵢ²"
    async with await _open(backend) as s:
        r = await s.run(f"s = {text!r}\nprint(s)\nprint(len(s))")
    assert r.stdout == f"{text}\n{len(text)}\n"


async def test_binary_output_does_not_break_the_result(backend):
    async with await _open(backend) as s:
        r = await s.run("import sys\nsys.stdout.buffer.write(bytes(range(256)))\nsys.stdout.buffer.write(b'\\nEND\\n')")
        after = await s.run("print('next')")
    assert isinstance(r.stdout, str)
    assert "END" in r.stdout and "ABC" in r.stdout
    assert after.stdout == "next\n"


async def test_unicode_in_code_and_tracebacks(backend):
    async with await _open(backend) as s:
        r = await s.run("raise ValueError('ünïcødé ✗')")
    assert "ünïcødé ✗" in (r.exception or "")


# --- concurrency ---
async def test_sixteen_concurrent_sessions(backend):
    sessions = await asyncio.gather(*[_open(backend) for _ in range(16)])
    try:
        await asyncio.gather(*[s.run(f"me = {i}") for i, s in enumerate(sessions)])
        results = await asyncio.gather(*[s.run("import time\ntime.sleep(0.05)\nprint(me * 2)") for s in sessions])
    finally:
        await asyncio.gather(*[s.close() for s in sessions])
    assert [r.stdout for r in results] == [f"{2 * i}\n" for i in range(16)]
    assert all(r.ok for r in results)


async def test_calls_within_one_session_are_serialised(backend):
    async with await _open(backend) as s:
        await s.run("n = 0")
        await asyncio.gather(*[s.run("n += 1") for _ in range(10)])
        r = await s.run("print(n)")
    assert r.stdout == "10\n"


# --- lifecycle ---
async def test_close_is_idempotent_and_run_after_close_raises(backend):
    s = await _open(backend)
    assert (await s.run("print(1)")).stdout == "1\n"
    await s.close()
    await s.close()
    with pytest.raises(SandboxError):
        await s.run("print(2)")


async def test_closed_sessions_leave_no_process(backend):
    before = session_processes(backend)
    if before is None:
        pytest.skip(f"backend `{backend.name}` does not expose its processes (its own tests check cleanup)")
    s = await _open(backend)
    await s.run("import subprocess, sys\np = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])")
    during = session_processes(backend)
    assert len(during) > len(before)
    await s.close()
    for _ in range(100):
        if set(session_processes(backend)) <= set(before):
            break
        await asyncio.sleep(0.02)
    assert set(session_processes(backend)) <= set(before)


def test_sync_session_wrapper(backend):
    s = open_session_sync(backend, limits=limits())
    assert isinstance(s, SyncSession)
    with s:
        s.run("v = 3")
        r = s.run("print(v * 3)")
    assert r.stdout == "9\n"
    s.close()  # again: safe


def test_result_serialises(backend):
    with open_session_sync(backend, limits=limits()) as s:
        d = s.run("print('x')").to_dict()
    for key in (
        "stdout",
        "stderr",
        "exit_status",
        "exception",
        "timed_out",
        "memory_exceeded",
        "output_truncated",
        "session_restarted",
        "duration_s",
        "ok",
    ):
        assert key in d
    assert d["ok"] is True and d["duration_s"] > 0
