"""`rollout.workers: ray`: the Ray actors that run a training run's episodes, built from its config.

Each actor builds what the learner's process would (the environment of `env.id` on `env.split`
with `env.kwargs`, the `sandbox.*` backend) and an `openai` policy client in token mode pointed at
the same server(s) as the learner's client (`rollout.base_url`, or the server the run started),
with the same timeouts and retries. The learner keeps its own client for held-out evaluation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spo_agents.config import Config

if TYPE_CHECKING:
    from spo_agents.rollout.workers import RayWorkers, WorkerSpec


def worker_spec(cfg: Config, base_url: str | list[str]) -> WorkerSpec:
    """The `WorkerSpec` every actor builds from (plain data: it travels to other machines)."""
    from spo_agents.rollout.workers import WorkerSpec
    from spo_agents.sandboxes.base import SandboxLimits

    r = cfg.rollout
    return WorkerSpec(
        env_id=cfg.env.id,
        model=r.server_model or cfg.model.name,
        policy_kwargs={
            "base_url": base_url,  # one endpoint or a list, as the learner's client gets it
            "api_key_env": r.api_key_env,
            "mode": "tokens",  # training needs the sampled token ids and their log-probs
            "request_timeout_s": r.request_timeout_s,
            "max_retries": r.max_retries,
            "server_wait_s": r.server_wait_s,
        },
        split=cfg.env.split,
        env_kwargs=dict(cfg.env.kwargs),
        sandbox=cfg.sandbox.backend,
        sandbox_limits=SandboxLimits(timeout_s=cfg.sandbox.timeout_s, memory_mb=cfg.sandbox.memory_mb),
        sandbox_options=dict(cfg.sandbox.options),
        tokenizer_model=cfg.model.name,  # resolved on each actor's node (an alias, a hub id or a path there)
    )


def ray_workers(cfg: Config, base_url: str | list[str]) -> RayWorkers:
    """`ray.num_workers` actors of `ray.cpus_per_worker` CPUs each, on the cluster at `ray.address`
    (a local one, started here and stopped by `close()`, when it is null)."""
    from spo_agents.rollout.workers import RayWorkers

    return RayWorkers(
        worker_spec(cfg, base_url), cfg.ray.num_workers, address=cfg.ray.address, num_cpus=cfg.ray.cpus_per_worker
    )
