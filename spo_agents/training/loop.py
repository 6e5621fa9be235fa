"""The training loop behind `spo-agent train`: `Trainer.train_step` is one step of SPO (paper Alg. 1),
`Trainer.run` repeats it with held-out evaluation, metrics and checkpoints (docs/training.md, "The loop").

Departures from the paper:
1. Episodes that fail for infrastructure reasons are dropped: never trained on, never folded into v_hat.
2. With a server backend generation continues during the update (`rollout.max_staleness` bounds the lag).
3. rho's drift D(x) is cumulative (C - C at the last visit) unless `tracker.drift: per-prompt`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spo_agents.config import Config, to_dict
from spo_agents.errors import CheckpointError, ConfigError, RolloutError
from spo_agents.serving.weight_sync import publish
from spo_agents.training.batch import Batch, make_batch
from spo_agents.training.components import (
    Components,
    build_components,
    load_model,
    pad_id,
    resolve_device,
    seed_everything,
)
from spo_agents.training.follower import Follower, Stop, Update, gather, send, world
from spo_agents.training.held_out import HeldOutEval
from spo_agents.training.metrics import StepStats, StepTimes, drift_comparison, step_row, time_row
from spo_agents.training.run import advantage_name, load_run_config, new_run_dir, train  # noqa: F401 - re-exported
from spo_agents.types import Trajectory

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # last completed step
    stopped_early: bool  # `train.max_minutes` was reached
    eval_history: list[tuple[int, float]]  # (step, avg@k) of the held-out evaluations
    last_metrics: dict[str, Any]


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

        cfg.check_trainable()
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
        self.world = world()

    # -- setup -------------------------------------------------------------------------------
    def _setup(self) -> None:
        from spo_agents.algorithm.sampler import make_sampler
        from spo_agents.algorithm.tracker import ValueTracker
        from spo_agents.training.checkpoint import set_rng_state
        from spo_agents.training.health import HealthLimits, StepHealth
        from spo_agents.training.learner import Learner, LearnerSettings
        from spo_agents.training.metrics import MetricsWriter, truncate_after

        cfg = self.cfg
        seed_everything(cfg.train.seed)
        loaded = self.ckpt.load() if self.resume_from is not None else None
        if self._components is None:
            self._components = build_components(
                cfg, weights_from=loaded.model_dir if loaded else None, log_dir=self.run_dir, checked=self._checked
            )
        elif loaded is not None:
            self.ckpt.load_model_weights(self._components.model, loaded)
        comp = self._components
        if cfg.train.sharding == "fsdp" and self.world.distributed and comp.inplace:
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
        self.learner = Learner(self.model, LearnerSettings.from_config(cfg), pad_id=pad_id(self.tokenizer))
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
        self.group_size = cfg.algorithm.group_size if cfg.algorithm.name == "grpo" else 1
        self.collector = self._collector()
        # In-place backends serve the loaded weights now; a server serves them only after the
        # push in `_run`, and until then its tokens belong to the initial weights (version 0).
        self.collector.resume(self.step if comp.weight_sync is None else 0)
        if loaded is not None and "collector" in loaded.state:  # checkpoints written before it was saved lack it
            self.collector.load_state_dict(loaded.state["collector"])
        self.metrics = MetricsWriter(
            self.run_dir,
            tensorboard=cfg.logging.tensorboard,
            wandb=cfg.logging.wandb,
            wandb_project=cfg.logging.wandb_project,
            run_name=self.run_dir.name,
            config=to_dict(cfg),
        )
        self.trajectory_log = self._trajectory_log()
        limits = HealthLimits(cfg.rollout.max_error_share, cfg.rollout.max_error_steps)
        self.health = StepHealth(limits, warn=self._console)
        self.held_out = HeldOutEval(cfg, comp.env_factory, self.run_dir)

    def _collector(self) -> Any:
        from spo_agents.rollout.collector import Collector
        from spo_agents.rollout.policy.base import SamplingParams

        cfg, comp, r = self.cfg, self._components, self.cfg.rollout
        return Collector(  # episodes in this process, or in `comp.runner` (Ray actors)
            None if comp.runner is not None else lambda: comp.env_factory(cfg.env.split),
            self.policy,
            max_in_flight=r.max_in_flight,
            sampling=SamplingParams.of(r, r.max_new_tokens),
            max_episode_tokens=r.max_episode_tokens,
            group_size=self.group_size,
            max_staleness=r.max_staleness,
            seed=cfg.train.seed,
            runner=comp.runner,
        )

    def _trajectory_log(self) -> Any:
        from spo_agents.trajectories import TrajectoryLog

        t = self.cfg.train
        return TrajectoryLog(
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

    # -- one step ------------------------------------------------------------------------------
    async def train_step(self) -> dict[str, Any]:
        """One step of SPO (paper Alg. 1; docs/training.md, "The loop"); returns its metrics row."""
        t0 = time.perf_counter()
        self._refill()  # 1. sample problems by their weights (Eq. 11)
        good, failed = await self._roll_out()  # 2. the first batch_size episodes to finish
        t_rollout = time.perf_counter() - t0
        batch = make_batch(good, self.tracker, self.cfg, grouped=self.group_size > 1)  # 3. advantages, v_hat before
        lstats, drift_pp = await self._learn_and_publish(batch)  # 4. PPO-clip update, weights to the policy
        t_learn = time.perf_counter() - t0 - t_rollout
        tracked = await self._track(batch, lstats, drift_pp)  # 5. tracker
        return self._metrics(batch, failed, lstats, tracked, (t_rollout, t_learn))  # 6. metrics

    def _refill(self) -> None:
        """1. Keep `ceil(batch_size * oversample)` episodes outstanding, drawing problems by the
        sampler's weights (Eq. 11). New problems avoid those still in flight while the pool
        allows it: over-sampling stops at the pool's size, and a problem runs twice at once only
        when one batch needs more problems than the pool has."""
        cfg, g = self.cfg, self.group_size
        target = max(cfg.train.batch_size, math.ceil(cfg.train.batch_size * cfg.rollout.oversample))
        unsettled = self.collector.outstanding // g  # submissions: episodes, or groups of g
        cap = max(cfg.train.batch_size // g, len(self.problem_ids))
        need = min((target - self.collector.outstanding) // g, cap - unsettled)
        if need <= 0:
            return
        busy = self.tracker.indices(self.collector.busy_problems)
        idx = self.sampler.draw(self.tracker.v_hat(), need, busy, n_eff=self._n_eff())
        self.collector.submit([self.problem_ids[i] for i in idx])

    def _scores_drift(self) -> bool:
        """Whether each update re-scores the stored responses (per-prompt drift, or comparing)."""
        return self.cfg.tracker.drift == "per-prompt" or self.cfg.tracker.compare_drift

    def _n_eff(self) -> np.ndarray | None:
        """alpha + beta per problem, for `sampler.gamma` > 0."""
        if self.cfg.sampler.gamma <= 0:
            return None
        return self.tracker.alpha.astype(np.float64) + self.tracker.beta

    async def _roll_out(self) -> tuple[list[Trajectory], list[Trajectory]]:
        """2. The first `batch_size` episodes that finish (whole groups in GRPO mode), and those
        that failed for infrastructure reasons."""
        batch = await self.collector.next_batch(self.cfg.train.batch_size)
        good = [t for t in batch if t.error is None]
        failed = [t for t in batch if t.error is not None] + self.collector.take_failed()
        if not good:
            last = failed[-1].error if failed else "none recorded"
            raise RolloutError(
                f"every trajectory of the batch failed for infrastructure reasons (last: {last}); see the log"
            )
        return good, failed

    async def _learn_and_publish(self, b: Batch) -> tuple[Any, list[float] | None]:
        """4. The PPO-clip update, then the policy serves the new weights as version `step`. An
        in-place policy shares the learner's module, so it is paused during the update; a server
        keeps generating until `publish` drains it. Returns the learner's stats and, when drift is
        re-scored per prompt, D(x) of each trajectory measured before the update."""
        comp = self._components
        if comp.inplace:
            await self.policy.pause()
        if self.world.distributed:  # the other ranks score and update with this rank (`Follower`)
            await asyncio.to_thread(send, Update(b.trajectories, b.advantages.tolist()))
        drift_pp = await asyncio.to_thread(self.learner.prompt_drift, b.problem_ids) if self._scores_drift() else None
        lstats = await asyncio.to_thread(self.learner.update, b.trajectories, b.advantages)
        self.step += 1
        await publish(self.collector, comp.weight_sync, await self._published_model(), self.step)
        return lstats, drift_pp

    async def _published_model(self) -> Any:
        """What `publish` pushes: a sharded learner's full weights, gathered on rank 0 (a collective)."""
        if self._components.weight_sync is None or not self.learner.sharded:
            return self.model
        from spo_agents.sharding import GatheredModel

        weights = await asyncio.to_thread(gather, self.model, self.learner, "weights", self.cfg.model.dtype)
        return GatheredModel(self.model, weights)

    async def _track(self, b: Batch, lstats: Any, drift_pp: list[float] | None) -> tuple[Any, Any, dict[str, float]]:
        """5. Fold the rewards into the tracker with rho from the drift measured so far, then add
        this step's drift to C. Returns rho, the per-prompt D(x) used (or None) and the
        `tracker.compare_drift` metrics."""
        cfg = self.cfg.tracker
        compared = drift_comparison(self.tracker.c_last, self.tracker.C, b.idx, drift_pp) if cfg.compare_drift else {}
        drift = np.asarray(drift_pp) if drift_pp is not None and cfg.drift == "per-prompt" else None
        rho = self.tracker.update(b.idx, b.rewards, drift=drift)
        await asyncio.to_thread(
            self.trajectory_log.record, self.step, b.trajectories, b.advantages, b.v_before, rho, self.tokenizer
        )
        if cfg.drift == "cumulative":
            self.tracker.add_drift(lstats.drift)
        return rho, drift, compared

    def _metrics(
        self, b: Batch, failed: list[Trajectory], lstats: Any, tracked: tuple, times: tuple[float, float]
    ) -> dict[str, Any]:
        """6. The step's metrics row (`spo_agents.training.metrics`) and its health checks.
        `tracked`: what `_track` returned; `times`: seconds of the rollout wait and the update."""
        rho, drift, compared = tracked
        v_all = self.tracker.v_hat()
        stats = StepStats(
            step=self.step,
            trajectories=b.trajectories,
            failed=failed,
            rewards=b.rewards,
            raw_advantages=b.raw,
            advantages=b.advantages,
            v_before=b.v_before,
            v_all=v_all,
            sampler_weights=self.sampler.weights(v_all, self._n_eff()),
            rho=rho,
            learner=lstats,
            drift_per_prompt=drift,
            group_ids=b.group_ids,
            rollout_s=times[0],
            learner_s=times[1],
        )
        row = {**step_row(stats), **compared}
        error = failed[-1].error if failed else None
        row.update(self.health.observe(self.step, len(b.trajectories), len(failed), b.advantages, b.rewards, error))
        return row

    # -- around the steps ------------------------------------------------------------------------
    def _shard(self, model: Any) -> None:
        """Apply `train.sharding: fsdp` to `model` (after any checkpoint weights are loaded)."""
        from spo_agents.sharding import is_sharded, shard_model

        if self.cfg.train.sharding == "fsdp" and not is_sharded(model):
            shard_model(model, compute_dtype=self.cfg.model.dtype, device_type=resolve_device(self.cfg.model.device))

    def _checkpoint(self) -> float:
        from spo_agents.sharding import GatheredModel
        from spo_agents.training.checkpoint import rng_state

        t0 = time.perf_counter()
        model, learner_state = self.model, None
        if self.learner.sharded:
            weights, learner_state = gather(self.model, self.learner, "state", self.cfg.model.dtype)
            model = GatheredModel(self.model, weights)
        state = {
            "tracker": self.tracker.state_dict(),
            "sampler": self.sampler.state_dict(),
            "collector": self.collector.state_dict(),
            "learner": learner_state if learner_state is not None else self.learner.state_dict(),
            "rng": rng_state(),
            "config": to_dict(self.cfg),
        }
        self.ckpt.save(self.step, model=model, tokenizer=self.tokenizer, state=state)
        return time.perf_counter() - t0

    def _console(self, msg: str) -> None:
        """A line on the console now (above the progress bar when there is one)."""
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    # -- the run -----------------------------------------------------------------------------
    async def run(self) -> TrainResult:
        if self.world.distributed and not self.world.leader:
            return self._follow()
        try:
            return await self._run()
        finally:
            if self.world.distributed:
                await asyncio.to_thread(send, Stop())  # releases the followers

    def _follow(self) -> TrainResult:
        """Ranks > 0 of a distributed learner: the model and learner, then `Follower` until `Stop`."""
        from spo_agents.training.learner import Learner, LearnerSettings

        seed_everything(self.cfg.train.seed)
        loaded = self.ckpt.load() if self.resume_from is not None else None
        if self._components is None:
            model, tokenizer = load_model(self.cfg, weights_from=loaded.model_dir if loaded else None)
        else:
            model, tokenizer = self._components.model, self._components.tokenizer
            if loaded is not None:
                self.ckpt.load_model_weights(model, loaded)
        self._shard(model)
        self.model = model
        self.learner = Learner(model, LearnerSettings.from_config(self.cfg), pad_id=pad_id(tokenizer))
        if loaded is not None:
            self.learner.load_state_dict(loaded.state["learner"])
        start = loaded.step if loaded else 0
        self.step = Follower(self.learner, model, self.cfg.model.dtype, self._scores_drift(), start).run()
        return TrainResult(self.run_dir, self.step, False, [], {})

    async def _run(self) -> TrainResult:
        cfg = self.cfg
        self._setup()
        if self.step > 0 and self._components.weight_sync is not None:  # the server still serves the initial weights
            await publish(self.collector, self._components.weight_sync, await self._published_model(), self.step)
        self._t_start = time.perf_counter()
        if cfg.logging.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=cfg.train.steps, initial=self.step, desc="spo-agent train", unit="step", dynamic_ncols=True
            )
        stopped_early, last = False, {}
        try:
            if self.step == 0 and self.held_out.enabled:
                await self._evaluate_first()
            t_prev, t_ckpt = time.perf_counter(), 0.0
            while self.step < cfg.train.steps:
                row = await self.train_step()
                elapsed = time.perf_counter() - self._t_start
                out_of_time = cfg.train.max_minutes is not None and elapsed / 60 >= cfg.train.max_minutes
                final = self.step >= cfg.train.steps or out_of_time
                t_eval = 0.0
                if self.held_out.due(self.step, final):
                    t = time.perf_counter()
                    row.update(await self.held_out.run(self.policy, self.step))
                    t_eval = time.perf_counter() - t
                # The row is logged before the checkpoint: a crash in between leaves a row newer
                # than the checkpoint, which the resume drops (never a checkpoint without its row).
                now = time.perf_counter()
                times = StepTimes(now - t_prev, t_eval, t_ckpt, now - self._t_start)
                last = {**row, **time_row(row, times)}
                self.metrics.log(last)
                t_ckpt = 0.0
                if final or (cfg.train.checkpoint_every > 0 and self.step % cfg.train.checkpoint_every == 0):
                    t_ckpt = await asyncio.to_thread(self._checkpoint)
                t_prev = now
                self._show(last)
                if out_of_time and self.step < cfg.train.steps:
                    stopped_early = True
                    log.warning(
                        "`train.max_minutes` (%s) reached at step %d: stopped after checkpointing",
                        cfg.train.max_minutes,
                        self.step,
                    )
                    break
        finally:
            await self._close_run()
        return TrainResult(self.run_dir, self.step, stopped_early, list(self.held_out.history), last)

    async def _evaluate_first(self) -> None:
        t = time.perf_counter()
        row = {"step": 0, **await self.held_out.run(self.policy, 0)}
        row["time/eval_s"] = time.perf_counter() - t
        self.metrics.log(row)
        if self._bar is not None:
            self._bar.write(f"step 0: held-out avg@{self.cfg.eval.k} = {row['eval/avg_at_k']:.3f}")

    def _show(self, row: dict[str, Any]) -> None:
        if self._bar is None:
            return
        post = {"reward": f"{row['train/reward_mean']:.3f}", "acc": f"{row['train/accuracy']:.3f}"}
        if "eval/avg_at_k" in row:
            post["eval"] = f"{row['eval/avg_at_k']:.3f}"
        self._bar.set_postfix(post)
        self._bar.update(1)

    async def _close_run(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self.metrics.close()
        self.trajectory_log.close()
        await self.collector.close()
        try:
            self.train_env.close()
        except Exception:  # closing is best effort
            log.warning("closing the training environment failed", exc_info=True)

    async def aclose(self) -> None:
        for closer in self._components.closers if self._components else []:
            r = closer()
            if asyncio.iscoroutine(r):
                await r
