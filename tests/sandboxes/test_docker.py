"""The `docker` backend's own tests (the shared contract and adversarial suites run it too).

Unmarked tests need no engine: engine discovery, availability without an engine, the attach
stream's demultiplexing, the driver's output keeping, and the driver's supervisor protocol run
as a plain subprocess. Tests marked `docker` run against a real engine (`make test-docker`):
container settings, isolation, limits, the warm pool and cleanup, including after the host
process dies.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from spo_agents.errors import SandboxError
from spo_agents.sandboxes.base import SandboxLimits
from spo_agents.sandboxes.docker import backend as dockermod
from spo_agents.sandboxes.docker import driver
from spo_agents.sandboxes.docker.backend import BACKEND_LABEL, LABEL, OWNER_LABEL, DockerBackend, engine_url
from spo_agents.sandboxes.docker.channel import Box, EngineGone
from spo_agents.sandboxes.docker.pool import Key

PY = sys.executable


# --- engine discovery and availability (no engine needed) ------------------------------------
def test_engine_url_prefers_explicit_then_docker_host_then_private_socket(monkeypatch, tmp_path):
    monkeypatch.setenv("SPO_DOCKER_HOME", str(tmp_path))
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    assert engine_url() is None  # no private socket yet: the SDK's default
    (tmp_path / "docker.sock").touch()
    assert engine_url() == f"unix://{tmp_path}/docker.sock"
    monkeypatch.setenv("DOCKER_HOST", "tcp://example:2375")
    assert engine_url() == "tcp://example:2375"
    assert engine_url("unix:///x.sock") == "unix:///x.sock"


def test_available_says_how_to_start_an_engine_when_none_answers(tmp_path):
    pytest.importorskip("docker", reason="the Docker SDK is not installed (`pip install 'spo-agents[docker]'`)")
    ok, reason = DockerBackend.available(base_url=f"unix://{tmp_path}/none.sock")
    assert ok is False
    assert "make docker-engine" in reason and "none.sock" in reason


def test_negative_pool_size_is_rejected_with_the_fix():
    with pytest.raises(SandboxError, match="pool_size"):
        DockerBackend(pool_size=-1)


def test_importing_the_backend_does_not_import_the_docker_sdk():
    code = "import sys, spo_agents.sandboxes.docker.backend\nprint('docker' in sys.modules)"
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --- the attach stream (no engine needed) ----------------------------------------------------
def _docker_frame(stream: int, payload: bytes) -> bytes:
    return bytes([stream, 0, 0, 0]) + struct.pack(">I", len(payload)) + payload


def _message(obj: dict) -> bytes:
    data = json.dumps(obj).encode()
    return struct.pack(">I", len(data)) + data


def test_box_demultiplexes_stdout_messages_from_stderr_noise():
    a, b = socket.socketpair()
    box = Box("c" * 64, b, key=None)  # type: ignore[arg-type]
    msg1, msg2 = _message({"op": "ready"}), _message({"n": 2, "text": "é" * 10})
    wire = (
        _docker_frame(2, b"warning on stderr\n")
        + _docker_frame(1, msg1[:3])  # a message split across frames
        + _docker_frame(1, msg1[3:] + msg2[:5])
        + _docker_frame(1, msg2[5:])
    )
    for i in range(0, len(wire), 7):  # and frames split across reads
        a.sendall(wire[i : i + 7])
    assert box.recv(time.monotonic() + 5) == {"op": "ready"}
    assert box.recv(time.monotonic() + 5) == {"n": 2, "text": "é" * 10}
    assert bytes(box.err) == b"warning on stderr\n"
    a.close()
    with pytest.raises(EngineGone):
        box.recv(time.monotonic() + 5)
    b.close()


def test_box_recv_times_out_at_the_deadline():
    a, b = socket.socketpair()
    box = Box("c" * 64, b, key=None)  # type: ignore[arg-type]
    t0 = time.monotonic()
    with pytest.raises(socket.timeout):
        box.recv(t0 + 0.2)
    assert 0.15 < time.monotonic() - t0 < 2.0
    a.close()
    b.close()


# --- the driver (no engine needed) ------------------------------------------------------------
def test_keep_holds_head_and_tail_and_says_how_much_was_cut():
    k = driver._Keep(10)
    k.add(b"HEAD-")
    k.add(b"x" * 1000)
    k.add(b"-TAIL")
    text, cut = k.text()
    assert cut
    assert text.startswith("HEAD-") and text.endswith("-TAIL")
    assert "1000 bytes of output cut" in text


def test_keep_leaves_short_output_alone():
    k = driver._Keep(10)
    k.add(b"0123")
    k.add(b"456789")
    assert k.text() == ("0123456789", False)


def test_kill_all_refuses_machine_wide_kill_outside_a_container_init():
    # This test process's parent is not a container's init: `kill(-1)` must never be used here.
    assert not driver._in_own_container()


class _DriverProcess:
    """The driver run as a plain subprocess (no container, no uid switch): protocol tests."""

    def __init__(self, tmp_path, **cfg):
        cfg = {"uid": None, "workdir": str(tmp_path), "max_output_bytes": 1000, **cfg}
        self.p = subprocess.Popen(
            [PY, "-c", dockermod.driver_source(), json.dumps(cfg)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.recv()["op"] == "ready"

    def recv(self) -> dict:
        head = self.p.stdout.read(4)
        return json.loads(self.p.stdout.read(struct.unpack(">I", head)[0]))

    def run(self, code: str, timeout: float = 5.0) -> dict:
        self.p.stdin.write(_message({"code": code, "timeout": timeout}))
        self.p.stdin.flush()
        return self.recv()

    def close(self) -> None:
        self.p.stdin.close()
        assert self.p.wait(10) == 0


@pytest.fixture
def drv(tmp_path) -> Iterator[_DriverProcess]:
    d = _DriverProcess(tmp_path)
    yield d
    d.close()


def test_driver_keeps_state_and_reports_exceptions(drv):
    assert drv.run("x = 20\nprint('set')")["stdout"] == "set\n"
    r = drv.run("print(x + 22)\nraise KeyError('k')")
    assert r["stdout"] == "42\n"
    assert r["exit_status"] == 1 and "KeyError: 'k'" in r["exception"] and not r["worker_lost"]


def test_driver_timeout_keeps_partial_output_and_loses_the_worker(drv):
    drv.run("x = 1")
    r = drv.run("import time\nprint('partial', flush=True)\ntime.sleep(60)", timeout=0.5)
    assert r["timed_out"] and r["worker_lost"] and r["exit_status"] == 137
    assert r["stdout"] == "partial\n"
    assert 0.4 < r["duration_s"] < 5
    after = drv.run("print('x' in globals())")
    assert after["stdout"] == "False\n" and not after["worker_lost"]


def test_driver_reports_a_crash_with_its_status_and_output(drv):
    r = drv.run("import os\nprint('bye', flush=True)\nos._exit(7)")
    assert r["worker_lost"] and not r["timed_out"]
    assert r["exit_status"] == 7 and r["stdout"] == "bye\n"


def test_driver_resumes_a_worker_that_stopped_itself(drv):
    r = drv.run("import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)\nprint('went on')", timeout=5.0)
    assert r["stdout"] == "went on\n" and not r["timed_out"] and not r["worker_lost"]


def test_driver_truncates_each_stream_to_head_and_tail(drv):
    r = drv.run("import sys\nprint('A' + 'x' * 50000 + 'Z')\nsys.stderr.write('short')")
    assert r["output_truncated"]
    assert r["stdout"].startswith("A") and r["stdout"].rstrip().endswith("Z")
    assert len(r["stdout"]) < 1000 + 100
    assert r["stderr"] == "short"


def test_stateless_driver_forgets_between_calls(tmp_path):
    d = _DriverProcess(tmp_path, stateless=True)
    try:
        assert d.run("y = 5\nprint(y)")["stdout"] == "5\n"
        assert "NameError" in d.run("print(y)")["exception"]
    finally:
        d.close()


# --- against a real engine ---------------------------------------------------------------------
_AVAILABLE = DockerBackend.available()
needs_engine = pytest.mark.skipif(not _AVAILABLE[0], reason=f"docker backend not available: {_AVAILABLE[1]}")


def _api():
    return dockermod._api(engine_url())


def _containers(label: str) -> list[dict]:
    api = _api()
    try:
        return api.containers(all=True, filters={"label": label})
    finally:
        api.close()


@pytest.fixture
async def be() -> DockerBackend:
    b = DockerBackend(pool_size=1)
    yield b
    await b.aclose()
    assert _containers(f"{BACKEND_LABEL}={b.backend_id}") == [], "containers left after aclose()"


def _limits(**kw) -> SandboxLimits:
    return SandboxLimits(**{"timeout_s": 10.0, "memory_mb": 256, "max_processes": 32, **kw})


@pytest.mark.docker
@needs_engine
async def test_container_settings(be):
    async with await be.open_session(limits=_limits(memory_mb=300, max_processes=20, disk_mb=48)) as s:
        info = be._api.inspect_container(s.container_id)
    hc, cfg = info["HostConfig"], info["Config"]
    assert hc["NetworkMode"] == "none" and cfg.get("NetworkDisabled") is True
    assert hc["ReadonlyRootfs"] is True
    assert hc["Memory"] == 300 * 2**20 and hc["MemorySwap"] == 300 * 2**20
    assert hc["PidsLimit"] == 24
    assert hc["NanoCpus"] == 1_000_000_000
    assert hc["CapDrop"] == ["ALL"] and sorted(hc["CapAdd"]) == ["KILL", "SETGID", "SETUID"]
    assert "no-new-privileges" in hc["SecurityOpt"]
    assert hc["Init"] is True
    assert "size=48m" in hc["Tmpfs"]["/tmp"] and "noexec" in hc["Tmpfs"]["/tmp"]
    assert cfg["Labels"][LABEL] == "1" and cfg["Labels"][OWNER_LABEL].endswith(f":{os.getpid()}")


@pytest.mark.docker
@needs_engine
async def test_code_runs_unprivileged_without_network_on_a_read_only_root(be):
    async with await be.open_session(limits=_limits()) as s:
        r = await s.run(
            textwrap.dedent("""
            import os, socket
            print(os.getuid(), os.getgid())
            print([name for _, name in socket.if_nameindex()])
            print([l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')][0])
            for p in ('/usr/x', '/x', '/tmp/ok'):
                try:
                    open(p, 'w').write('x'); print('wrote', p)
                except OSError as e:
                    print('denied', p, e.errno)
            """)
        )
    assert r.ok, r
    lines = r.stdout.splitlines()
    assert lines[0] == "1000 1000"
    assert lines[1] == "['lo']"
    assert int(lines[2], 16) == 0  # no capabilities in the code's process
    assert lines[3:] == ["denied /usr/x 30", "denied /x 30", "wrote /tmp/ok"]


@pytest.mark.docker
@needs_engine
async def test_process_limit_stops_forking(be):
    async with await be.open_session(limits=_limits(max_processes=16)) as s:
        r = await s.run(
            textwrap.dedent("""
            import os, time
            kids = []
            try:
                for _ in range(200):
                    pid = os.fork()
                    if pid == 0:
                        time.sleep(30); os._exit(0)
                    kids.append(pid)
            except OSError as e:
                print('stopped at', len(kids), e.errno)
            """),
            timeout=20,
        )
        after = await s.run("print('ok')")
    assert "stopped at" in r.stdout, r
    assert int(r.stdout.split()[2]) <= 16 + 4
    assert after.stdout == "ok\n"


@pytest.mark.docker
@needs_engine
async def test_out_of_memory_kills_the_worker_not_the_container(be):
    async with await be.open_session(limits=_limits(memory_mb=128)) as s:
        cid = s.container_id
        await s.run("x = 1")
        r = await s.run("b = []\nwhile True:\n    b.append(bytearray(8 * 2**20))", timeout=30)
        after = await s.run("print('x' in globals())")
        assert s.container_id == cid  # the supervisor survived and forked a new worker
    assert r.memory_exceeded and r.session_restarted and not r.timed_out, r
    assert "out-of-memory" in r.stderr
    assert after.stdout == "False\n"


@pytest.mark.docker
@needs_engine
async def test_timeout_restarts_the_worker_in_the_same_container(be):
    async with await be.open_session(limits=_limits()) as s:
        cid = s.container_id
        r = await s.run(
            "import subprocess, sys\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
            "while True: pass",
            timeout=1,
        )
        ps = await s.run("import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
        assert s.container_id == cid
    assert r.timed_out and r.session_restarted
    # Left: init, the supervisor, and the worker that runs this listing; the sleeper is gone.
    assert len(json.loads(ps.stdout)) == 3, ps.stdout


@pytest.mark.docker
@needs_engine
async def test_a_crash_leaves_no_process_of_the_code_behind(be):
    async with await be.open_session(limits=_limits()) as s:
        cid = s.container_id
        r = await s.run(
            textwrap.dedent("""
            import os, subprocess, sys
            subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)
            os._exit(9)
            """)
        )
        ps = await s.run("import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
        assert s.container_id == cid
    assert r.session_restarted and r.exit_status == 9
    assert len(json.loads(ps.stdout)) == 3, ps.stdout  # init, supervisor, the new worker


@pytest.mark.docker
@needs_engine
async def test_killing_the_supervisor_replaces_the_container_and_removes_the_old_one(be):
    async with await be.open_session(limits=_limits()) as s:
        old = s.container_id
        r = await s.run(
            "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nimport time\ntime.sleep(2)", timeout=5
        )
        # The worker is another uid: the kill is refused and the supervisor stays.
        assert s.container_id == old and not r.session_restarted, r
        be._api.kill(old)  # now from outside: an infrastructure failure, then a fresh container
        with pytest.raises(SandboxError, match="not by the code's doing"):
            await s.run("print('alive')")
        r2 = await s.run("print('alive')")
        assert r2.stdout == "alive\n" and r2.session_restarted and s.container_id != old
        r3 = await s.run("print('alive')")
        assert r3.ok and not r3.session_restarted
    for _ in range(100):
        if not any(c["Id"] == old for c in _containers(LABEL)):
            break
        await asyncio.sleep(0.05)
    assert not any(c["Id"] == old for c in _containers(LABEL))


@pytest.mark.docker
@needs_engine
async def test_warm_pool_hands_out_started_containers_and_refills():
    b = DockerBackend(pool_size=2)
    try:
        assert await b.warm() == 2
        pooled = {box.id for box in b._pool.waiting()}
        s = await b.open_session()
        assert s.container_id in pooled
        for _ in range(200):  # refilled in the background
            if len(b._pool.waiting()) == 2:
                break
            await asyncio.sleep(0.05)
        assert len(b._pool.waiting()) == 2
        assert len(_containers(f"{BACKEND_LABEL}={b.backend_id}")) == 3
        await s.close()
        assert len(_containers(f"{BACKEND_LABEL}={b.backend_id}")) == 2
        # Different limits are a different pool: a session with them starts its own container.
        s2 = await b.open_session(limits=SandboxLimits(memory_mb=200))
        assert s2.container_id not in pooled
        await s2.close()
    finally:
        await b.aclose()
        await b.aclose()  # idempotent
    assert _containers(f"{BACKEND_LABEL}={b.backend_id}") == []


_CHILD = """
import asyncio, sys
from spo_agents.sandboxes.docker.backend import DockerBackend
async def main():
    b = DockerBackend(pool_size=1)
    s = await b.open_session()
    print(s.container_id, flush=True)
    if sys.argv[1] == 'hang':
        await asyncio.sleep(600)
asyncio.run(main())
"""


@pytest.mark.docker
@needs_engine
def test_exit_hook_removes_containers_of_a_process_that_forgot_to_close():
    p = subprocess.run([PY, "-c", _CHILD, "exit"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    cid = p.stdout.strip()
    assert len(cid) == 64
    assert not any(c["Id"] == cid for c in _containers(LABEL))


@pytest.mark.docker
@needs_engine
def test_killed_host_process_leaves_nothing_running_and_is_reaped_later():
    p = subprocess.Popen([PY, "-c", _CHILD, "hang"], stdout=subprocess.PIPE, text=True)
    try:
        cid = p.stdout.readline().strip()
        owner = f"{socket.gethostname()}:{p.pid}"
        assert len(_containers(f"{OWNER_LABEL}={owner}")) >= 1
    finally:
        p.kill()
        p.wait(10)
    api = _api()
    try:
        for _ in range(200):  # stdin closes -> the supervisor exits -> the container stops
            if not api.inspect_container(cid)["State"]["Running"]:
                break
            time.sleep(0.05)
        assert not api.inspect_container(cid)["State"]["Running"]
        for c in _containers(f"{OWNER_LABEL}={owner}"):  # the pooled one stops too
            for _ in range(200):
                if not api.inspect_container(c["Id"])["State"]["Running"]:
                    break
                time.sleep(0.05)
            assert not api.inspect_container(c["Id"])["State"]["Running"]
    finally:
        api.close()
    b = DockerBackend(pool_size=0)
    b._reap_dead_owners()  # what every new backend does before its first container
    b.close()
    assert _containers(f"{OWNER_LABEL}={owner}") == []


@pytest.mark.docker
@needs_engine
async def test_missing_image_is_an_infrastructure_error_with_the_fix():
    b = DockerBackend(image="spo-agents-no-such-image:latest", pool_size=0)
    try:
        with pytest.raises(SandboxError, match="make docker-engine"):
            await b.open_session()
    finally:
        await b.aclose()
    assert _containers(f"{BACKEND_LABEL}={b.backend_id}") == []


def test_limit_fields_are_options_and_unknown_options_suggest_the_right_one():
    from spo_agents.errors import ConfigError
    from spo_agents.sandboxes import make_backend

    b = make_backend("docker", timeout_s=3, memory_mb=300, pool_size=0)
    assert (b.limits.timeout_s, b.limits.memory_mb, b.pool_size) == (3, 300, 0)
    with pytest.raises(ConfigError, match="Did you mean `timeout_s`"):
        make_backend("docker", timout_s=3)


@pytest.mark.docker
@needs_engine
async def test_cpu_seconds_limit_stops_the_call_and_keeps_the_session(be):
    async with await be.open_session(limits=_limits(cpu_s=1.0, timeout_s=20.0)) as s:
        await s.run("kept = 1")
        r = await s.run("while True:\n    pass")
        after = await s.run("print(kept)")
    assert r.timed_out and r.extra.get("cpu_exceeded") and not r.session_restarted, r
    assert r.duration_s < 10
    assert after.stdout == "1\n"


def test_pool_key_ignores_per_call_limits_but_not_container_limits():
    base = SandboxLimits(timeout_s=10.0, memory_mb=512)
    same = SandboxLimits(timeout_s=2.0, cpu_s=1.0, memory_mb=512)
    assert Key.of(False, base) == Key.of(False, same)
    assert Key.of(False, base) != Key.of(True, base)
    assert Key.of(False, base) != Key.of(False, SandboxLimits(memory_mb=256))
    assert Key.of(False, base) != Key.of(False, SandboxLimits(memory_mb=512, max_output_bytes=10))


@pytest.mark.docker
@needs_engine
async def test_a_pooled_container_that_died_while_waiting_is_not_handed_out():
    b = DockerBackend(pool_size=1)
    try:
        await b.warm()
        (dead,) = [box.id for box in b._pool.waiting()]
        b._api.kill(dead)
        for _ in range(100):
            if not b._api.inspect_container(dead)["State"]["Running"]:
                break
            await asyncio.sleep(0.05)
        async with await b.open_session() as s:
            assert s.container_id != dead
            r = await s.run("print('fresh')")
        assert r.stdout == "fresh\n" and not r.session_restarted
    finally:
        await b.aclose()
    assert _containers(f"{BACKEND_LABEL}={b.backend_id}") == []
