"""`spo_agents.processes.LiveRegistry`: what is live is stopped at exit, and only what is live."""

from __future__ import annotations

import atexit
import gc
import subprocess
import sys
import textwrap

import pytest

from spo_agents.processes import LiveRegistry


class Thing:
    def __init__(self, name: str, log: list[str], fail: bool = False) -> None:
        self.name, self.log, self.fail = name, log, fail

    def stop(self) -> None:
        self.log.append(self.name)
        if self.fail:
            raise RuntimeError(f"{self.name} would not stop")


def test_the_exit_hook_is_registered_on_the_first_add_only(monkeypatch):
    hooks = []
    monkeypatch.setattr(atexit, "register", lambda f, *a, **k: hooks.append(f) or f)
    reg: LiveRegistry[Thing] = LiveRegistry("thing", Thing.stop)
    assert hooks == [] and not reg.hooked
    log: list[str] = []
    a, b = Thing("a", log), Thing("b", log)
    reg.add(a)
    reg.add(b)
    assert hooks == [reg.stop_all] and reg.hooked


def test_stop_all_stops_newest_first_and_survives_a_failure(monkeypatch):
    monkeypatch.setattr(atexit, "register", lambda f, *a, **k: f)
    log: list[str] = []
    things = [Thing("a", log), Thing("b", log, fail=True), Thing("c", log)]
    reg: LiveRegistry[Thing] = LiveRegistry("thing", Thing.stop)
    for t in things:
        reg.add(t)
    reg.stop_all()
    assert log == ["c", "b", "a"]
    assert len(reg) == 0 and not reg


def test_discard_forgets_a_thing_stopped_cleanly(monkeypatch):
    monkeypatch.setattr(atexit, "register", lambda f, *a, **k: f)
    log: list[str] = []
    a, b = Thing("a", log), Thing("b", log)
    reg: LiveRegistry[Thing] = LiveRegistry("thing", Thing.stop)
    reg.add(a)
    reg.add(b)
    reg.discard(a)
    reg.discard(Thing("never added", log))  # no error
    assert a not in reg and b in reg
    reg.stop_all()
    assert log == ["b"]


def test_stop_may_discard_itself(monkeypatch):
    """A `stop` that forgets its own thing (as a server's `stop` does) does not upset the sweep."""
    monkeypatch.setattr(atexit, "register", lambda f, *a, **k: f)
    log: list[str] = []
    reg: LiveRegistry[Thing] = LiveRegistry("thing", lambda t: (t.stop(), reg.discard(t)))
    things = [Thing(name, log) for name in "abc"]
    for t in things:
        reg.add(t)
    reg.stop_all()
    assert log == ["c", "b", "a"] and len(reg) == 0


@pytest.mark.parametrize("weak", [True, False])
def test_a_weak_registry_forgets_what_was_dropped_a_strong_one_keeps_it(monkeypatch, weak):
    monkeypatch.setattr(atexit, "register", lambda f, *a, **k: f)
    log: list[str] = []
    reg: LiveRegistry[Thing] = LiveRegistry("thing", Thing.stop, weak=weak)
    reg.add(Thing("dropped", log))
    gc.collect()
    reg.stop_all()
    assert log == ([] if weak else ["dropped"])


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_what_is_live_is_stopped_when_the_interpreter_exits():
    proc = run_python(
        """
        from spo_agents.processes import LiveRegistry

        class Server:
            def __init__(self, name): self.name = name
            def stop(self): print("stopped", self.name, flush=True)

        reg = LiveRegistry("server", Server.stop, weak=False)
        a, b = Server("a"), Server("b")
        reg.add(a); reg.add(b); reg.discard(a)
        print("main done", flush=True)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["main done", "stopped b"]


def test_importing_the_sandboxes_servers_and_envs_registers_no_exit_hook():
    proc = run_python(
        """
        import atexit, logging
        hooks = []
        real = atexit.register
        atexit.register = lambda f, *a, **k: hooks.append(getattr(f, "__module__", "") or "") or real(f, *a, **k)
        import spo_agents.processes, spo_agents.sandboxes, spo_agents.sandboxes.local
        import spo_agents.sandboxes.docker.backend, spo_agents.sandboxes.e2b
        import spo_agents.serving.vllm_server, spo_agents.envs, spo_agents.envs.answers
        print([m for m in hooks if m.startswith("spo_agents")])
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
