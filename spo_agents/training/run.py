"""Starting a training run: its directory, its config, the process group, then the loop (`train`).

Under `torchrun` / `accelerate launch` (`WORLD_SIZE` > 1) rank 0 runs rollouts, the tracker,
evaluation, metrics and checkpoints and every rank takes part in the update
(`spo_agents.training.follower`); a single process with `train.sharding: fsdp` gets a one-rank
process group, removed again at the end.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from spo_agents.config import Config, advantage_name, load_config, save_config
from spo_agents.errors import CheckpointError, ConfigError
from spo_agents.training.components import Components, make_env_factory, preflight, resolve_device
from spo_agents.training.follower import broadcast, init_distributed

if TYPE_CHECKING:
    from spo_agents.training.loop import TrainResult


def new_run_dir(cfg: Config) -> Path:
    """The directory of a new run. A directory of the same name that holds a checkpoint is
    refused (continue it with `--resume`); one left by a start that stopped before its first
    checkpoint is taken over, its metrics kept aside as `metrics.jsonl.stopped-<time>`."""
    from spo_agents.training.checkpoint import CheckpointManager

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = cfg.train.run_name or f"{cfg.env.id}-{cfg.algorithm.name}-{stamp}"
    run = Path(cfg.train.output_dir) / name
    if CheckpointManager(run).steps():
        raise ConfigError(
            f"run directory `{run}` already holds checkpoints; "
            f"continue it with `--resume {run}` or pick another `train.run_name`"
        )
    if (run / "metrics.jsonl").exists():
        (run / "metrics.jsonl").rename(run / f"metrics.jsonl.stopped-{stamp}")
        print(
            f"`{run}` was left by a start that stopped before its first checkpoint; starting it over "
            f"(its metrics kept as `metrics.jsonl.stopped-{stamp}`)",
            file=sys.stderr,
        )
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"cannot create the run directory `{run}` ({e.strerror}); set `train.output_dir` to a writable directory"
        ) from e
    return run


def load_run_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The config a run was started with (`RUN_DIR/config.yaml`), plus overrides
    (e.g. `train.steps=200` to extend a finished run)."""
    p = Path(run_dir) / "config.yaml"
    if not p.is_file():
        raise CheckpointError(
            f"`{run_dir}` is not a run directory (no `config.yaml`); "
            "pass the directory `spo-agent train` printed when it started"
        )
    return load_config(p, list(overrides))


def train(
    cfg: Config, *, run_dir: str | Path | None = None, resume: bool = False, components: Components | None = None
) -> TrainResult:
    """Run training to the end (or `train.max_minutes`); returns where it stopped."""
    import torch.distributed as dist

    initialized_before = dist.is_available() and dist.is_initialized()
    rank = init_distributed(cfg.train.sharding, resolve_device(cfg.model.device).startswith("cuda"))
    own_group = rank < 0 and dist.is_available() and dist.is_initialized() and not initialized_before
    try:
        return _train(cfg, rank, run_dir, resume, components)
    finally:
        if own_group:
            dist.destroy_process_group()


def _train(
    cfg: Config, rank: int, run_dir: str | Path | None, resume: bool, components: Components | None
) -> TrainResult:
    from spo_agents.training.loop import Trainer

    if components is None and rank <= 0:  # bad names and options fail before a run directory exists
        preflight(cfg, make_env_factory(cfg))
    if run_dir is None:
        run_dir = new_run_dir(cfg) if rank <= 0 else None
        if rank >= 0:
            run_dir = broadcast(str(run_dir) if rank == 0 else None, receive=rank != 0)
    run_dir = Path(run_dir)
    if rank <= 0:
        print(f"run directory: {run_dir}", file=sys.stderr)
        print(banner(cfg), file=sys.stderr)
        run_dir.mkdir(parents=True, exist_ok=True)
        # on resume too: the saved config plus this resume's overrides, so the next resume keeps them
        save_config(cfg, run_dir / "config.yaml")

    async def main() -> TrainResult:
        trainer = Trainer(cfg, run_dir, components, resume=resume, checked=components is None and rank <= 0)
        try:
            return await trainer.run()
        finally:
            await trainer.aclose()

    return asyncio.run(main())


def banner(cfg: Config) -> str:
    """One line: the algorithm, advantage, tracker and sampler this run trains with."""
    t = cfg.tracker
    rho = (
        f"constant rho {t.rho_constant}"
        if t.rho_type == "constant"
        else f"KL-adaptive rho in [{t.rho_min}, {t.rho_max}], D_half {t.d_half}, drift `{t.drift}`"
    )
    return f"{cfg.algorithm.name}: advantage `{advantage_name(cfg)}`, tracker {rho}, sampler `{cfg.sampler.type}`"
