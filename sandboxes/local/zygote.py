"""Host side of the `local` backend's zygote: start it (in bubblewrap, or plain), talk to it.

The zygote (`worker.py`) is one long-lived Python process per backend with numpy and sympy
imported; each session is a fork of it. Requests are small and strictly request / response, so
they are blocking calls under a lock; async callers run them in an executor thread.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from spo_agents.errors import SandboxError

WORKDIR = "/tmp"
# Variables the sandboxed code sees; nothing else from the host's environment goes in.
BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": WORKDIR,
    "TMPDIR": WORKDIR,
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "PYTHONIOENCODING": "utf-8:backslashreplace",
    "PYTHONDONTWRITEBYTECODE": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MPLBACKEND": "Agg",
}
NOBODY = 65534
# System files an interpreter may read besides its own prefix (bubblewrap mounts only these).
HOST_ALIAS = "/.spo-host"  # where interpreter directories under the work dir are bound


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


SYSTEM_RO = ["/usr", "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/alternatives"]


@functools.lru_cache(maxsize=8)
def interpreter_paths(python: str) -> tuple[str, ...]:
    """Directories the interpreter `python` needs to read (prefixes and its `sys.path`)."""
    probe = (
        "import sys, json; "
        "print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix] + sys.path))"
    )
    try:
        out = subprocess.run([python, "-I", "-c", probe], capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise SandboxError(
            f"cannot run the sandbox interpreter `{python}` ({e}); expected a Python 3.10+ executable. "
            f"Pass `python=` (SandboxConfig.options) with a working interpreter."
        ) from e
    paths = {os.path.realpath(p) for p in json.loads(out) if p}
    paths.add(os.path.dirname(os.path.realpath(python)))
    for p in json.loads(out)[:4]:
        paths.add(p)  # the unresolved prefix too (a venv's own path)
    kept: list[str] = []
    for p in sorted((p for p in paths if os.path.exists(p)), key=len):
        if not any(p == k or p.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(p)
    return tuple(kept)


@functools.lru_cache(maxsize=1)
def bwrap_path() -> str | None:
    return shutil.which("bwrap")


@functools.lru_cache(maxsize=1)
def bwrap_works() -> tuple[bool, str]:
    """Whether bubblewrap can create its namespaces here (it may be installed but refused)."""
    path = bwrap_path()
    if path is None:
        return False, "bubblewrap (`bwrap`) is not installed (`apt-get install bubblewrap`)"
    cmd = [path, "--unshare-all", "--unshare-user", "--die-with-parent", "--ro-bind", "/", "/", "--", "/bin/true"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"bubblewrap failed to start: {e}"
    if r.returncode != 0:
        return False, f"bubblewrap cannot create namespaces here: {r.stderr.strip()}"
    version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip()
    return True, version or "bubblewrap"


def _world_readable(paths: tuple[str, ...]) -> bool:
    """True when an unprivileged user can traverse to and read every path."""
    for p in paths:
        cur = Path(p)
        for part in [cur, *cur.parents]:
            try:
                mode = part.stat().st_mode
            except OSError:
                return False
            if not mode & 0o001:
                return False
    return True


@dataclass(frozen=True)
class Exit:
    """How a session process ended: `status` in the shell's convention (the exit code, or 128 + N
    for death by signal N) and `signal` (N, or None when the process exited by itself)."""

    status: int
    signal: int | None = None

    @classmethod
    def of(cls, reply: dict) -> Exit | None:
        if reply.get("status") is None:
            return None
        sig = reply.get("signal")
        return cls(int(reply["status"]), int(sig) if sig is not None else None)


@dataclass
class ZygoteConfig:
    """How to start the zygote. `isolation` is a resolved level, never `auto`."""

    python: str
    isolation: str  # bubblewrap | unshare | none
    preload: tuple[str, ...] = ("numpy", "sympy")
    new_net: bool = False  # a network namespace per session (besides the worker's private one)
    env: dict[str, str] = field(default_factory=dict)
    extra_ro_binds: tuple[str, ...] = ()


class Zygote:
    """One pre-warmed worker process and the socket to it.

    `generation` counts the worker's starts: a session process belongs to the generation that
    forked it, and requests about it are sent only to that worker (a restarted worker reuses the
    same pids in its own namespace, and must never be asked to kill another session's process)."""

    def __init__(self, cfg: ZygoteConfig) -> None:
        self.cfg = cfg
        self.generation = 0
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._stderr: object | None = None

    # --- lifecycle ---
    def _command(self, fd: int) -> list[str]:
        cfg = self.cfg
        paths = interpreter_paths(cfg.python)
        namespaces = cfg.isolation in ("bubblewrap", "unshare")
        drop_to = None
        if cfg.isolation == "unshare" and os.geteuid() == 0 and _world_readable(paths):
            drop_to = NOBODY
        hide = []
        if cfg.isolation == "unshare":
            for cand in ("/home", "/root", "/run", "/var/tmp", "/dev/shm", "/mnt", "/srv", "/media"):
                if not any(p == cand or p.startswith(cand + "/") for p in paths):
                    hide.append(cand)
        worker_cfg = {
            "fd": fd,
            "preload": list(cfg.preload),
            "namespaces": namespaces,
            "new_net": namespaces and cfg.new_net,
            "zygote_net": cfg.isolation == "unshare",
            "readonly_root": namespaces,
            "hide": hide,
            "workdir": WORKDIR,
            "drop_to": drop_to,
        }
        source = (Path(__file__).with_name("worker.py")).read_text()
        if cfg.isolation != "bubblewrap":
            return [cfg.python, "-I", "-c", source, json.dumps(worker_cfg)]
        # Interpreter directories under the work dir (a venv in a clone under /tmp) would be
        # hidden by the sessions' private tmpfs there: bind them at an alias outside it and start
        # the interpreter by its aliased path (a venv finds its pyvenv.cfg from that path).
        alias = {p: HOST_ALIAS + p for p in paths if _under(p, WORKDIR)}
        python = cfg.python
        for p, a in alias.items():
            if _under(python, p):
                python = a + python[len(p) :]
        py = [python, "-I", "-c", source, json.dumps(worker_cfg)]
        cmd = [
            bwrap_path() or "bwrap",
            "--unshare-all",
            "--unshare-user",
            "--die-with-parent",
            "--new-session",
            "--uid",
            str(NOBODY),
            "--gid",
            str(NOBODY),
            "--hostname",
            "sandbox",
            "--cap-drop",
            "ALL",
        ]
        for top in ("/bin", "/lib", "/lib64", "/lib32", "/sbin"):
            if os.path.islink(top):
                cmd += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                cmd += ["--ro-bind", top, top]
        for p in [*SYSTEM_RO, *paths, *cfg.extra_ro_binds]:
            if os.path.exists(p) and not p.startswith(("/bin/", "/lib/", "/lib64/", "/sbin/")):
                cmd += ["--ro-bind", p, alias.get(p, p)]
        cmd += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", WORKDIR, "--chdir", WORKDIR, "--clearenv"]
        for k, v in self._env(python).items():
            cmd += ["--setenv", k, v]
        return cmd + ["--", *py]

    def _env(self, python: str) -> dict[str, str]:
        env = dict(BASE_ENV)
        bindir = os.path.dirname(python)
        if bindir:
            env["PATH"] = f"{bindir}:{env['PATH']}"
        env.update(self.cfg.env)
        return env

    def start(self) -> None:
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        # bubblewrap's --die-with-parent (and the zygote's own death signal) fire when the
        # *thread* that started it exits, so it is started from one thread that lives as long
        # as the process, never from a short-lived executor thread.
        if threading.current_thread() is not _launcher_thread():
            _LAUNCHER.submit(self._start_locked).result()
            return
        self._stop_locked()
        host, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        stderr = tempfile.TemporaryFile()
        try:
            proc = subprocess.Popen(
                self._command(child.fileno()),
                pass_fds=[child.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=self._env(self.cfg.python)
                if self.cfg.isolation != "bubblewrap"
                else {"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                start_new_session=True,
            )
        except OSError as e:
            host.close()
            stderr.close()
            raise SandboxError(f"cannot start the `local` sandbox worker ({self.cfg.isolation}): {e}") from e
        finally:
            child.close()
        self._proc, self._sock, self._stderr = proc, host, stderr
        self.generation += 1
        host.settimeout(120)
        try:
            msg = host.recv(1 << 16)
        except OSError as e:
            msg = b""
            err = str(e)
        else:
            err = ""
        if not msg:
            detail = self._stderr_text() or err or "no output"
            self._stop_locked()
            raise SandboxError(
                f"the `local` sandbox worker ({self.cfg.isolation}, interpreter `{self.cfg.python}`) did not start: "
                f"{detail}. Check that the interpreter runs, or choose another `isolation`."
            )
        host.settimeout(60)

    def _stderr_text(self) -> str:
        f = self._stderr
        if f is None:
            return ""
        try:
            f.seek(0)  # type: ignore[attr-defined]
            return f.read()[-4000:].decode(errors="replace").strip()  # type: ignore[attr-defined]
        except (OSError, ValueError):
            return ""

    def stop(self) -> None:
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            self._proc = None
        if self._stderr is not None:
            self._stderr.close()  # type: ignore[attr-defined]
            self._stderr = None

    @property
    def alive(self) -> bool:
        proc = self._proc  # read once: another thread may be stopping the worker
        return proc is not None and proc.poll() is None

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None else None

    # --- requests ---
    def _request_locked(self, msg: dict, fds: list[int] | None = None) -> dict:
        if self._sock is None or not self.alive:
            raise SandboxError(f"the `local` sandbox worker is not running. {self._stderr_text()}".strip())
        data = json.dumps(msg).encode()
        try:
            if fds:
                socket.send_fds(self._sock, [data], fds)
            else:
                self._sock.send(data)
            reply = self._sock.recv(1 << 16)
        except OSError as e:
            detail = self._stderr_text()
            self._stop_locked()
            raise SandboxError(f"lost the `local` sandbox worker during `{msg['op']}`: {e}. {detail}".strip()) from e
        if not reply:
            detail = self._stderr_text()
            self._stop_locked()
            raise SandboxError(f"the `local` sandbox worker exited during `{msg['op']}`. {detail}".strip())
        return json.loads(reply)

    def current(self, generation: int) -> bool:
        """Whether the worker that forked a process of `generation` is still the one running."""
        return generation == self.generation and self.alive

    def spawn(self, limits: dict, fds: list[int]) -> tuple[int, int, int]:
        """Fork a session; returns its pid and process group in the zygote's pid namespace, and
        the worker's generation."""
        with self._lock:
            if not self.alive:
                self._start_locked()
            generation = self.generation
            reply = self._request_locked({"op": "spawn", "limits": limits}, fds)
        if "error" in reply:
            raise SandboxError(
                f"the `local` sandbox could not start a session ({self.cfg.isolation}): {reply['error']}. "
                f"If namespaces are not permitted here, use `isolation='none'` (no isolation)."
            )
        return int(reply["pid"]), int(reply["pgid"]), generation

    def kill(self, pid: int, pgid: int, generation: int, wait: bool = True) -> Exit | None:
        """Kill a session's whole tree; returns how it ended when `wait`. None as well when its
        worker is gone (the session died with it)."""
        with self._lock:
            if not self.current(generation):
                return None
            return Exit.of(self._request_locked({"op": "kill", "pid": pid, "pgid": pgid, "wait": wait}))

    def wait(self, pid: int, generation: int, block: bool = True) -> Exit | None:
        """How a session process ended; None while it runs, or when its worker is gone."""
        with self._lock:
            if not self.current(generation):
                return None
            return Exit.of(self._request_locked({"op": "wait", "pid": pid, "block": block}))


_LAUNCHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spo-sandbox-launcher")


@functools.lru_cache(maxsize=1)
def _launcher_thread() -> threading.Thread:
    return _LAUNCHER.submit(threading.current_thread).result()


def python_default() -> str:
    return sys.executable
