"""The `e2b` backend without the service: the SDK's `AsyncSandbox` is replaced at the boundary by
a fake that runs code in-process and answers with the SDK's own `Execution` objects, so the
mapping of results, timeouts, lost sandboxes and the session lifecycle is checked here. The
live test (marked `e2b`) runs only with E2B_API_KEY set.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import traceback

import pytest

from spo_agents.errors import SandboxError
from spo_agents.sandboxes.base import SandboxLimits
from spo_agents.sandboxes.e2b import E2BBackend, execution_to_result, keep_head_and_tail, strip_ansi

e2b_ci = pytest.importorskip(
    "e2b_code_interpreter", reason="the E2B SDK is not installed (`pip install 'spo-agents[e2b]'`)"
)
from e2b.exceptions import SandboxNotFoundException, TimeoutException  # noqa: E402
from e2b_code_interpreter.models import Context, Execution, ExecutionError, Logs, Result  # noqa: E402

_ids = itertools.count()


class FakeSandbox:
    """Stands in for `e2b_code_interpreter.AsyncSandbox`: records every call, runs code locally."""

    instances: list[FakeSandbox] = []

    def __init__(self, create_kwargs: dict) -> None:
        self.create_kwargs = create_kwargs
        self.sandbox_id = f"fake-{next(_ids)}"
        self.namespaces: dict[str, dict] = {}
        self.calls: list[tuple] = []
        self.killed = False
        self.fail_next: BaseException | None = None

    @classmethod
    async def create(cls, **kwargs) -> FakeSandbox:
        sb = cls(kwargs)
        cls.instances.append(sb)
        return sb

    async def create_code_context(self, request_timeout=None) -> Context:
        ctx = Context(f"ctx-{next(_ids)}", "python", "/home/user")
        self.namespaces[ctx.id] = {"__name__": "__main__"}
        self.calls.append(("create_code_context", ctx.id, request_timeout))
        return ctx

    async def remove_code_context(self, context) -> None:
        self.calls.append(("remove_code_context", context.id))
        self.namespaces.pop(context.id, None)

    async def restart_code_context(self, context) -> None:
        self.calls.append(("restart_code_context", context.id))
        self.namespaces[context.id] = {"__name__": "__main__"}

    async def set_timeout(self, timeout) -> None:
        self.calls.append(("set_timeout", timeout))

    async def kill(self, **opts) -> bool:
        self.calls.append(("kill",))
        self.killed = True
        return True

    async def run_code(self, code, context=None, timeout=None, request_timeout=None) -> Execution:
        self.calls.append(("run_code", context.id if context else None, timeout, request_timeout))
        if self.fail_next is not None:
            e, self.fail_next = self.fail_next, None
            raise e
        if "while True" in code:
            raise TimeoutException("Execution timed out — the 'timeout' option can be used to increase this timeout")
        out, err = io.StringIO(), io.StringIO()
        error = None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                exec(code, self.namespaces[context.id])
            except SystemExit as e:
                error = ExecutionError("SystemExit", "" if e.code is None else str(e.code), "")
            except BaseException as e:  # noqa: BLE001
                tb = "".join(traceback.format_exception(e))
                error = ExecutionError(type(e).__name__, str(e), f"\x1b[0;31m{tb}\x1b[0m")
        return Execution(
            logs=Logs(
                stdout=[out.getvalue()] if out.getvalue() else [], stderr=[err.getvalue()] if err.getvalue() else []
            ),
            error=error,
        )


@pytest.fixture
def backend(monkeypatch):
    monkeypatch.setenv("E2B_API_KEY", "e2b_test_key")
    FakeSandbox.instances.clear()
    return E2BBackend(sandbox_class=FakeSandbox, request_timeout_s=7.0, sandbox_timeout_s=300)


# --- availability and keys -----------------------------------------------------------------------
def test_available_needs_the_api_key(monkeypatch):
    monkeypatch.delenv("E2B_API_KEY", raising=False)
    ok, reason = E2BBackend.available()
    assert not ok and "E2B_API_KEY" in reason
    monkeypatch.setenv("E2B_API_KEY", "x")
    assert E2BBackend.available()[0]


async def test_open_session_without_a_key_says_what_to_set(monkeypatch):
    monkeypatch.delenv("E2B_API_KEY", raising=False)
    b = E2BBackend(sandbox_class=FakeSandbox)
    with pytest.raises(SandboxError, match="set E2B_API_KEY"):
        await b.open_session()


def test_bad_lifetime_is_rejected():
    with pytest.raises(SandboxError, match="sandbox_timeout_s"):
        E2BBackend(sandbox_timeout_s=0)


# --- the three timeouts ----------------------------------------------------------------------------
async def test_sandbox_is_created_with_lifetime_key_and_no_internet(backend):
    async with await backend.open_session() as s:
        pass
    kw = FakeSandbox.instances[0].create_kwargs
    assert kw["timeout"] == 300 and kw["request_timeout"] == 7.0
    assert kw["api_key"] == "e2b_test_key" and kw["allow_internet_access"] is False
    assert s.sandbox.killed


async def test_call_timeout_maps_to_run_code_timeout(backend):
    async with await backend.open_session(limits=SandboxLimits(timeout_s=4.0)) as s:
        await s.run("x = 1")
        await s.run("x = 2", timeout=1.5)
    runs = [c for c in s.sandbox.calls if c[0] == "run_code"]
    assert [(c[2], c[3]) for c in runs] == [(4.0, 7.0), (1.5, 7.0)]
    assert runs[0][1] == s.context.id  # the session's own context, not the default one


async def test_lifetime_is_renewed_before_a_call_that_could_outlive_it(monkeypatch):
    monkeypatch.setenv("E2B_API_KEY", "k")
    b = E2BBackend(sandbox_class=FakeSandbox, sandbox_timeout_s=60, request_timeout_s=5.0)
    async with await b.open_session() as s:
        await s.run("x = 1", timeout=2.0)
        assert not [c for c in s.sandbox.calls if c[0] == "set_timeout"]
        await s.run("x = 1", timeout=40.0)
        renewals = [c[1] for c in s.sandbox.calls if c[0] == "set_timeout"]
        assert len(renewals) == 1 and renewals[0] >= 40 + 5  # outlives the call and its request
        assert s.sandbox.calls.index(("set_timeout", renewals[0])) < len(s.sandbox.calls) - 1  # before the call


# --- results ---------------------------------------------------------------------------------------
async def test_state_persists_and_output_is_mapped(backend):
    async with await backend.open_session() as s:
        await s.run("x = 41")
        r = await s.run("import sys\nprint(x + 1)\nprint('warn', file=sys.stderr)")
    assert r.ok and r.stdout == "42\n" and r.stderr == "warn\n"
    assert r.extra["sandbox_id"] == s.sandbox_id


async def test_stateless_uses_a_fresh_context_per_call(backend):
    async with await backend.open_session(stateless=True) as s:
        await s.run("y = 1")
        r = await s.run("print(y)")
    assert r.exception is not None and "NameError" in r.exception
    made = [c for c in s.sandbox.calls if c[0] == "create_code_context"]
    removed = [c for c in s.sandbox.calls if c[0] == "remove_code_context"]
    assert len(made) == 2 and len(removed) == 2


def test_error_becomes_an_exception_without_terminal_colours():
    tb = "\x1b[0;31m---------\x1b[0m\n\x1b[0;31mValueError\x1b[0m: boom"
    ex = Execution(logs=Logs(stdout=["before\n"]), error=ExecutionError("ValueError", "boom", tb))
    r = execution_to_result(ex, SandboxLimits())
    assert r.exit_status == 1 and not r.ok
    assert "\x1b" not in r.exception and "ValueError: boom" in r.exception
    assert r.stdout == "before\n" and "ValueError: boom" in r.stderr


@pytest.mark.parametrize(("value", "status"), [("", 0), ("0", 0), ("3", 3), ("None", 0), ("bad input", 1)])
def test_system_exit_maps_to_the_exit_status(value, status):
    r = execution_to_result(Execution(error=ExecutionError("SystemExit", value, "")), SandboxLimits())
    assert r.exit_status == status and r.exception is None
    assert ("bad input" in r.stderr) == (value == "bad input")


def test_memory_error_sets_memory_exceeded():
    r = execution_to_result(Execution(error=ExecutionError("MemoryError", "", "MemoryError: ")), SandboxLimits())
    assert r.memory_exceeded and not r.ok


def test_last_expression_is_not_printed_but_kept_in_extra():
    ex = Execution(results=[Result(text="42", is_main_result=True)], execution_count=3)
    r = execution_to_result(ex, SandboxLimits())
    assert r.stdout == "" and r.extra["display"] == "42" and r.extra["execution_count"] == 3


def test_long_output_keeps_head_and_tail_per_stream():
    ex = Execution(logs=Logs(stdout=["HEAD", "x" * 100_000, "TAIL"], stderr=["short"]))
    r = execution_to_result(ex, SandboxLimits(max_output_bytes=1000))
    assert r.output_truncated and r.stdout.startswith("HEAD") and r.stdout.endswith("TAIL")
    assert len(r.stdout.encode()) < 1000 + 100 and r.stderr == "short"


def test_keep_head_and_tail_cuts_by_bytes_and_stays_text():
    text, cut = keep_head_and_tail("é" * 1000, 101)  # 2 bytes per character
    head, _, tail = text.partition("\n[... ")
    assert cut and set(head) == {"é"} and tail.endswith("é") and "\ufffd" not in text
    assert len(head.encode()) == 50 and "1900 bytes of output cut" in text
    assert keep_head_and_tail("abc", 3) == ("abc", False)


def test_strip_ansi():
    assert strip_ansi("\x1b[1;32mok\x1b[0m") == "ok"


# --- failures ----------------------------------------------------------------------------------------
async def test_execution_timeout_restarts_the_context(backend):
    async with await backend.open_session() as s:
        await s.run("x = 1")
        r = await s.run("while True: pass", timeout=1.0)
        after = await s.run("print('x' in globals())")
    assert r.timed_out and r.session_restarted and not r.ok
    assert ("restart_code_context", s.context.id) in s.sandbox.calls
    assert after.stdout == "False\n"


async def test_lost_sandbox_is_replaced_and_reported_as_infrastructure(backend):
    async with await backend.open_session() as s:
        first = s.sandbox
        await s.run("x = 1")
        first.fail_next = SandboxNotFoundException("sandbox not found")
        r = await s.run("print(x)")
        assert s.sandbox is not first and first.killed
        after = await s.run("print('new')")
    assert r.session_restarted and not r.ok
    assert "SandboxNotFoundException" in r.extra["infrastructure_error"]
    assert after.stdout == "new\n"


async def test_other_service_errors_raise_sandbox_error(backend):
    async with await backend.open_session() as s:
        s.sandbox.fail_next = RuntimeError("HTTP 500")
        with pytest.raises(SandboxError, match="HTTP 500"):
            await s.run("print(1)")


async def test_creation_failure_is_a_sandbox_error_with_the_checks(monkeypatch):
    monkeypatch.setenv("E2B_API_KEY", "k")

    class Refusing(FakeSandbox):
        @classmethod
        async def create(cls, **kwargs):
            raise RuntimeError("401 unauthorized")

    with pytest.raises(SandboxError, match="Check E2B_API_KEY"):
        await E2BBackend(sandbox_class=Refusing).open_session()


# --- lifecycle ---------------------------------------------------------------------------------------
async def test_close_is_idempotent_and_run_after_close_raises(backend):
    s = await backend.open_session()
    await s.close()
    await s.close()
    assert [c for c in s.sandbox.calls if c[0] == "kill"] == [("kill",)]
    with pytest.raises(SandboxError, match="closed"):
        await s.run("print(1)")


async def test_backend_aclose_kills_every_open_sandbox(backend):
    sessions = [await backend.open_session() for _ in range(3)]
    await backend.aclose()
    await backend.aclose()
    assert all(s.sandbox.killed for s in sessions)


# --- live ------------------------------------------------------------------------------------------
@pytest.mark.e2b
@pytest.mark.skipif(
    not os.environ.get("E2B_API_KEY"), reason="E2B_API_KEY is not set: the live E2B test needs an account"
)
async def test_live_e2b_session():
    b = E2BBackend(sandbox_timeout_s=120)
    try:
        async with await b.open_session(limits=SandboxLimits(timeout_s=20)) as s:
            await s.run("x = 6 * 7")
            r = await s.run("print(x)")
            t = await s.run("while True:\n    pass", timeout=2)
            after = await s.run("print('alive')")
    finally:
        await b.aclose()
    assert r.stdout == "42\n" and r.ok
    assert t.timed_out and t.session_restarted
    assert after.stdout == "alive\n"


def test_limit_fields_are_options_and_unknown_options_suggest_the_right_one():
    from spo_agents.errors import ConfigError
    from spo_agents.sandboxes import make_backend

    assert make_backend("e2b", timeout_s=4).limits.timeout_s == 4
    with pytest.raises(ConfigError, match="Did you mean `sandbox_timeout_s`"):
        make_backend("e2b", sandbox_timeout=4)
