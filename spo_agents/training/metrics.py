"""Training metrics: one JSON object per step in `RUN_DIR/metrics.jsonl`, optionally mirrored to
TensorBoard (`logging.tensorboard: true`) and Weights & Biases (`logging.wandb: true`; set
`WANDB_MODE=offline` to log without an account).

`METRICS` documents every key the training loop writes; a test fails when a key is written
without documentation. `markdown_table()` renders the documentation in docs/metrics.md.
Only the training loop writes metrics; it builds them from typed stats objects.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from spo_agents.errors import ConfigError

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
    "learner/grad_norm": "Gradient norm before clipping (mean over optimiser steps).",
    "learner/lr": "Learning rate of the step.",
    "learner/optimizer_steps": "Optimiser steps taken this step (`train.mini_batches` x `train.epochs`).",
    "eval/avg_at_k": "Held-out evaluation: mean correctness over k samples per problem (docs/algorithm.md section 6).",
    "eval/pass_at_k": "Held-out evaluation: unbiased pass@k.",
    "eval/maj_at_k": "Held-out evaluation: majority-vote correctness over k samples.",
    "eval/k": "Samples per problem in the held-out evaluation.",
    "eval/problems": "Problems in the held-out evaluation.",
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
    rows = []
    lines = p.read_text(encoding="utf-8").splitlines(keepends=True)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
    return rows


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
