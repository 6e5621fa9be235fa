"""Training metrics: one JSON object per step in `RUN_DIR/metrics.jsonl` (mirrored to TensorBoard
and Weights & Biases when enabled), built by `step_row` / `time_row` from typed stats.

`METRICS` documents every key (docs/metrics.md is `markdown_table()`; a test keeps them in sync).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spo_agents.errors import ConfigError
from spo_agents.files import read_jsonl_records

if TYPE_CHECKING:
    from spo_agents.training.learner import LearnerStats
    from spo_agents.types import Trajectory

# key -> what it means. Keys are grouped by their prefix.
METRICS: dict[str, str] = {
    "step": "Learner step just completed (1-based; `0` is the evaluation before any update).",
    "time/elapsed_s": "Wall-clock seconds since the run (or the resumed run) started.",
    "time/step_s": "Wall-clock seconds of this step, from the end of the previous one.",
    "time/rollout_wait_s": (
        "Seconds the loop waited for the batch's trajectories to finish (generation and sandbox, overlapped)."
    ),
    "time/learner_s": (
        "Seconds of the learner update, including the drift re-scoring forward passes and, with a server backend, "
        "the weight push."
    ),
    "time/checkpoint_s": (
        "Seconds spent writing the checkpoint at the end of the previous step (0 when none was written; "
        "the row is logged before its own checkpoint)."
    ),
    "time/eval_s": "Seconds of held-out evaluation this step (0 when none ran).",
    "time/share_generate": (
        "Share of the step's wall time attributed to generation "
        "(the rollout wait split by the episodes' own generate/sandbox timings)."
    ),
    "time/share_sandbox": "Share of the step's wall time attributed to sandbox tool calls (same attribution).",
    "time/share_learner": "Share of the step's wall time spent in the learner update.",
    "perf/tokens_per_s": "Generated tokens in the batch divided by the step's wall time.",
    "perf/generated_tokens": "Tokens the policy sampled in the batch (the tokens trained on).",
    "train/reward_mean": "Mean reward of the batch's trajectories.",
    "train/reward_std": "Standard deviation of the batch's rewards.",
    "train/accuracy": "Share of the batch's episodes whose final answer was correct.",
    "train/advantage_raw_std": (
        "Standard deviation of r - baseline before normalisation (the variance the baseline removes; paper Sec. 5)."
    ),
    "train/advantage_mean": "Mean of the normalised advantages (about 0 by construction, docs/algorithm.md section 2).",
    "train/advantage_std": (
        "Standard deviation of the normalised advantages (about 1, or 0 when every advantage is equal)."
    ),
    "train/batch_size": "Trajectories used by the learner this step (after dropping rollout errors).",
    "train/degenerate_share": (
        "GRPO only: share of samples in groups whose rewards are all equal (zero advantage, wasted compute; "
        "docs/algorithm.md section 0)."
    ),
    "tracker/v_hat_mean": (
        "Mean v_hat over the batch's problems before their rewards were folded in (the baseline used)."
    ),
    "tracker/v_hat_p10": "10th percentile of the batch's v_hat (before update).",
    "tracker/v_hat_p50": "Median of the batch's v_hat (before update).",
    "tracker/v_hat_p90": "90th percentile of the batch's v_hat (before update).",
    "tracker/v_hat_all_mean": "Mean v_hat over all training problems after the update.",
    "tracker/rho_mean": "Mean forgetting factor rho applied to the batch's problems (docs/algorithm.md section 1).",
    "tracker/rho_min": "Smallest rho applied this step.",
    "tracker/rho_max": "Largest rho applied this step.",
    "tracker/drift": (
        "Policy drift measured this step: token-mean |log pi_after - log pi_before| on the batch "
        "(see spo_agents.training.learner)."
    ),
    "tracker/drift_revisited": "`tracker.compare_drift` only: problems of the batch visited before (one per problem).",
    "tracker/drift_revisited_per_prompt": (
        "`tracker.compare_drift` only: mean per-prompt D(x) (re-scored last response) over them."
    ),
    "tracker/drift_revisited_cumulative": (
        "`tracker.compare_drift` only: mean cumulative D(x) (C - C at the last visit) over them."
    ),
    "tracker/drift_per_prompt_mean": "`tracker.drift: per-prompt` only: mean D(x) over the batch's problems.",
    "sampler/entropy": "Entropy (nats) of the sampler's problem distribution; log(N) is uniform.",
    "sampler/entropy_ratio": "Sampler entropy divided by log(N): 1 for uniform, lower when few problems dominate.",
    "episode/tool_calls": "Mean tool calls per episode.",
    "episode/tool_failures": (
        "Mean tool calls per episode whose code raised, timed out or ran out of memory (user-code failures, data)."
    ),
    "episode/sandbox_errors": (
        "Tool calls of this step's finished episodes (trained or dropped) where the sandbox infrastructure failed "
        "(not the model's fault)."
    ),
    "episode/infra_error_share": (
        "Share of this step's finished episodes lost to infrastructure errors "
        "(`rollout.max_error_share` warns and, in a row, stops)."
    ),
    "train/zero_advantages": "1 when every advantage of the batch was zero (the update teaches nothing), else 0.",
    "train/no_success": "1 when no episode of the batch earned a reward above 0, else 0.",
    "episode/rollout_errors": (
        "Episodes dropped from this step because of an infrastructure error (`Trajectory.error`)."
    ),
    "episode/truncation_rate": "Share of episodes that ended because a budget ran out (`truncated`).",
    "episode/generated_tokens": "Mean tokens the policy sampled per episode.",
    "episode/length_tokens": "Mean tokens per episode after the prompt (generated and environment-inserted).",
    "episode/staleness": (
        "Mean number of learner steps between the weights that generated an episode and the update that trains on it."
    ),
    "episode/generate_s": "Mean seconds per episode spent in generation calls.",
    "episode/sandbox_s": "Mean seconds per episode spent in sandbox tool calls.",
    "learner/loss": "PPO-clip loss (mean over optimiser steps).",
    "learner/clip_frac": "Share of tokens whose ratio was clipped.",
    "learner/approx_kl": "Approximate KL between the behaviour policy and the current policy on the batch's tokens.",
    "learner/entropy": "Mean token entropy of the policy (when the loss computed it).",
    "learner/ratio_mean": "Mean importance ratio pi/pi_old over trained tokens.",
    "learner/logprob_diff_mean": "Mean |rollout - learner| log-prob of the batch's trained tokens, the learner scoring "
    "them at the start of the update (0 when the backends agree).",
    "learner/logprob_diff_max": "Largest |rollout - learner| log-prob over the batch's trained tokens.",
    "learner/grad_norm": "Gradient norm before clipping (mean over optimiser steps).",
    "learner/lr": "Learning rate of the step.",
    "learner/optimizer_steps": "Optimiser steps taken this step (`train.mini_batches` x `train.epochs`).",
    "eval/avg_at_k": "Held-out evaluation: mean correctness over k samples per problem (docs/algorithm.md section 6).",
    "eval/pass_at_k": "Held-out evaluation: unbiased pass@k.",
    "eval/maj_at_k": "Held-out evaluation: majority-vote correctness over k samples.",
    "eval/k": "Samples per problem in the held-out evaluation.",
    "eval/problems": "Problems in the held-out evaluation.",
}


@dataclass(frozen=True)
class StepStats:
    """What one step produced, for its metrics row. Arrays are per trained trajectory [B] unless
    noted; `v_before` is the batch's v_hat before the tracker update (the baseline used)."""

    step: int
    trajectories: Sequence[Trajectory]  # trained on (rollout errors dropped)
    failed: Sequence[Trajectory]  # dropped for infrastructure errors
    rewards: np.ndarray
    raw_advantages: np.ndarray  # r - baseline, before normalisation
    advantages: np.ndarray
    v_before: np.ndarray
    v_all: np.ndarray  # [N] every problem's v_hat after the update
    sampler_weights: np.ndarray  # [N] the sampler's weights after the update
    rho: np.ndarray
    learner: LearnerStats
    drift_per_prompt: np.ndarray | None = None  # `tracker.drift: per-prompt`: D(x) per trajectory
    group_ids: Sequence[str | None] | None = None  # grouped collection only
    rollout_s: float = 0.0
    learner_s: float = 0.0


@dataclass(frozen=True)
class StepTimes:
    """Wall-clock seconds around one step (`time/*`)."""

    step_s: float
    eval_s: float
    checkpoint_s: float
    elapsed_s: float


def step_row(s: StepStats) -> dict[str, Any]:
    """The step's metrics row without the evaluation, timing shares and health keys."""
    good, n = s.trajectories, len(s.trajectories)
    gen = sum(t.num_generated for t in good)
    tool_calls = [tc for t in good for tc in t.tool_calls]
    lst = s.learner
    row: dict[str, Any] = {
        "step": s.step,
        "train/reward_mean": float(s.rewards.mean()),
        "train/reward_std": float(s.rewards.std()),
        "train/accuracy": float(np.mean([t.correct for t in good])),
        "train/advantage_raw_std": float(np.std(s.raw_advantages)),
        "train/advantage_mean": float(np.mean(s.advantages)),
        "train/advantage_std": float(np.std(s.advantages)),
        "train/batch_size": n,
        **_batch_values(s.v_before),
        "tracker/v_hat_all_mean": float(s.v_all.mean()),
        "tracker/rho_mean": float(np.mean(s.rho)),
        "tracker/rho_min": float(np.min(s.rho)),
        "tracker/rho_max": float(np.max(s.rho)),
        "tracker/drift": lst.drift,
        **_sampler_entropy(s.sampler_weights),
        "episode/tool_calls": len(tool_calls) / n,
        "episode/tool_failures": sum(1 for tc in tool_calls if not tc.ok and tc.infra_error is None) / n,
        "episode/truncation_rate": float(np.mean([t.truncated for t in good])),
        "episode/generated_tokens": gen / n,
        "episode/length_tokens": sum(len(t.token_ids) for t in good) / n,
        "episode/staleness": float(np.mean([s.step - 1 - t.policy_version for t in good])),
        "episode/generate_s": sum(t.timings.get("generate", 0.0) for t in good) / n,
        "episode/sandbox_s": sum(t.timings.get("sandbox", 0.0) for t in good) / n,
        "learner/loss": lst.loss,
        "learner/clip_frac": lst.clip_frac,
        "learner/approx_kl": lst.approx_kl,
        "learner/entropy": lst.entropy,
        "learner/ratio_mean": lst.ratio_mean,
        "learner/logprob_diff_mean": lst.logprob_diff_mean,
        "learner/logprob_diff_max": lst.logprob_diff_max,
        "learner/grad_norm": lst.grad_norm,
        "learner/lr": lst.lr,
        "learner/optimizer_steps": lst.optimizer_steps,
        "perf/generated_tokens": gen,
        "time/rollout_wait_s": s.rollout_s,
        "time/learner_s": s.learner_s,
    }
    if s.drift_per_prompt is not None:
        row["tracker/drift_per_prompt_mean"] = float(np.mean(s.drift_per_prompt))
    row["episode/rollout_errors"] = len(s.failed)
    row["episode/sandbox_errors"] = sum(1 for t in [*good, *s.failed] for tc in t.tool_calls if tc.infra_error)
    if s.group_ids is not None:
        from spo_agents.algorithm.advantages import degenerate_share

        row["train/degenerate_share"] = degenerate_share(s.rewards, list(s.group_ids))
    return row


def _batch_values(v: np.ndarray) -> dict[str, float]:
    """`tracker/v_hat_*` over the batch's problems before the update (`TrackerSummary` in
    `spo_agents.algorithm.tracker` is the other view: all visited problems)."""
    q = np.quantile(v, [0.1, 0.5, 0.9])
    return {
        "tracker/v_hat_mean": float(v.mean()),
        "tracker/v_hat_p10": float(q[0]),
        "tracker/v_hat_p50": float(q[1]),
        "tracker/v_hat_p90": float(q[2]),
    }


def _sampler_entropy(w: np.ndarray) -> dict[str, float]:
    p = w / w.sum()
    ent = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    return {"sampler/entropy": ent, "sampler/entropy_ratio": ent / math.log(len(w)) if len(w) > 1 else 1.0}


def time_row(row: dict[str, Any], times: StepTimes) -> dict[str, Any]:
    """`time/*` and `perf/tokens_per_s` of a step row. The rollout wait is split between generation
    and sandbox by the episodes' own timings (`episode/generate_s` vs `episode/sandbox_s`)."""
    wall = max(times.step_s, 1e-9)
    split = row["episode/generate_s"] + row["episode/sandbox_s"]
    g = row["episode/generate_s"] / split if split > 0 else 1.0
    return {
        "time/step_s": times.step_s,
        "time/eval_s": times.eval_s,
        "time/checkpoint_s": times.checkpoint_s,
        "time/elapsed_s": times.elapsed_s,
        "time/share_generate": row["time/rollout_wait_s"] * g / wall,
        "time/share_sandbox": row["time/rollout_wait_s"] * (1 - g) / wall,
        "time/share_learner": row["time/learner_s"] / wall,
        "perf/tokens_per_s": row["perf/generated_tokens"] / wall,
    }


def drift_comparison(c_last: np.ndarray, c_now: float, idx: np.ndarray, drift_pp: Sequence[float]) -> dict[str, float]:
    """`tracker.compare_drift`: both D(x) estimates on the batch's revisited problems, before the
    tracker update: per-prompt (re-scored stored response) and cumulative (C - C at the last visit).
    `c_last` [N]: C at each problem's last visit (NaN: never visited); `idx` [B] the batch's problems."""
    c_batch = c_last[idx]  # [B]
    seen = ~np.isnan(c_batch)
    _, first = np.unique(idx, return_index=True)
    revisited = np.zeros(idx.shape, dtype=bool)
    revisited[first] = seen[first]  # one per problem: later copies have D = 0 by rule
    if not revisited.any():
        return {"tracker/drift_revisited": 0}
    return {
        "tracker/drift_revisited": int(revisited.sum()),
        "tracker/drift_revisited_per_prompt": float(np.asarray(drift_pp)[revisited].mean()),
        "tracker/drift_revisited_cumulative": float((c_now - c_batch[revisited]).mean()),
    }


def undocumented(keys: Any) -> list[str]:
    """Keys not in `METRICS`."""
    return sorted(k for k in keys if k not in METRICS)


def markdown_table() -> str:
    """The metric documentation as a markdown table (docs/metrics.md)."""
    rows = ["| key | meaning |", "|---|---|"]
    rows += [f"| `{k}` | {v} |" for k, v in METRICS.items()]
    return "\n".join(rows)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics file; a torn last line (crash mid-write) is skipped."""
    p = Path(path)
    if not p.is_file():
        return []
    return list(read_jsonl_records(p))


def truncate_after(path: str | Path, step: int) -> None:
    """Drop rows with `step` > `step` (steps lost in a crash, before a resume), atomically."""
    from spo_agents.files import write_text_atomic

    p = Path(path)
    if not p.is_file():
        return
    rows = [r for r in read_metrics(p) if int(r.get("step", 0)) <= step]
    write_text_atomic(p, "".join(json.dumps(r) + "\n" for r in rows))


class MetricsWriter:
    """Appends one JSON line per `log` call (flushed and fsync'ed) and mirrors to the sinks."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str = "spo-agents",
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")
        self._tb = None
        self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError(
                    "`logging.tensorboard: true` needs `tensorboard`: `pip install 'spo-agents[logging]'`"
                ) from e
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_mod
            except ImportError as e:
                raise ConfigError(
                    "`logging.wandb: true` needs `wandb`: `pip install 'spo-agents[logging]'` "
                    "(set `WANDB_MODE=offline` to log without an account)"
                ) from e
            self._wandb = wandb_mod.init(
                project=wandb_project, name=run_name, dir=str(run_dir), config=config or {}, resume="allow"
            )

    def log(self, row: dict[str, Any]) -> None:
        if "step" not in row:
            raise ValueError("a metrics row needs a `step`")
        clean = {k: _clean(v) for k, v in row.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        step = int(row["step"])
        scalars = {
            k: v for k, v in clean.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
