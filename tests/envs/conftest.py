"""Fixtures for environment tests: an in-test sandbox backend (Python `exec` in a dict, no
isolation: for exercising env logic only) and a shared answer checker."""

from __future__ import annotations

import contextlib
import io
import time
import traceback

import pytest

from spo_agents.errors import SandboxError
from spo_agents.sandboxes.base import SandboxBackend, SandboxLimits, SandboxResult, SandboxSession


class FakeSession(SandboxSession):
    """Runs code with `exec` in a namespace kept between calls; counts runs and closes."""

    def __init__(self, backend: FakeBackend, stateless: bool) -> None:
        self.backend = backend
        self.stateless = stateless
        self.namespace: dict = {}
        self.closed = 0

    async def run(self, code: str, timeout: float | None = None) -> SandboxResult:
        if self.backend.fail_runs:
            raise SandboxError("the fake sandbox is down")
        self.backend.runs.append(code)
        if self.stateless:
            self.namespace = {}
        out = io.StringIO()
        start = time.perf_counter()
        exc = None
        with contextlib.redirect_stdout(out):
            try:
                exec(compile(code, "<code>", "exec"), self.namespace)
            except BaseException:  # noqa: BLE001 - user code may raise anything
                exc = traceback.format_exc(limit=-1)
        return SandboxResult(
            stdout=out.getvalue(), exception=exc, exit_status=1 if exc else 0, duration_s=time.perf_counter() - start
        )

    async def close(self) -> None:
        self.closed += 1


class FakeBackend(SandboxBackend):
    name = "fake"

    def __init__(self) -> None:
        self.sessions: list[FakeSession] = []
        self.runs: list[str] = []
        self.fail_runs = False
        self.fail_open = False

    async def open_session(self, *, stateless: bool = False, limits: SandboxLimits | None = None) -> SandboxSession:
        if self.fail_open:
            raise SandboxError("cannot start the fake sandbox")
        s = FakeSession(self, stateless)
        self.sessions.append(s)
        return s


@pytest.fixture
def fake_backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture(scope="session")
def checker():
    from spo_agents.envs.answers import AnswerChecker

    c = AnswerChecker(workers=1, timeout_s=10.0)
    yield c
    c.close()
