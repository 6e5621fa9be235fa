"""The training loop behind `spo-agent train`.

One step, in this order (docs/algorithm.md sections 1-4; paper Alg. 1):

1. Sample: the sampler draws problems with weights from the tracker's v_hat (Eq. 11) to keep
   `ceil(batch_size * rollout.oversample)` episodes outstanding (problems already in flight are
   excluded while the pool allows it).
2. Roll out: the collector returns the first `batch_size` episodes that finish (single stream,
   no group barrier); in GRPO mode whole groups of `algorithm.group_size`. Episodes that failed
   for infrastructure reasons are counted and skipped, never trained on or folded into v_hat.
3. Advantages from the values BEFORE this batch: A = r - v_hat_before(x), normalised over the
   batch (Eqs. 8-10); or the configured estimator (`grpo`, `rloo`, `spo-no-baseline`).
4. Learner: PPO-clip update in `train.mini_batches` optimiser steps (`spo_agents.training.learner`). With
   the in-process `hf` backend the policy shares the learner's module: generation is paused
   during the update (in-flight episodes wait between turns). With a server backend, generation
   continues and the new weights are pushed after the update (`rollout.weight_sync`).
5. Tracker: fold the rewards in with rho from the measured drift (per-prompt D(x) re-scored
   before the update, or the cumulative C - C_then), then add this step's drift to C.
6. The policy version becomes the step number; metrics, held-out evaluation, checkpoint.

Ablations share this code path: `algorithm.name: grpo`, `tracker.rho_type: constant`,
`tracker.baseline: false`, `sampler.type: uniform`.

Resume: `RUN_DIR/config.yaml` is the run's config; the latest checkpoint restores the model,
optimiser, tracker, sampler (RNG and position), step and RNG states; metrics rows of steps after
the checkpoint (lost in the crash) are dropped. Episodes in flight at the crash are lost, so a run
killed with SIGKILL loses the steps since its last checkpoint (`train.checkpoint_every`, 1 by
default: at most the step in progress).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from spo_agents.config import Config, load_config, save_config, to_dict
from spo_agents.errors import CheckpointError, ConfigError, RolloutError
from spo_agents.training.components import (
    Components,
    VLLMInProcessSync,
    build_components,
    load_model,
    make_env_factory,
    preflight,
    resolve_device,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Run directories
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    run_dir: Path
    step: int  # last completed step
    stopped_early: bool  # `train.max_minutes` was reached
    eval_history: list[tuple[int, float]]  # (step, avg@k) of the held-out evaluations
    last_metrics: dict[str, Any]


def advantage_name(cfg: Config) -> str:
    if cfg.algorithm.advantage != "auto":
        return cfg.algorithm.advantage
    if cfg.algorithm.name == "grpo":
        return "grpo"
    return "spo" if cfg.tracker.baseline else "spo-no-baseline"


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Runs the loop of the module docstring on one asyncio event loop."""

    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        components: Components | None = None,
        *,
        resume: bool = False,
        checked: bool = False,
    ) -> None:
        """`checked`: `preflight` already ran for `cfg` (by `train`), so the setup skips it."""
        from spo_agents.training.checkpoint import CheckpointManager

        self.cfg = cfg
        self._checked = checked
        self._bar: Any = None  # the progress bar while `run` shows one
        self.run_dir = Path(run_dir)
        self.ckpt = CheckpointManager(self.run_dir, keep=cfg.train.keep_checkpoints)
        self.resume_from = self.ckpt.latest() if resume else None
        if resume and self.resume_from is None:
            raise CheckpointError(
                f"`{self.run_dir}` has no checkpoint to resume from; start it again without `--resume`"
            )
        self._components = components
        self._validate()
        from spo_agents.training.learner import Learner

        self.rank, self.world = Learner._world()

    def _validate(self) -> None:
        c = self.cfg
        if c.algorithm.name == "grpo" and c.algorithm.group_size < 2:
            raise ConfigError(f"`algorithm.name: grpo` needs `algorithm.group_size` >= 2, got {c.algorithm.group_size}")
        if c.algorithm.name == "grpo" and c.train.batch_size % c.algorithm.group_size:
            raise ConfigError(
                f"`train.batch_size` ({c.train.batch_size}) must be a multiple of `algorithm.group_size` "
                f"({c.algorithm.group_size}) in GRPO mode (whole groups per batch)"
            )
        if c.algorithm.advantage_norm == "token" and advantage_name(c) in ("grpo", "rloo"):
            raise ConfigError(
                "`algorithm.advantage_norm: token` applies to the single-stream estimators; "
                f"advantage `{advantage_name(c)}` normalises within groups"
            )
        if advantage_name(c) in ("grpo", "rloo") and c.algorithm.name != "grpo":
            raise ConfigError(f"advantage `{advantage_name(c)}` needs grouped collection: set `algorithm.name: grpo`")
        if c.rollout.backend == "openai":
            raise ConfigError(
                "`rollout.backend: openai` cannot push the learner's weights to the server, so every step would "
                "train on samples of the initial weights; use `rollout.backend: vllm-server` (with `--base-url` "
                "for a running vLLM server), or `openai` only for `spo-agent eval` / `estimate-values`"
            )

    # -- setup -------------------------------------------------------------------------------
    def _setup(self) -> None:
        from spo_agents.algorithm.sampler import make_sampler
        from spo_agents.algorithm.tracker import ValueTracker
        from spo_agents.rollout.collector import Collector
        from spo_agents.rollout.policy.base import SamplingParams
        from spo_agents.training.checkpoint import set_rng_state
        from spo_agents.training.learner import Learner, LearnerSettings
        from spo_agents.training.metrics import MetricsWriter, truncate_after
        from spo_agents.trajectory_log import TrajectoryLog

        cfg = self.cfg
        _seed_everything(cfg.train.seed)
        loaded = self.ckpt.load() if self.resume_from is not None else None
        if self._components is None:
            self._components = build_components(
                cfg, weights_from=loaded.model_dir if loaded else None, log_dir=self.run_dir, checked=self._checked
            )
        elif loaded is not None:
            self.ckpt.load_model_weights(self._components.model, loaded)
        comp = self._components
        if cfg.train.sharding == "fsdp" and self.world > 1 and comp.inplace:
            raise ConfigError(
                "`rollout.backend: hf` generates with the learner's own module on rank 0, which cannot run a model "
                "sharded across processes (every forward needs all ranks); with `train.sharding: fsdp` on several "
                "processes use `rollout.backend: vllm-server` or `vllm`"
            )
        self._shard(comp.model)
        self.model, self.tokenizer, self.policy = comp.model, comp.tokenizer, comp.policy

        self.train_env = comp.env_factory(cfg.env.split)
        self.problem_ids: list[str] = list(self.train_env.problem_ids)
        self.tracker = ValueTracker.from_config(self.problem_ids, cfg.tracker)
        self.sampler = make_sampler(cfg.sampler, len(self.problem_ids), seed=cfg.train.seed)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        self.learner = Learner(self.model, LearnerSettings.from_config(cfg), pad_id=int(pad))
        self.step = 0
        if loaded is not None:
            st = loaded.state
            self.tracker.load_state_dict(st["tracker"])
            self.sampler.load_state_dict(st["sampler"])
            self.learner.load_state_dict(st["learner"])
            set_rng_state(st["rng"])
            self.step = loaded.step
            truncate_after(self.run_dir / "metrics.jsonl", self.step)
            log.info("resumed `%s` at step %d from `%s`", self.run_dir, self.step, loaded.path)
        elif cfg.tracker.init_values:
            from spo_agents.training.values import init_tracker

            init_tracker(self.tracker, cfg.tracker.init_values)
        # In-place backends serve the loaded weights now; a server serves them only after the
        # push in `_run`, and until then its tokens belong to the initial weights (version 0).
        self.policy.version = self.step if comp.weight_sync is None else 0

        group = cfg.algorithm.group_size if cfg.algorithm.name == "grpo" else 1
        self.group_size = group
        self.train_sampling = SamplingParams(
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            top_k=cfg.rollout.top_k,
            max_new_tokens=cfg.rollout.max_new_tokens,
        )
        self.collector = Collector(
            lambda: comp.env_factory(cfg.env.split),
            self.policy,
            max_in_flight=cfg.rollout.max_in_flight,
            sampling=self.train_sampling,
            max_episode_tokens=cfg.rollout.max_episode_tokens,
            group_size=group,
            max_staleness=cfg.rollout.max_staleness,
            seed=cfg.train.seed + self.step,
        )
        self.metrics = MetricsWriter(
            self.run_dir,
            tensorboard=cfg.logging.tensorboard,
            wandb=cfg.logging.wandb,
            wandb_project=cfg.logging.wandb_project,
            run_name=self.run_dir.name,
            config=to_dict(cfg),
        )
        self.eval_ids: list[str] = []
        t = cfg.train
        self.trajectory_log = TrajectoryLog(
            self.run_dir,
            keep_last_steps=t.trajectories_keep_steps,
            older_sample=t.trajectories_older_sample,
            older_max=t.trajectories_older_max,
            seed=t.seed,
            save_logprobs=t.trajectories_logprobs,
            start_step=self.step,
            problem_ids=self.problem_ids,
            save_trajectories=t.save_trajectories,
        )
        from spo_agents.training.health import HealthLimits, StepHealth

        self.health = StepHealth(
            HealthLimits(cfg.rollout.max_error_share, cfg.rollout.max_error_steps), warn=self._console
        )
        self.eval_history: list[tuple[int, float]] = []

    # -- pieces of a step --------------------------------------------------------------------
    def _refill(self) -> None:
        """Keep `ceil(batch_size * oversample)` episodes outstanding (step 1 of the docstring).
        New problems avoid those the collector still has in flight while the pool allows it:
        over-sampling stops at the pool's size, and a problem runs twice at once only when one
        batch needs more problems than the pool has."""
        cfg = self.cfg
        g = self.group_size
        target = max(cfg.train.batch_size, math.ceil(cfg.train.batch_size * cfg.rollout.oversample))
        unsettled = self.collector.outstanding // g  # submissions: episodes, or groups of g
        cap = max(cfg.train.batch_size // g, len(self.problem_ids))
        need = min((target - self.collector.outstanding) // g, cap - unsettled)
        if need <= 0:
            return
        busy = self.tracker.indices(self.collector.busy_problems)
        idx = self.sampler.draw(self.tracker.v_hat(), need, busy, n_eff=self._n_eff())
        self.collector.submit([self.problem_ids[i] for i in idx])

    def _n_eff(self) -> np.ndarray | None:
        """alpha + beta per problem, for `sampler.gamma` > 0."""
        if self.cfg.sampler.gamma <= 0:
            return None
        return self.tracker.alpha.astype(np.float64) + self.tracker.beta

    async def _evaluate(self) -> dict[str, float]:
        from spo_agents.evaluation.runner import evaluate
        from spo_agents.rollout.policy.base import SamplingParams

        cfg = self.cfg
        if not self.eval_ids:
            env = self._components.env_factory(cfg.env.eval_split)
            self.eval_ids = list(env.problem_ids)[: cfg.eval.limit]
            env.close()
        sampling = SamplingParams(
            temperature=cfg.eval.temperature,
            top_p=cfg.eval.top_p,
            top_k=cfg.eval.top_k,
            max_new_tokens=cfg.rollout.max_new_tokens,
        )
        report = await evaluate(
            lambda: self._components.env_factory(cfg.env.eval_split),
            self.policy,
            self.eval_ids,
            k=cfg.eval.k,
            sampling=sampling,
            concurrency=cfg.rollout.max_in_flight,
            out_dir=self.run_dir / "eval" / f"step-{self.step:06d}",
            progress=False,
            max_episode_tokens=cfg.rollout.max_episode_tokens,
            seed=cfg.train.seed,
        )
        self.eval_history.append((self.step, report.avg_at_k))
        k = cfg.eval.k
        return {
            "eval/avg_at_k": report.avg_at_k,
            "eval/pass_at_k": report.pass_at_k.get(k, float("nan")),
            "eval/maj_at_k": report.maj_at_k,
            "eval/k": k,
            "eval/problems": report.num_problems,
        }

    def _shard(self, model: Any) -> None:
        """Apply `train.sharding: fsdp` to `model` (after any checkpoint weights are loaded)."""
        from spo_agents.sharding import is_sharded, shard_model

        if self.cfg.train.sharding == "fsdp" and not is_sharded(model):
            shard_model(model, compute_dtype=self.cfg.model.dtype, device_type=resolve_device(self.cfg.model.device))

    def _gather(self, what: str) -> Any:
        """The sharded model's full state on rank 0, for `what` = `weights` (the model in
        `model.dtype`, for a weight push) or `state` (fp32 weights and the learner's state, for a
        checkpoint). A collective: rank 0 first tells the other ranks (`_follow`) to join."""
        from spo_agents.models import is_peft
        from spo_agents.sharding import full_model_state

        if self.rank == 0 and self.world > 1:
            _broadcast((what,))
        trainable_only = is_peft(self.model)  # an adapter's push or checkpoint needs only the adapter
        if what == "weights":
            return full_model_state(self.model, self.cfg.model.dtype, trainable_only=trainable_only)
        return full_model_state(self.model, trainable_only=trainable_only), self.learner.state_dict()

    def _checkpoint(self) -> float:
        from spo_agents.sharding import GatheredModel
        from spo_agents.training.checkpoint import rng_state

        t0 = time.perf_counter()
        model, learner_state = self.model, None
        if self.learner.sharded:
            weights, learner_state = self._gather("state")
            model = GatheredModel(self.model, weights)
        state = {
            "tracker": self.tracker.state_dict(),
            "sampler": self.sampler.state_dict(),
            "learner": learner_state if learner_state is not None else self.learner.state_dict(),
            "rng": rng_state(),
            "config": to_dict(self.cfg),
        }
        self.ckpt.save(self.step, model=model, tokenizer=self.tokenizer, state=state)
        return time.perf_counter() - t0

    async def _publish(self) -> None:
        """New weights to the rollout side (server / vLLM backends); the policy version becomes
        the step number. Order: pause (drain) -> sync -> version -> resume."""
        sync = self._components.weight_sync
        if sync is None:
            self.policy.version = self.step
            return
        model = self.model
        if self.learner.sharded:
            from spo_agents.sharding import GatheredModel

            model = GatheredModel(self.model, await asyncio.to_thread(self._gather, "weights"))
        if isinstance(sync, VLLMInProcessSync):
            await sync.push(model, self.step)
        else:
            from spo_agents.serving.weight_sync import push_weights

            await push_weights(self.policy, sync, model, self.step)

    async def train_step(self) -> dict[str, Any]:
        """One step (module docstring); returns its metrics row."""
        from spo_agents.algorithm.advantages import compute_advantages, degenerate_share

        cfg = self.cfg
        t0 = time.perf_counter()
        self._refill()
        batch = await self.collector.next_batch(cfg.train.batch_size)
        t_rollout = time.perf_counter() - t0
        good = [t for t in batch if t.error is None]
        failed = [t for t in batch if t.error is not None] + self.collector.take_failed()
        if not good:
            last = failed[-1].error if failed else "none recorded"
            raise RolloutError(
                f"every trajectory of the batch failed for infrastructure reasons (last: {last}); see the log"
            )
        pids = [t.problem_id for t in good]
        idx = self.tracker.indices(pids)
        rewards = np.array([t.reward for t in good], dtype=np.float64)
        v_before = self.tracker.v_hat(idx)
        group_ids = [t.group_id for t in good] if self.group_size > 1 else None
        name = advantage_name(cfg)
        baseline = v_before if name == "spo" else None
        tokens = [t.num_generated for t in good] if cfg.algorithm.advantage_norm == "token" else None
        adv = compute_advantages(name, rewards, baseline, group_ids, tokens)
        raw = rewards - (v_before if name == "spo" else 0.0)

        # Learner update (weights shared with an in-process policy: pause generation).
        t1 = time.perf_counter()
        if self._components.inplace and hasattr(self.policy, "pause"):
            await self.policy.pause()
        try:
            if self.world > 1:  # the other ranks score and update with this rank (`_follow`)
                await asyncio.to_thread(_broadcast, ("update", good, adv.tolist()))
            drift_pp = await asyncio.to_thread(self.learner.prompt_drift, pids) if self._scores_prompt_drift() else None
            lstats = await asyncio.to_thread(self.learner.update, good, adv)
        finally:
            if self._components.inplace and hasattr(self.policy, "resume"):
                self.step += 1
                self.policy.version = self.step
                self.policy.resume()
        if not self._components.inplace:
            self.step += 1
            await self._publish()
        t_learn = time.perf_counter() - t1

        # Tracker: rho from the drift measured so far, then this step's drift joins C.
        compared = self._compare_drift(idx, drift_pp) if cfg.tracker.compare_drift else {}
        drift_arr = np.asarray(drift_pp) if drift_pp is not None and cfg.tracker.drift == "per-prompt" else None
        rho = self.tracker.update(idx, rewards, drift=drift_arr)
        await asyncio.to_thread(self.trajectory_log.record, self.step, good, adv, v_before, rho, self.tokenizer)
        if cfg.tracker.drift == "cumulative":
            self.tracker.add_drift(lstats.drift)

        row = self._metrics_row(good, batch, rewards, adv, raw, v_before, rho, lstats, drift_arr, t_rollout, t_learn)
        row.update(compared)
        row["episode/rollout_errors"] = len(failed)
        row["episode/sandbox_errors"] = sum(1 for t in good + failed for tc in t.tool_calls if tc.infra_error)
        row.update(
            self.health.observe(self.step, len(good), len(failed), adv, rewards, failed[-1].error if failed else None)
        )
        if self.group_size > 1:
            row["train/degenerate_share"] = degenerate_share(rewards, group_ids)
        return row

    def _console(self, msg: str) -> None:
        """A line on the console now (above the progress bar when there is one)."""
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    def _scores_prompt_drift(self) -> bool:
        """Whether each step re-scores the stored responses (per-prompt drift, or comparing)."""
        return self.cfg.tracker.drift == "per-prompt" or self.cfg.tracker.compare_drift

    def _compare_drift(self, idx: np.ndarray, drift_pp: list[float]) -> dict[str, float]:
        """Both D(x) estimates on this batch's revisited problems, before the tracker update:
        per-prompt (re-scored stored response) and cumulative (C - C at the last visit)."""
        c_last = self.tracker.c_last[idx]  # [B]
        seen = ~np.isnan(c_last)
        _, first = np.unique(idx, return_index=True)
        revisited = np.zeros(idx.shape, dtype=bool)
        revisited[first] = seen[first]  # one per problem: later copies have D = 0 by rule
        if not revisited.any():
            return {"tracker/drift_revisited": 0}
        pp = np.asarray(drift_pp)[revisited]
        cum = self.tracker.C - c_last[revisited]
        return {
            "tracker/drift_revisited": int(revisited.sum()),
            "tracker/drift_revisited_per_prompt": float(pp.mean()),
            "tracker/drift_revisited_cumulative": float(cum.mean()),
        }

    def _metrics_row(
        self, good, batch, rewards, adv, raw, v_before, rho, lstats, drift_pp, t_rollout, t_learn
    ) -> dict[str, Any]:
        v_all = self.tracker.v_hat()
        w = self.sampler.weights(v_all, self._n_eff())
        p = w / w.sum()
        ent = float(-(p[p > 0] * np.log(p[p > 0])).sum())
        n = len(good)
        gen = sum(t.num_generated for t in good)
        ep_gen = sum(t.timings.get("generate", 0.0) for t in good)
        ep_sbx = sum(t.timings.get("sandbox", 0.0) for t in good)
        tool_calls = [tc for t in good for tc in t.tool_calls]
        q = np.quantile(v_before, [0.1, 0.5, 0.9])
        row: dict[str, Any] = {
            "step": self.step,
            "train/reward_mean": float(rewards.mean()),
            "train/reward_std": float(rewards.std()),
            "train/accuracy": float(np.mean([t.correct for t in good])),
            "train/advantage_raw_std": float(np.std(raw)),
            "train/advantage_mean": float(np.mean(adv)),
            "train/advantage_std": float(np.std(adv)),
            "train/batch_size": n,
            "tracker/v_hat_mean": float(v_before.mean()),
            "tracker/v_hat_p10": float(q[0]),
            "tracker/v_hat_p50": float(q[1]),
            "tracker/v_hat_p90": float(q[2]),
            "tracker/v_hat_all_mean": float(v_all.mean()),
            "tracker/rho_mean": float(np.mean(rho)),
            "tracker/rho_min": float(np.min(rho)),
            "tracker/rho_max": float(np.max(rho)),
            "tracker/drift": lstats.drift,
            "sampler/entropy": ent,
            "sampler/entropy_ratio": ent / math.log(len(w)) if len(w) > 1 else 1.0,
            "episode/tool_calls": len(tool_calls) / n,
            "episode/tool_failures": sum(1 for tc in tool_calls if not tc.ok and tc.infra_error is None) / n,
            "episode/truncation_rate": float(np.mean([t.truncated for t in good])),
            "episode/generated_tokens": gen / n,
            "episode/length_tokens": sum(len(t.token_ids) for t in good) / n,
            "episode/staleness": float(np.mean([self.step - 1 - t.policy_version for t in good])),
            "episode/generate_s": ep_gen / n,
            "episode/sandbox_s": ep_sbx / n,
            "learner/loss": lstats.loss,
            "learner/clip_frac": lstats.clip_frac,
            "learner/approx_kl": lstats.approx_kl,
            "learner/entropy": lstats.entropy,
            "learner/ratio_mean": lstats.ratio_mean,
            "learner/grad_norm": lstats.grad_norm,
            "learner/lr": lstats.lr,
            "learner/optimizer_steps": lstats.optimizer_steps,
            "perf/generated_tokens": gen,
            "time/rollout_wait_s": t_rollout,
            "time/learner_s": t_learn,
        }
        if drift_pp is not None:
            row["tracker/drift_per_prompt_mean"] = float(np.mean(drift_pp))
        split = ep_gen + ep_sbx
        row["_gen_share_of_rollout"] = ep_gen / split if split > 0 else 1.0
        return row

    def _finish_row(self, row: dict[str, Any], t_step: float, t_eval: float, t_ckpt: float) -> dict[str, Any]:
        g = row.pop("_gen_share_of_rollout", 1.0)
        wall = max(t_step, 1e-9)
        row["time/step_s"] = t_step
        row["time/eval_s"] = t_eval
        row["time/checkpoint_s"] = t_ckpt
        row["time/elapsed_s"] = time.perf_counter() - self._t_start
        row["time/share_generate"] = row["time/rollout_wait_s"] * g / wall
        row["time/share_sandbox"] = row["time/rollout_wait_s"] * (1 - g) / wall
        row["time/share_learner"] = row["time/learner_s"] / wall
        row["perf/tokens_per_s"] = row["perf/generated_tokens"] / wall
        return row

    # -- the run -----------------------------------------------------------------------------
    async def run(self) -> TrainResult:
        if self.world > 1 and self.rank != 0:
            return self._follow()
        try:
            return await self._run()
        finally:
            if self.world > 1:
                await asyncio.to_thread(_broadcast, None)  # releases the followers

    def _follow(self) -> TrainResult:
        """Ranks > 0 of a distributed learner: do what rank 0 broadcasts, until it sends None.
        `("update", trajectories, advantages)`: score (per-prompt drift) and update with it
        (gradients are summed across ranks inside `Learner.update`); `("weights",)` and
        `("state",)`: join the gather of a sharded model's full state (`_gather`)."""
        from spo_agents.training.learner import Learner, LearnerSettings

        _seed_everything(self.cfg.train.seed)
        loaded = self.ckpt.load() if self.resume_from is not None else None
        if self._components is None:
            model, tokenizer = load_model(self.cfg, weights_from=loaded.model_dir if loaded else None)
        else:
            model, tokenizer = self._components.model, self._components.tokenizer
            if loaded is not None:
                self.ckpt.load_model_weights(model, loaded)
        self._shard(model)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.model, self.learner = model, Learner(model, LearnerSettings.from_config(self.cfg), pad_id=int(pad))
        self.step = 0
        if loaded is not None:
            self.learner.load_state_dict(loaded.state["learner"])
            self.step = loaded.step
        while (msg := _broadcast(None, receive=True)) is not None:
            if msg[0] == "update":
                _, trajs, adv = msg
                if self._scores_prompt_drift():
                    self.learner.prompt_drift([t.problem_id for t in trajs])
                self.learner.update(trajs, adv)
                self.step += 1
            else:
                self._gather(msg[0])
        return TrainResult(self.run_dir, self.step, False, [], {})

    async def _run(self) -> TrainResult:
        cfg = self.cfg
        self._setup()
        if self.step > 0 and self._components.weight_sync is not None:
            await self._publish()  # a resumed run's server still serves the initial weights
        self._t_start = time.perf_counter()
        bar = None
        if cfg.logging.progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=cfg.train.steps, initial=self.step, desc="spo-agent train", unit="step", dynamic_ncols=True
            )
        self._bar = bar
        stopped_early = False
        last: dict[str, Any] = {}
        try:
            if self.step == 0 and cfg.eval.every > 0 and cfg.eval.limit > 0:
                t = time.perf_counter()
                row = {"step": 0, **await self._evaluate()}
                row["time/eval_s"] = time.perf_counter() - t
                self.metrics.log(row)
                if bar is not None:
                    bar.write(f"step 0: held-out avg@{cfg.eval.k} = {row['eval/avg_at_k']:.3f}")
            t_prev = time.perf_counter()
            t_ckpt = 0.0
            while self.step < cfg.train.steps:
                row = await self.train_step()
                out_of_time = (
                    cfg.train.max_minutes is not None
                    and (time.perf_counter() - self._t_start) / 60 >= cfg.train.max_minutes
                )
                final = self.step >= cfg.train.steps or out_of_time
                t_eval = 0.0
                if cfg.eval.every > 0 and cfg.eval.limit > 0 and (self.step % cfg.eval.every == 0 or final):
                    t = time.perf_counter()
                    row.update(await self._evaluate())
                    t_eval = time.perf_counter() - t
                # The row is logged before the checkpoint: a crash in between leaves a row newer
                # than the checkpoint, which the resume drops (never a checkpoint without its row).
                now = time.perf_counter()
                last = self._finish_row(row, now - t_prev, t_eval, t_ckpt)
                self.metrics.log(last)
                t_ckpt = 0.0
                if final or (cfg.train.checkpoint_every > 0 and self.step % cfg.train.checkpoint_every == 0):
                    t_ckpt = await asyncio.to_thread(self._checkpoint)
                t_prev = now
                if bar is not None:
                    post = {"reward": f"{last['train/reward_mean']:.3f}", "acc": f"{last['train/accuracy']:.3f}"}
                    if "eval/avg_at_k" in last:
                        post["eval"] = f"{last['eval/avg_at_k']:.3f}"
                    bar.set_postfix(post)
                    bar.update(1)
                if out_of_time and self.step < cfg.train.steps:
                    stopped_early = True
                    log.warning(
                        "`train.max_minutes` (%s) reached at step %d: stopped after checkpointing",
                        cfg.train.max_minutes,
                        self.step,
                    )
                    break
        finally:
            if bar is not None:
                bar.close()
            self.metrics.close()
            self.trajectory_log.close()
            await self.collector.close()
            try:
                self.train_env.close()
            except Exception:  # closing is best effort
                log.warning("closing the training environment failed", exc_info=True)
        return TrainResult(self.run_dir, self.step, stopped_early, list(self.eval_history), last)

    async def aclose(self) -> None:
        for closer in self._components.closers if self._components else []:
            r = closer()
            if asyncio.iscoroutine(r):
                await r


def _init_distributed(cfg: Config) -> int:
    """This process's rank when launched by torchrun / accelerate with `WORLD_SIZE` > 1, else -1.
    A single process with `train.sharding: fsdp` gets a process group of its own (FSDP needs
    one); it still counts as not distributed (-1)."""
    import os

    import torch
    import torch.distributed as dist

    cuda = resolve_device(cfg.model.device).startswith("cuda")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        if cfg.train.sharding == "fsdp" and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
        return -1
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank()


def _broadcast(obj: Any, *, receive: bool = False) -> Any:
    """Rank 0 sends `obj` (a batch, or None to stop) to every rank; other ranks receive it."""
    import torch.distributed as dist

    box = [None if receive else obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train(
    cfg: Config, *, run_dir: str | Path | None = None, resume: bool = False, components: Components | None = None
) -> TrainResult:
    """Run training to the end (or `train.max_minutes`); returns where it stopped.

    Under `torchrun` / `accelerate launch` (`WORLD_SIZE` > 1) the process group is initialised
    here (NCCL on GPUs, gloo on CPU): rank 0 runs rollouts, the tracker, evaluation, metrics and
    checkpoints and broadcasts each batch; every rank takes part in the learner update. A single
    process with `train.sharding: fsdp` gets a one-rank group, removed again at the end."""
    import torch.distributed as dist

    initialized_before = dist.is_available() and dist.is_initialized()
    rank = _init_distributed(cfg)
    own_group = rank < 0 and dist.is_available() and dist.is_initialized() and not initialized_before
    try:
        return _train(cfg, rank, run_dir, resume, components)
    finally:
        if own_group:
            dist.destroy_process_group()


def _train(
    cfg: Config, rank: int, run_dir: str | Path | None, resume: bool, components: Components | None
) -> TrainResult:
    if components is None and rank <= 0:  # bad names and options fail before a run directory exists
        preflight(cfg, make_env_factory(cfg))
    if run_dir is None:
        run_dir = new_run_dir(cfg) if rank <= 0 else None
        if rank >= 0:
            run_dir = _broadcast(str(run_dir) if rank == 0 else None, receive=rank != 0)
    run_dir = Path(run_dir)
    if rank <= 0:
        print(f"run directory: {run_dir}", file=sys.stderr)
        t = cfg.tracker
        rho = (
            f"constant rho {t.rho_constant}"
            if t.rho_type == "constant"
            else f"KL-adaptive rho in [{t.rho_min}, {t.rho_max}], D_half {t.d_half}, drift `{t.drift}`"
        )
        print(
            f"{cfg.algorithm.name}: advantage `{advantage_name(cfg)}`, tracker {rho}, sampler `{cfg.sampler.type}`",
            file=sys.stderr,
        )
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
