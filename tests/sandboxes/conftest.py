"""Fixtures shared by the sandbox suites: one `backend` fixture parametrised over every registered
backend. A backend that is not available here is skipped with its reason; `docker` and `e2b`
parameters carry their markers, so the default run exercises `local` and `pytest -m docker`
runs the same suites against Docker.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest

from spo_agents.sandboxes import SandboxBackend, SandboxLimits, available_backends, make_backend

# Markers a backend's parameter carries (its tests then run only when that marker is selected).
BACKEND_MARKS = {"docker": pytest.mark.docker, "e2b": pytest.mark.e2b}
# Options the suites build each backend with (a backend's own defaults otherwise).
BACKEND_OPTIONS: dict[str, dict] = {}
# Further configurations of a backend, run with `-m slow`: id -> (backend name, options).
VARIANTS: dict[str, tuple[str, dict]] = {
    "local-unshare": ("local", {"isolation": "unshare"}),
    "local-none": ("local", {"isolation": "none"}),
}


def backend_params() -> list:
    params = []
    avail = available_backends()
    for name, (ok, reason) in sorted(avail.items()):
        marks = [BACKEND_MARKS[name]] if name in BACKEND_MARKS else []
        if not ok:
            marks.append(pytest.mark.skip(reason=f"sandbox backend `{name}` is not available: {reason}"))
        params.append(pytest.param((name, BACKEND_OPTIONS.get(name, {})), marks=marks, id=name))
    for vid, (name, options) in VARIANTS.items():
        ok, reason = avail.get(name, (False, "not registered"))
        marks = [pytest.mark.slow] + ([] if ok else [pytest.mark.skip(reason=f"`{name}` is not available: {reason}")])
        params.append(pytest.param((name, options), marks=marks, id=vid))
    return params


@pytest.fixture(scope="session", params=backend_params())
def backend(request: pytest.FixtureRequest) -> Iterator[SandboxBackend]:
    name, options = request.param
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # isolation `none` warns, as it should
        b = make_backend(name, **options)
    b.options = options  # the suites rebuild it with the same options when they need a fresh one
    yield b
    b.close()


def limits(**overrides) -> SandboxLimits:
    """Limits the suites use unless a test says otherwise."""
    base = dict(timeout_s=10.0, memory_mb=512, max_output_bytes=64 * 1024)
    base.update(overrides)
    return SandboxLimits(**base)


def session_processes(backend: SandboxBackend) -> list[int] | None:
    """Host pids of processes that belong to sessions (None when the backend cannot tell).

    For `local`: every process under the worker's zygote.
    """
    pid = getattr(backend, "worker_pid", None)
    if pid is None:
        return None if backend.name != "local" else []
    import psutil

    try:
        node = psutil.Process(pid)
        # bubblewrap: bwrap -> bwrap (pid 1 inside) -> worker main -> zygote -> sessions;
        # unshare: worker main -> zygote -> sessions; none: zygote -> sessions.
        hops = 1 if backend.isolation != "none" else 0
        while node.name() == "bwrap" or hops:
            if node.name() != "bwrap":
                hops -= 1
            kids = node.children()
            if not kids:
                return []
            node = kids[0]
        return [c.pid for c in node.children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE]
    except psutil.NoSuchProcess:
        return []


def describe_processes(pids) -> str:
    """pid, state, parent and command line of each pid (for failure messages)."""
    import psutil

    out = []
    for pid in sorted(pids):
        try:
            p = psutil.Process(pid)
            with open(f"/proc/{pid}/status") as f:
                nspid = next((line.split(":", 1)[1].split() for line in f if line.startswith("NSpid")), [])
            out.append(f"{pid} {p.status()} ppid={p.ppid()} nspid={'/'.join(nspid)} {' '.join(p.cmdline())[:60]!r}")
        except psutil.NoSuchProcess:
            out.append(f"{pid} gone")
    return "; ".join(out)
