"""Held-out evaluation during training: `eval.limit` problems of `env.eval_split`, `eval.k` samples
each, through the evaluation runner, written to `RUN_DIR/eval/step-N/`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from spo_agents.config import Config


class HeldOutEval:
    """Evaluates the policy at the steps `eval.every` names (and the first and last)."""

    def __init__(self, cfg: Config, env_factory: Callable[[str], Any], run_dir: Path) -> None:
        self.cfg = cfg
        self.env_factory = env_factory
        self.run_dir = run_dir
        self.problem_ids: list[str] = []
        self.history: list[tuple[int, float]] = []  # (step, avg@k)

    @property
    def enabled(self) -> bool:
        return self.cfg.eval.every > 0 and self.cfg.eval.limit > 0

    def due(self, step: int, final: bool) -> bool:
        return self.enabled and (step % self.cfg.eval.every == 0 or final)

    async def run(self, policy: Any, step: int) -> dict[str, float]:
        """The `eval/*` metrics of `policy` now (logged as step `step`)."""
        from spo_agents.evaluation.runner import evaluate
        from spo_agents.rollout.policy.base import SamplingParams

        cfg, e = self.cfg, self.cfg.eval
        if not self.problem_ids:
            env = self.env_factory(cfg.env.eval_split)
            self.problem_ids = list(env.problem_ids)[: e.limit]
            env.close()
        report = await evaluate(
            lambda: self.env_factory(cfg.env.eval_split),
            policy,
            self.problem_ids,
            k=e.k,
            sampling=SamplingParams.of(e, cfg.rollout.max_new_tokens),
            concurrency=cfg.rollout.max_in_flight,
            out_dir=self.run_dir / "eval" / f"step-{step:06d}",
            progress=False,
            max_episode_tokens=cfg.rollout.max_episode_tokens,
            seed=cfg.train.seed,
        )
        self.history.append((step, report.avg_at_k))
        return {
            "eval/avg_at_k": report.avg_at_k,
            "eval/pass_at_k": report.pass_at_k.get(e.k, float("nan")),
            "eval/maj_at_k": report.maj_at_k,
            "eval/k": e.k,
            "eval/problems": report.num_problems,
        }
