"""The `docker` sandbox backend: one container per session, kept warm in a pool.

Each session owns one container started from a configurable image (default
`spo-agents-sandbox:latest`, built offline by `make docker-engine` or from `./Dockerfile`). The
container's main process is a small supervisor (`driver.py`, sent on the command line, so any
image with Python 3.8+ works) that the host drives over the container's attached stdin / stdout;
the supervisor forks the worker interpreter that runs the code. A call costs a socket round trip
(about 1 ms) instead of a `docker exec` (100-180 ms here; `bench/docker_sandbox.py`). Variables
persist between `run` calls; a stateless session uses a fresh worker for each call.

What is covered (each container):
- no network (`network_mode=none`, only a loopback interface);
- read-only root file system; a size-limited `nosuid,nodev,noexec` tmpfs on `/tmp`, the work dir
  (`disk_mb`);
- the code runs as uid 1000 with no capabilities and `no-new-privileges`; the supervisor keeps
  only CAP_SETUID/SETGID/KILL, so the code can neither signal it nor read its memory, and it
  never holds the host channel; docker's init is pid 1;
- cgroup limits: memory (`memory_mb`, no swap), processes (`max_processes`), CPU (`cpus`);
  rlimits: open files, file size, no core dumps; per-call CPU seconds (`cpu_s`) in the worker;
- a wall-clock timeout per call, enforced by the supervisor: it kills every process of the code
  (everything in the container but itself and init), keeps the output read so far and forks a new
  worker (`timed_out`, `session_restarted`). A crash (`os._exit`, a signal, the OOM killer, which
  is pointed at the worker) is reported the same way, with `memory_exceeded` for OOM kills. If the
  supervisor itself does not answer within `HOST_GRACE_S` after the timeout, the host kills the
  container and continues the session in a fresh one (a timed-out result);
- a container that ends under a call by no doing of the code (killed from outside, the engine or
  the supervisor failing: the code cannot signal the supervisor) raises `SandboxError`, an
  infrastructure failure; the next call continues in a fresh container and reports
  `session_restarted`. A container the kernel's OOM killer ended (its memory limit) is the code's
  doing and stays a result with `memory_exceeded`;
- cleanup: containers carry the labels `spo-agents.sandbox`, `spo-agents.owner` (host:pid) and
  `spo-agents.backend`; `close()` removes a session's container, `aclose()` the pool and every
  container of the backend (found by label), an `atexit` hook does the same at interpreter exit,
  and a new backend removes containers left by dead processes of this host. If the host process
  is killed outright, its containers' stdin closes, so their supervisors kill everything and
  exit; the stopped containers are removed by the next backend or `setup-engine.sh stop`.

What is not covered:
- the kernel is shared with the host (containers are namespaces + cgroups, not a VM); a kernel
  exploit escapes. Use `e2b` (microVMs) or gVisor (`runtime="runsc"`) for hostile code at scale;
- the code can forge the fields its worker reports (`exit_status`, `exception`), as any code can
  print anything; `timed_out`, `session_restarted`, `memory_exceeded` from OOM kills, and the
  output itself are measured by the supervisor;
- `cpu_s` counts the worker process only (processes the code spawns are bounded by the wall
  clock and the CPU quota);
- output is lost only when the supervisor or the container dies (then the fact is reported).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import select
import socket
import struct
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from spo_agents.errors import SandboxError
from spo_agents.sandboxes.base import SandboxBackend, SandboxLimits, SandboxResult, SandboxSession, merge_limits

DEFAULT_IMAGE = "spo-agents-sandbox:latest"
LABEL = "spo-agents.sandbox"
OWNER_LABEL = "spo-agents.owner"
BACKEND_LABEL = "spo-agents.backend"
#: The in-container supervisor enforces a call's timeout; the host kills the whole container only
#: when the supervisor has not answered this long after the timeout (it is wedged or gone).
HOST_GRACE_S = 5.0
#: Exit status reported for a run the host killed (the shell's 128 + SIGKILL).
KILLED_STATUS = 137


def engine_url(base_url: str | None = None) -> str | None:
    """The Docker engine to use: `base_url`, else `DOCKER_HOST`, else the private engine of
    `setup-engine.sh` when its socket exists, else `None` (the SDK's default socket)."""
    if base_url:
        return base_url
    if os.environ.get("DOCKER_HOST"):
        return os.environ["DOCKER_HOST"]
    home = os.environ.get("SPO_DOCKER_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "spo-agents", "docker"
    )
    sock = os.path.join(home, "docker.sock")
    return f"unix://{sock}" if os.path.exists(sock) else None


def _api(base_url: str | None, timeout: float = 60.0, pool: int = 10) -> Any:
    import docker  # optional extra: imported only when a docker backend is used

    if base_url is None:
        return docker.from_env(timeout=int(timeout), max_pool_size=pool).api
    return docker.APIClient(base_url=base_url, timeout=int(timeout), max_pool_size=pool)


_OPTIONS = (
    "image",
    "pool_size",
    "limits",
    "cpus",
    "user",
    "base_url",
    "runtime",
    "preload",
    "start_timeout_s",
    "max_workers",
)


def driver_source() -> str:
    """The in-container driver program (sent as `python3 -c`)."""
    return (Path(__file__).with_name("driver.py")).read_text(encoding="utf-8")


#: Limits fixed when a container starts; `timeout_s` and `cpu_s` travel with each call instead.
_CONTAINER_LIMITS = ("memory_mb", "max_processes", "max_open_files", "max_file_size_mb", "max_output_bytes", "disk_mb")


@dataclass(frozen=True)
class _Key:
    """What makes two containers interchangeable in the warm pool."""

    stateless: bool
    limits: tuple[tuple[str, Any], ...]

    @staticmethod
    def of(stateless: bool, limits: SandboxLimits) -> _Key:
        fields = asdict(limits)
        return _Key(stateless, tuple((k, fields[k]) for k in _CONTAINER_LIMITS if k in fields))

    def limits_obj(self) -> SandboxLimits:
        return SandboxLimits(**dict(self.limits))


class _EngineGone(Exception):
    """The container's stream closed: the driver (or the whole container) exited."""


class _Box:
    """One running container and the demultiplexed stream to its driver."""

    def __init__(self, cid: str, sock: socket.socket, key: _Key) -> None:
        self.id, self.sock, self.key = cid, sock, key
        self._raw = bytearray()  # docker's multiplexed stream, not yet split
        self._out = bytearray()  # the driver's channel (stdout stream)
        self.err = bytearray()  # the container's stderr stream (start-up failures), capped

    def send(self, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode("utf-8")
        self.sock.settimeout(30.0)
        try:
            self.sock.sendall(struct.pack(">I", len(data)) + data)
        except OSError as e:
            raise _EngineGone(str(e)) from e

    def recv(self, deadline: float) -> dict[str, Any]:
        """The next message; `socket.timeout` past `deadline`, `_EngineGone` on end of stream."""
        while True:
            if len(self._out) >= 4:
                (n,) = struct.unpack(">I", self._out[:4])
                if len(self._out) >= 4 + n:
                    body = bytes(self._out[4 : 4 + n])
                    del self._out[: 4 + n]
                    return json.loads(body.decode("utf-8"))
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("deadline passed")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 16)
            except socket.timeout:
                raise
            except OSError as e:
                raise _EngineGone(str(e)) from e
            if not chunk:
                raise _EngineGone("end of stream")
            self._demux(chunk)

    def _demux(self, chunk: bytes) -> None:
        # Docker's attach stream for a non-TTY container: 8-byte header (stream, 0, 0, 0,
        # big-endian payload size), then the payload.
        self._raw += chunk
        while len(self._raw) >= 8:
            stream, size = self._raw[0], struct.unpack(">I", self._raw[4:8])[0]
            if len(self._raw) < 8 + size:
                return
            payload = bytes(self._raw[8 : 8 + size])
            del self._raw[: 8 + size]
            if stream == 1:
                self._out += payload
            elif len(self.err) < 65536:
                self.err += payload[: 65536 - len(self.err)]

    def alive(self) -> bool:
        """False when the container's end of the stream has closed (checked without blocking)."""
        try:
            ready, _, _ = select.select([self.sock], [], [], 0)
            return not ready or self.sock.recv(1, socket.MSG_PEEK) != b""
        except (OSError, ValueError):
            return False

    def close_stream(self) -> None:
        # shutdown first: it wakes a thread blocked in `recv` on this socket (close alone does not).
        for op in (lambda: self.sock.shutdown(socket.SHUT_RDWR), self.sock.close):
            try:
                op()
            except OSError:
                pass


# --- process-wide cleanup --------------------------------------------------------------------
# Strong references: a backend dropped without `aclose()` still has its containers removed at exit.
_BACKENDS: set[DockerBackend] = set()
_ATEXIT_LOCK = threading.Lock()
_ATEXIT_REGISTERED = False


def _remove_all_at_exit() -> None:
    for backend in list(_BACKENDS):
        backend._shutdown(wait=False)


def _register_atexit() -> None:
    global _ATEXIT_REGISTERED
    with _ATEXIT_LOCK:
        if not _ATEXIT_REGISTERED:
            atexit.register(_remove_all_at_exit)
            _ATEXIT_REGISTERED = True


class DockerBackend(SandboxBackend):
    """Sessions in Docker containers (see the module docstring for guarantees and limits).

    Arguments: `image` (needs `python3`), `pool_size` (warm containers kept per distinct
    (stateless, limits) pair; 0 disables the pool), `limits` (defaults for sessions), `cpus`
    (CPU quota per container), `user` (`uid:gid` the code runs as), `base_url` (the engine; see
    `engine_url`), `runtime`
    (e.g. `runsc` for gVisor), `preload` (modules imported when a container starts, e.g.
    `("numpy", "sympy")`: slower start, faster first call), `start_timeout_s`, `max_workers`
    (threads for engine calls and in-flight `run`s: each call in flight holds one), and any
    `SandboxLimits` field (`timeout_s`, `memory_mb`, ...) to override one default limit.
    """

    name = "docker"

    def __init__(
        self,
        image: str = DEFAULT_IMAGE,
        *,
        pool_size: int = 2,
        limits: SandboxLimits | None = None,
        cpus: float | None = 1.0,
        user: str = "1000:1000",
        base_url: str | None = None,
        runtime: str | None = None,
        preload: tuple[str, ...] | list[str] = (),
        start_timeout_s: float = 60.0,
        max_workers: int = 128,
        **limit_fields: Any,
    ) -> None:
        limits = merge_limits("docker", limits, limit_fields, _OPTIONS)
        if pool_size < 0:
            raise SandboxError(f"`pool_size` must be >= 0, got {pool_size}; use 0 to start every container on demand")
        self.image, self.pool_size, self.limits = image, int(pool_size), limits or SandboxLimits()
        self.cpus, self.user, self.runtime, self.preload = cpus, user, runtime, tuple(preload)
        self.base_url = engine_url(base_url)
        self.start_timeout_s, self._max_workers = float(start_timeout_s), int(max_workers)
        self.backend_id = uuid.uuid4().hex[:12]
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self._lock = threading.Lock()
        self._pools: dict[_Key, deque[_Box]] = {}
        self._starting: dict[_Key, int] = {}
        self._live: dict[str, _Box] = {}  # every container of this backend not yet removed
        self._executor: ThreadPoolExecutor | None = None
        self._api_client: Any = None
        self._closed = False
        self._reaped = False
        self._driver = driver_source()
        _BACKENDS.add(self)
        _register_atexit()

    # --- discovery ---------------------------------------------------------------------------
    @classmethod
    def available(cls, image: str = DEFAULT_IMAGE, base_url: str | None = None) -> tuple[bool, str]:
        """Whether the SDK is installed, the engine answers and `image` exists, and why not."""
        try:
            import docker  # noqa: F401
        except ImportError:
            return False, "the Docker SDK is not installed: `pip install 'spo-agents[docker]'`"
        url = engine_url(base_url)
        where = url or "the default Docker socket"
        try:
            api = _api(url, timeout=5)
            api.ping()
        except Exception as e:  # noqa: BLE001 - any failure means "not available", with the reason
            return (
                False,
                f"no Docker engine answers at {where} ({type(e).__name__}: {e}); start one with `make docker-engine`",
            )
        try:
            api.inspect_image(image)
        except Exception as e:  # noqa: BLE001
            return (
                False,
                f"image `{image}` not found at {where} ({type(e).__name__}); build it with `make docker-engine`",
            )
        finally:
            api.close()
        return True, f"Docker engine at {where}, image `{image}`"

    @property
    def isolation(self) -> str:
        return (
            "docker (container per session: network none, read-only root, tmpfs /tmp, code as uid "
            f"{self.user.split(':')[0]} without capabilities, cgroup memory/pids/cpu limits"
            + (f", runtime {self.runtime}" if self.runtime else "")
            + ")"
        )

    # --- the async protocol --------------------------------------------------------------------
    async def open_session(
        self, *, stateless: bool | None = None, limits: SandboxLimits | None = None
    ) -> DockerSession:
        limits = limits or self.limits
        key = _Key.of(bool(stateless), limits)
        box = await self._in_thread(self._acquire, key)
        return DockerSession(self, key, box, limits)

    async def warm(self, n: int | None = None, *, stateless: bool = False, limits: SandboxLimits | None = None) -> int:
        """Fill the pool for these settings with `n` (default `pool_size`) containers and wait
        until they are ready; returns how many are waiting."""
        key = _Key.of(stateless, limits or self.limits)
        want = self.pool_size if n is None else int(n)

        def fill() -> int:
            with self._lock:
                missing = want - len(self._pools.get(key, ()))
            if missing > 0:
                ex = self._ensure_executor()
                boxes = list(ex.map(lambda _: self._start_box(key), range(missing)))
                with self._lock:
                    self._pools.setdefault(key, deque()).extend(boxes)
            with self._lock:
                return len(self._pools.get(key, ()))

        return await asyncio.to_thread(fill)

    async def aclose(self) -> None:
        await asyncio.to_thread(self._shutdown, True)

    # --- blocking internals (run in the backend's threads) --------------------------------------
    async def _in_thread(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._ensure_executor(), fn, *args)

    def _ensure_executor(self) -> ThreadPoolExecutor:
        _BACKENDS.add(self)  # again, if it is used after `aclose()`
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._max_workers, thread_name_prefix="spo-docker")
                self._closed = False
            return self._executor

    @property
    def _api(self) -> Any:
        with self._lock:
            if self._api_client is None:
                try:
                    self._api_client = _api(self.base_url, pool=self._max_workers + 4)
                except Exception as e:  # noqa: BLE001
                    raise SandboxError(
                        f"cannot connect to the Docker engine at {self.base_url or 'the default socket'}: {e}. "
                        "Start one with `make docker-engine` or set DOCKER_HOST."
                    ) from e
            return self._api_client

    def _acquire(self, key: _Key) -> _Box:
        self._reap_dead_owners()
        box = self._pop(key)
        if box is None:
            box = self._start_box(key)
        self._refill(key)
        return box

    def _pop(self, key: _Key) -> _Box | None:
        """A warm container whose stream is still open (one that died while waiting is dropped)."""
        while True:
            with self._lock:
                pool = self._pools.get(key)
                box = pool.popleft() if pool else None
            if box is None or box.alive():
                return box
            self._discard_later(box)

    def _refill(self, key: _Key) -> None:
        with self._lock:
            if self._closed or self._executor is None:
                return
            need = self.pool_size - len(self._pools.get(key, ())) - self._starting.get(key, 0)
            if need <= 0:
                return
            self._starting[key] = self._starting.get(key, 0) + need
            executor = self._executor
        for i in range(need):
            try:
                executor.submit(self._fill_one, key)
            except RuntimeError:  # the executor shut down (backend closed, interpreter exiting)
                with self._lock:
                    self._starting[key] -= need - i
                return

    def _fill_one(self, key: _Key) -> None:
        try:
            box = self._start_box(key)
        except Exception:  # noqa: BLE001 - the next acquire starts a container itself and reports
            return
        finally:
            with self._lock:
                self._starting[key] -= 1
        with self._lock:
            if not self._closed:
                self._pools.setdefault(key, deque()).append(box)
                return
        self._remove(box)

    def _host_config(self, limits: SandboxLimits) -> Any:
        from docker.types import Ulimit

        ulimits = [Ulimit(name="core", soft=0, hard=0)]
        if limits.max_open_files:
            ulimits.append(Ulimit(name="nofile", soft=int(limits.max_open_files), hard=int(limits.max_open_files)))
        if limits.max_file_size_mb:
            size = int(limits.max_file_size_mb) * 2**20
            ulimits.append(Ulimit(name="fsize", soft=size, hard=size))
        disk_mb = int(getattr(limits, "disk_mb", None) or 256)
        kwargs: dict[str, Any] = dict(
            network_mode="none",
            read_only=True,
            tmpfs={"/tmp": f"rw,nosuid,nodev,noexec,size={disk_mb}m,mode=1777"},
            cap_drop=["ALL"],
            # The supervisor's only privileges: switch the worker to `user`, signal its processes.
            cap_add=["SETUID", "SETGID", "KILL"],
            security_opt=["no-new-privileges"],
            init=True,
            ulimits=ulimits,
            ipc_mode="private",
        )
        if limits.memory_mb:
            kwargs["mem_limit"] = f"{int(limits.memory_mb)}m"
            kwargs["memswap_limit"] = f"{int(limits.memory_mb)}m"
        if limits.max_processes:
            kwargs["pids_limit"] = int(limits.max_processes) + 4  # docker-init, the supervisor, slack
        if self.cpus:
            kwargs["nano_cpus"] = int(float(self.cpus) * 1e9)
        if self.runtime:
            kwargs["runtime"] = self.runtime
        return self._api.create_host_config(**kwargs)

    def _start_box(self, key: _Key) -> _Box:
        """Create, attach and start one container and wait for its driver's `ready`."""
        import docker.errors

        limits = key.limits_obj()
        uid, _, gid = self.user.partition(":")
        cfg = {
            "stateless": key.stateless,
            "max_output_bytes": limits.max_output_bytes,
            "preload": list(self.preload),
            "uid": int(uid),
            "gid": int(gid or uid),
            "workdir": "/tmp",
        }
        api = self._api
        cid = None
        try:
            c = api.create_container(
                self.image,
                command=["python3", "-u", "-c", self._driver, json.dumps(cfg)],
                user="0:0",  # the supervisor; it runs the code as `self.user` (see driver.py)
                working_dir="/tmp",
                environment={"HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"},
                # stdin_open also sets StdinOnce: when the host's attach connection goes away, the
                # driver's stdin closes and it exits.
                stdin_open=True,
                tty=False,
                network_disabled=True,
                labels={LABEL: "1", OWNER_LABEL: self.owner, BACKEND_LABEL: self.backend_id},
                host_config=self._host_config(limits),
            )
            cid = c["Id"]
            with self._lock:
                self._live[cid] = None  # type: ignore[assignment]  # known before it is attached
            sock = api.attach_socket(cid, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            box = _Box(cid, getattr(sock, "_sock", sock), key)
            with self._lock:
                self._live[cid] = box
            api.start(cid)
            msg = box.recv(time.monotonic() + self.start_timeout_s)
            if msg.get("op") != "ready":
                raise SandboxError(f"the sandbox driver answered {msg!r} instead of `ready`")
            return box
        except docker.errors.ImageNotFound as e:
            self._remove_id(cid)
            raise SandboxError(
                f"image `{self.image}` not found on the Docker engine at {self.base_url or 'the default socket'}: "
                "build it with `make docker-engine` (offline) "
                "or `docker build -t spo-agents-sandbox:latest sandboxes/docker`"
            ) from e
        except SandboxError:
            self._remove_id(cid)
            raise
        except (_EngineGone, socket.timeout) as e:
            err = bytes(box.err).decode("utf-8", "replace").strip() if cid and self._live.get(cid) else ""
            self._remove_id(cid)
            raise SandboxError(
                f"the sandbox container from `{self.image}` did not start its driver ({e})"
                + (f"; its stderr: {err[-2000:]}" if err else "")
                + ". The image needs `python3` on PATH."
            ) from e
        except Exception as e:  # noqa: BLE001 - engine / API failure: infrastructure
            self._remove_id(cid)
            raise SandboxError(
                f"could not start a sandbox container from `{self.image}` on {self.base_url or 'the default socket'}: "
                f"{type(e).__name__}: {e}. Is the engine up (`make docker-engine`)?"
            ) from e

    def _remove(self, box: _Box) -> None:
        box.close_stream()
        self._remove_id(box.id)

    def _remove_id(self, cid: str | None) -> None:
        if cid is None:
            return
        box = self._live.get(cid)
        if box is not None:
            box.close_stream()
        try:
            self._api.remove_container(cid, force=True)
        except Exception as e:  # noqa: BLE001
            if "No such container" not in str(e) and "404" not in str(e):
                # Leave it in `_live`: `aclose` and the exit hook sweep by label again.
                return
        with self._lock:
            self._live.pop(cid, None)

    def _discard_later(self, box: _Box) -> None:
        box.close_stream()
        with self._lock:
            ex = self._executor
        try:
            if ex is not None:
                ex.submit(self._remove_id, box.id)
                return
        except RuntimeError:  # shut down meanwhile: remove it here
            pass
        self._remove_id(box.id)

    def _reap_dead_owners(self) -> None:
        """Remove containers left by processes of this host that died without cleaning up."""
        if self._reaped:
            return
        self._reaped = True
        host = socket.gethostname()
        try:
            stale = self._api.containers(all=True, filters={"label": LABEL})
        except Exception:  # noqa: BLE001 - best effort; starting a container will report the engine
            return
        for c in stale:
            owner = (c.get("Labels") or {}).get(OWNER_LABEL, "")
            h, _, pid = owner.rpartition(":")
            if h != host or not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                os.kill(int(pid), 0)
                continue  # still alive
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            try:
                self._api.remove_container(c["Id"], force=True)
            except Exception:  # noqa: BLE001
                pass

    def _shutdown(self, wait: bool = True) -> None:
        """Remove every container of this backend (pooled, in use, starting)."""
        _BACKENDS.discard(self)
        with self._lock:
            self._closed = True
            boxes = [b for pool in self._pools.values() for b in pool]
            self._pools.clear()
            executor, self._executor = self._executor, None
        for b in boxes:
            b.close_stream()
        if executor is not None:
            executor.shutdown(wait=wait, cancel_futures=True)
        if self._api_client is None and not self._live:
            return
        ids = set(self._live)
        try:
            ids |= {
                c["Id"] for c in self._api.containers(all=True, filters={"label": f"{BACKEND_LABEL}={self.backend_id}"})
            }
        except Exception:  # noqa: BLE001 - engine gone: nothing more can be removed
            pass
        for cid in ids:
            self._remove_id(cid)

    # --- one call ------------------------------------------------------------------------------
    def _run_blocking(self, session: DockerSession, code: str, timeout: float | None) -> SandboxResult:
        with session._run_lock:
            return self._run_locked(session, code, timeout)

    def _run_locked(self, session: DockerSession, code: str, timeout: float | None) -> SandboxResult:
        limits = session.limits
        t = float(limits.timeout_s if timeout is None else timeout)
        restarted_before, session._lost = session._lost, False
        if session.box is None:  # lost in an earlier call and no warm container was ready then
            box = self._acquire(session.key)
            with session._box_lock:
                if not session._closed:
                    session.box, box = box, None
            if box is not None:
                self._remove(box)
            restarted_before = True
        box = session.box
        if session._closed or box is None:
            raise SandboxError("this docker sandbox session is closed; open a new one with `backend.open_session()`")
        start = time.monotonic()
        try:
            box.send({"code": code, "timeout": t, "cpu_s": limits.cpu_s})
            msg = box.recv(start + t + HOST_GRACE_S)
        except socket.timeout:
            self._replace(session)
            if session._closed:
                return _closed_result(time.monotonic() - start)
            return SandboxResult(
                stderr=f"timed out after {t:g} s and the container did not recover; the session was restarted "
                "in a new container (earlier variables are lost)",
                exit_status=KILLED_STATUS,
                timed_out=True,
                session_restarted=True,
                duration_s=time.monotonic() - start,
                extra={"container": box.id[:12]},
            )
        except _EngineGone as e:
            if session._closed:
                return _closed_result(time.monotonic() - start)
            state = self._inspect_state(box.id)
            self._replace(session)
            status = int(state.get("ExitCode") or 0) or KILLED_STATUS
            if not state.get("OOMKilled"):
                session._lost = not session.stateless
                raise SandboxError(
                    f"the session's container {box.id[:12]} ended (status {status}) while a call ran, not by the "
                    "code's doing: it was killed from outside, or the engine or the sandbox's supervisor failed. "
                    "The session's state is lost; its next call continues in a new container (`session_restarted`)."
                ) from e
            return SandboxResult(
                stderr=f"the session's container was killed by the out-of-memory killer (limit {limits.memory_mb} MB); "
                "the session was restarted in a new container (earlier variables are lost)",
                exit_status=status,
                memory_exceeded=True,
                session_restarted=True,
                duration_s=time.monotonic() - start,
                extra={"container": box.id[:12]},
            )
        lost = bool(msg.get("worker_lost"))
        stderr = msg["stderr"]
        if lost:
            if msg.get("timed_out"):
                note = f"timed out after {t:g} s"
            else:
                note = f"the session's interpreter exited with status {msg['exit_status']}"
            if int(msg.get("oom_kills") or 0) > 0:
                note += f" (killed by the out-of-memory killer, limit {limits.memory_mb} MB)"
            note += "; the session was restarted (earlier variables are lost)" if not session.stateless else ""
            stderr += ("\n" if stderr and not stderr.endswith("\n") else "") + note
        return SandboxResult(
            stdout=msg["stdout"],
            stderr=stderr,
            exit_status=int(msg["exit_status"]),
            exception=msg["exception"],
            timed_out=bool(msg.get("timed_out")) or bool(msg.get("cpu_exceeded")),
            memory_exceeded=bool(msg.get("memory_error")) or int(msg.get("oom_kills") or 0) > 0,
            output_truncated=bool(msg.get("output_truncated")),
            session_restarted=restarted_before or lost,
            duration_s=time.monotonic() - start,
            extra={
                "container": box.id[:12],
                "run_s": msg.get("duration_s"),
                **({"cpu_exceeded": True} if msg.get("cpu_exceeded") else {}),
            },
        )

    def _inspect_state(self, cid: str) -> dict[str, Any]:
        # The stream closes a moment before the engine records the exit; wait for it briefly.
        state: dict[str, Any] = {}
        for _ in range(40):
            try:
                state = self._api.inspect_container(cid)["State"]
            except Exception:  # noqa: BLE001
                return state
            if not state.get("Running"):
                return state
            time.sleep(0.025)
        return state

    def _replace(self, session: DockerSession) -> None:
        """Kill the session's container; continue in a warm one if ready (else on the next call)."""
        with session._box_lock:
            old, session.box = session.box, None
        if old is not None:
            try:
                self._api.kill(old.id)
            except Exception:  # noqa: BLE001 - already dead
                pass
            self._discard_later(old)
        new = self._pop(session.key)
        self._refill(session.key)
        with session._box_lock:
            if not session._closed:
                session.box, new = new, None
        if new is not None:
            self._discard_later(new)

    def _close_session(self, session: DockerSession) -> None:
        with session._box_lock:
            session._closed = True
            box, session.box = session.box, None
        if box is not None:
            self._remove(box)


def _closed_result(duration: float) -> SandboxResult:
    return SandboxResult(
        exit_status=KILLED_STATUS,
        exception="the session was closed while the code ran",
        session_restarted=False,
        duration_s=duration,
    )


class DockerSession(SandboxSession):
    """One episode's interpreter in its own container. Calls on one session run one at a time."""

    def __init__(self, backend: DockerBackend, key: _Key, box: _Box, limits: SandboxLimits) -> None:
        self.backend, self.key, self.box = backend, key, box
        self.limits = limits
        self.stateless = key.stateless
        self._run_lock = threading.Lock()  # one call at a time (held in the backend's threads)
        self._box_lock = threading.Lock()  # guards `box` and `_closed`
        self._closed = False
        self._lost = False  # its container ended by no doing of the code: the next result says so

    @property
    def container_id(self) -> str | None:
        return self.box.id if self.box is not None else None

    async def run(self, code: str, timeout: float | None = None) -> SandboxResult:
        if self._closed:
            raise SandboxError("this docker sandbox session is closed; open a new one with `backend.open_session()`")
        return await self.backend._in_thread(self.backend._run_blocking, self, code, timeout)

    async def close(self) -> None:
        """Remove the container (a call in flight ends with "session closed"). Idempotent."""
        if self._closed:
            return
        await asyncio.to_thread(self.backend._close_session, self)


__all__ = ["DEFAULT_IMAGE", "LABEL", "OWNER_LABEL", "BACKEND_LABEL", "DockerBackend", "DockerSession", "engine_url"]
