"""What the training loop drives, built from the config: the model, the policy backend, the
environment factory, and a started vLLM server when the run starts one itself.

`build_components(cfg)` resolves every named component first (`preflight`: sandbox backend,
environment and its options), so a typo fails before the model loads; then it loads the model
and builds the policy of `rollout.backend`, each import guarded by its optional extra.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spo_agents.config import Config
from spo_agents.errors import ConfigError

if TYPE_CHECKING:
    from spo_agents.rollout.policy.base import PolicyBackend
    from spo_agents.serving.weight_sync import WeightSync


@dataclass
class Components:
    """The pieces the loop drives. `build_components` makes them from a `Config`; tests pass
    fakes. `env_factory(split)` returns a fresh environment of that split."""

    model: Any
    tokenizer: Any
    policy: PolicyBackend
    env_factory: Callable[[str], Any]
    weight_sync: WeightSync | None = None  # puts new weights where the policy generates (not for `hf`)
    inplace: bool = True  # the policy shares the learner's module (paused during the update)
    servers: list[Any] = field(default_factory=list)  # the vLLM servers this run started (`VLLMServer`s)
    runner: Any = None  # where episodes run when not in this process (`rollout.workers: ray`: `RayWorkers`)
    closers: list[Callable[[], Any]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's padding id (its end-of-sequence id when it has none)."""
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_model(cfg: Config, weights_from: Path | None = None) -> tuple[Any, Any]:
    """The trainable model and its tokenizer (`model.name` resolved by `spo_agents.models`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spo_agents.models import resolve_model, torch_dtype

    path = resolve_model(cfg.model.name)
    sharded = cfg.train.sharding == "fsdp"
    # sharded: fp32 master weights, left on the CPU; `shard_model` moves each rank's shard
    dtype = torch.float32 if sharded else torch_dtype(cfg.model.dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(str(weights_from) if weights_from is not None else path, dtype=dtype)
    if not sharded:
        model.to(resolve_device(cfg.model.device))
    if cfg.model.gradient_checkpointing:
        # transformers 5.x renamed it and deprecated the old name
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if cfg.model.lora.enabled:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:
            raise ConfigError("`model.lora.enabled: true` needs `peft`: `pip install 'spo-agents[lora]'`") from e
        lc = cfg.model.lora
        model = get_peft_model(
            model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules)
        )
    return model, tokenizer


def preflight(cfg: Config, env_factory: Callable[[str], Any]) -> None:
    """Resolve the named components (sandbox backend, environment and its kwargs) before anything
    heavy runs: a typo fails here with the registry's suggestion, not as rollout errors later."""
    from spo_agents import sandboxes  # registers the built-in backends
    from spo_agents.models import check_model_name
    from spo_agents.registry import SANDBOXES

    check_model_name(cfg.model.name)
    SANDBOXES.load(cfg.sandbox.backend)
    ok, why = sandboxes.backend_availability(cfg.sandbox.backend)
    if not ok:
        raise ConfigError(f"`sandbox.backend: {cfg.sandbox.backend}` is not available here: {why}")
    env_factory(cfg.env.split).close()


def make_env_factory(cfg: Config) -> Callable[[str], Any]:
    """`split -> env` for the configured environment and sandbox."""
    from spo_agents import envs
    from spo_agents.sandboxes.base import SandboxLimits

    sandbox: Any = cfg.sandbox.backend
    limits: SandboxLimits | None = SandboxLimits(timeout_s=cfg.sandbox.timeout_s, memory_mb=cfg.sandbox.memory_mb)
    if cfg.sandbox.options:
        from spo_agents.sandboxes import backend_from_config

        # limits named in `options` (e.g. `max_output_bytes`) join timeout_s / memory_mb in the
        # backend's own limits, which the sessions then use
        sandbox, limits = backend_from_config(cfg.sandbox), None

    def factory(split: str) -> Any:
        return envs.make(cfg.env.id, split=split, sandbox=sandbox, sandbox_limits=limits, **cfg.env.kwargs)

    return factory


def build_components(
    cfg: Config, weights_from: Path | None = None, log_dir: Path | None = None, *, checked: bool = False
) -> Components:
    """Model, tokenizer, policy backend and env factory for `cfg` (import-guarded per backend).

    `rollout.backend: vllm-server` without `rollout.base_url` starts `rollout.servers` vLLM servers on
    loopback (`spo_agents.serving.vllm_server.start_servers`, logs in `log_dir`) and stops them when
    the run ends, also on Ctrl-C and crashes. Several servers (started or listed in `rollout.base_url`)
    make a `MultiServerPolicy` and a `MultiSync` that pushes every version to each. Every named
    component is resolved before the model loads (`preflight`), unless the caller did it already
    (`checked`)."""
    env_factory = make_env_factory(cfg)
    if not checked:
        preflight(cfg, env_factory)
    model, tokenizer = load_model(cfg, weights_from)
    backend = cfg.rollout.backend
    if backend == "hf":
        from spo_agents.rollout.policy.hf import HFPolicy

        policy = HFPolicy(model=model, tokenizer=tokenizer)
        return Components(model, tokenizer, policy, env_factory, inplace=True, closers=[policy.close])
    if backend == "vllm":
        from spo_agents.rollout.policy import make_policy
        from spo_agents.serving.weight_sync import InProcessVLLMSync

        policy = make_policy("vllm", cfg.model.name, dtype=cfg.model.dtype)
        sync = InProcessVLLMSync(policy)
        return Components(
            model, tokenizer, policy, env_factory, weight_sync=sync, inplace=False, closers=[policy.close]
        )
    if backend in ("openai", "vllm-server"):
        from spo_agents.rollout.policy import make_policy

        base_url, closers, servers = cfg.rollout.base_url, [], []
        if not base_url and backend == "vllm-server":
            from spo_agents.serving.vllm_server import start_servers

            servers = start_servers(cfg, log_dir=log_dir)
            urls = [s.openai_base_url for s in servers]
            base_url, closers = urls[0] if len(urls) == 1 else urls, [s.stop for s in servers]
        if not base_url:
            raise ConfigError(f"`rollout.backend: {backend}` needs `rollout.base_url`, e.g. `http://127.0.0.1:8000/v1`")
        # Training needs the sampled token ids and their log-probs: refuse text-only servers.
        r = cfg.rollout
        policy = make_policy(
            "openai",
            r.server_model or cfg.model.name,
            base_url=base_url,
            api_key_env=r.api_key_env,
            tokenizer=tokenizer,
            mode="tokens",
            request_timeout_s=r.request_timeout_s,
            max_retries=r.max_retries,
            server_wait_s=r.server_wait_s,
        )
        sync = None
        if backend == "vllm-server":
            from spo_agents.serving.multi_sync import make_server_sync
            from spo_agents.serving.vllm_server import connect

            urls = [base_url] if isinstance(base_url, str) else list(base_url)
            endpoints = [connect(u, request_timeout_s=cfg.rollout.request_timeout_s) for u in urls]
            sync = make_server_sync(cfg.rollout.weight_sync, endpoints)
        runner = None
        if r.workers == "ray":  # episodes in Ray actors, each with a client of the same server(s)
            from spo_agents.training.rollout_workers import ray_workers

            runner = ray_workers(cfg, base_url)
            closers = [runner.close, *closers]
        return Components(
            model,
            tokenizer,
            policy,
            env_factory,
            weight_sync=sync,
            inplace=False,
            runner=runner,
            servers=servers,
            closers=[policy.close, *closers],
        )
    raise ConfigError(f"unknown `rollout.backend` {backend!r}")
