"""The `docker` sandbox backend: one container per session, kept warm in a pool.

Each container runs `driver.py` (sent on the command line, so any image with Python 3.8+ works),
a supervisor the host drives over the container's attached stream (`channel.py`); it forks the
worker interpreter that runs the code. The backend starts, pools (`pool.py`) and removes
containers; `session.py` runs the calls. What each container covers and what it does not:
sandboxes/README.md and docs/sandbox.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from spo_agents.errors import SandboxError
from spo_agents.processes import LiveRegistry
from spo_agents.sandboxes.base import SandboxBackend, SandboxLimits, merge_limits

from .channel import Box, EngineGone
from .pool import Key, Pool
from .session import HOST_GRACE_S, KILLED_STATUS, DockerSession

DEFAULT_IMAGE = "spo-agents-sandbox:latest"
LABEL = "spo-agents.sandbox"
OWNER_LABEL = "spo-agents.owner"
BACKEND_LABEL = "spo-agents.backend"


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
        self._pool = Pool(self.pool_size, self._start_box, self._discard_later)
        self._live: dict[str, Box] = {}  # every container of this backend not yet removed
        self._executor: ThreadPoolExecutor | None = None
        self._api_client: Any = None
        self._reaped = False
        self._driver = driver_source()
        _BACKENDS.add(self)

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
        key = Key.of(bool(stateless), limits)
        box = await self._in_thread(self._acquire, key)
        return DockerSession(self, key, box, limits)

    async def warm(self, n: int | None = None, *, stateless: bool = False, limits: SandboxLimits | None = None) -> int:
        """Fill the pool for these settings with `n` (default `pool_size`) containers and wait
        until they are ready; returns how many are waiting."""
        key = Key.of(stateless, limits or self.limits)
        want = self.pool_size if n is None else int(n)

        executor = self._ensure_executor()
        return await asyncio.to_thread(self._pool.fill, key, want, executor)

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
                self._pool.open(self._executor)
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

    def _acquire(self, key: Key) -> Box:
        self._reap_dead_owners()
        box = self._pool.pop(key)
        if box is None:
            box = self._start_box(key)
        self._pool.refill(key)
        return box

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

    def _start_box(self, key: Key) -> Box:
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
            box = Box(cid, getattr(sock, "_sock", sock), key)
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
        except (EngineGone, socket.timeout) as e:
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

    def _remove(self, box: Box) -> None:
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

    def _discard_later(self, box: Box) -> None:
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
            executor, self._executor = self._executor, None
        boxes = self._pool.close()
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


def _shutdown_at_exit(backend: DockerBackend) -> None:
    backend._shutdown(wait=False)


# Strong references: a backend dropped without `aclose()` still has its containers removed at exit.
_BACKENDS: LiveRegistry[DockerBackend] = LiveRegistry("docker sandbox backend", _shutdown_at_exit, weak=False)


__all__ = [
    "BACKEND_LABEL",
    "DEFAULT_IMAGE",
    "HOST_GRACE_S",
    "KILLED_STATUS",
    "LABEL",
    "OWNER_LABEL",
    "DockerBackend",
    "DockerSession",
    "engine_url",
]
