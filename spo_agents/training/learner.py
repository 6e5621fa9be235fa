"""The learner: one PPO-clip phase of the policy on a batch of finished trajectories.

`Learner.update(trajectories, advantages)` packs the batch (`training.packing`), splits it into
`train.mini_batches` shuffled mini-batches of micro-batches under `train.micro_batch_tokens`,
takes one clipped AdamW step per mini-batch (`training.optimiser`), and measures the step's
policy drift for the value tracker (`training.drift`). docs/algorithm.md section 3 ("The
update") describes it in full, including the distributed and sharded paths.

Departures from the paper:
1. Default drift: the token-mean |log pi_after - log pi_before| on the step's own batch, summed
   (the authors re-score per prompt, `tracker.drift: per-prompt`, which stores pi_before: one
   update earlier than theirs).
2. `loss.behaviour_logprobs: recompute` re-scores the batch with the learner before the update
   and uses that as pi_old (beyond the paper; the rollout's log-probs by default).
3. `loss.tis_cap`: truncated importance sampling, each token's loss weighted by
   min(pi_old_learner / pi_behaviour, cap) (beyond the paper; off by default).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from spo_agents import sharding
from spo_agents.config.rules import AT_LEAST_1, BEHAVIOUR_LOGPROBS, POSITIVE, TIS_CAP, check
from spo_agents.errors import CheckpointError, ConfigError
from spo_agents.training.drift import PromptDriftStore, logprob_gap, mean_abs_diff, step_drift
from spo_agents.training.optimiser import Optimiser, world
from spo_agents.training.packing import (  # noqa: F401
    PackedBatch,
    has_dropout,
    micro_batches,
    mini_batch_chunks,
    mini_batch_order,
    pack,
    response_rows,
    response_tensor,
    token_logprobs,
)
from spo_agents.types import Trajectory


@dataclass
class LearnerStats:
    """What one update did. Means are token-weighted over the whole batch."""

    loss: float = 0.0
    clip_frac: float = 0.0
    approx_kl: float = 0.0
    entropy: float = 0.0
    ratio_mean: float = 0.0
    grad_norm: float = 0.0
    lr: float = 0.0
    drift: float = 0.0  # token-mean |log pi_after - log pi_before| on this batch
    logprob_diff_mean: float = 0.0  # token-mean |rollout - learner| behaviour log-prob, before the update
    logprob_diff_max: float = 0.0  # its largest token
    tokens: int = 0  # generated tokens trained on (all ranks)
    optimizer_steps: int = 0


@dataclass
class LearnerSettings:
    """Everything the update needs besides the model (built from `Config` by `from_config`)."""

    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    warmup_steps: int = 0
    mini_batches: int = 1
    epochs: int = 1
    micro_batch_tokens: int = 1024
    temperature: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float = 10.0
    aggregation: str = "token-mean"
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    drift: str = "cumulative"
    behaviour_logprobs: str = "rollout"  # pi_old of the ratio: the rollout's, or the learner's re-score
    tis_cap: float | None = None  # truncated importance sampling cap (None: off)

    @classmethod
    def from_config(cls, cfg: Any) -> LearnerSettings:
        return cls(
            lr=cfg.optim.lr,
            weight_decay=cfg.optim.weight_decay,
            betas=(float(cfg.optim.betas[0]), float(cfg.optim.betas[1])),
            grad_clip=cfg.optim.grad_clip,
            warmup_steps=cfg.optim.warmup_steps,
            mini_batches=cfg.train.mini_batches,
            epochs=cfg.train.epochs,
            micro_batch_tokens=cfg.train.micro_batch_tokens,
            temperature=cfg.rollout.temperature,
            eps_low=cfg.loss.eps_low,
            eps_high=cfg.loss.eps_high,
            dual_clip=cfg.loss.dual_clip,
            aggregation=cfg.loss.aggregation,
            kl_coef=cfg.loss.kl_coef,
            entropy_coef=cfg.loss.entropy_coef,
            # the responses per-prompt drift re-scores are kept in that mode and when comparing
            drift="per-prompt" if cfg.tracker.compare_drift else cfg.tracker.drift,
            behaviour_logprobs=cfg.loss.behaviour_logprobs,
            tis_cap=cfg.loss.tis_cap,
        )


class Learner:
    """Owns the trainable model's optimiser and applies PPO-clip updates (module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        settings: LearnerSettings,
        *,
        pad_id: int,
        device: torch.device | str | None = None,
    ) -> None:
        _check_settings(settings)
        self.model = model
        self.settings = settings
        self.pad_id = int(pad_id)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.sharded = sharding.is_sharded(model)
        if self.sharded and settings.kl_coef > 0:
            raise ConfigError(
                "`loss.kl_coef` > 0 needs a frozen reference model, which `train.sharding: fsdp` does not build; "
                "use `loss.kl_coef: 0` (the paper's setting) or `train.sharding: none`"
            )
        self.optim = Optimiser(
            model,
            lr=settings.lr,
            betas=settings.betas,
            weight_decay=settings.weight_decay,
            warmup_steps=settings.warmup_steps,
            grad_clip=settings.grad_clip,
            sharded=self.sharded,
        )
        self.ref_model = None
        if settings.kl_coef > 0:
            self.ref_model = copy.deepcopy(model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        self.prompt_store = PromptDriftStore() if settings.drift == "per-prompt" else None

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.optim.optimizer

    @property
    def scheduler(self) -> Any:
        return self.optim.scheduler

    # -- distributed -------------------------------------------------------------------------
    @staticmethod
    def _world() -> tuple[int, int]:
        return world()

    def _passes(self, n: int) -> int:
        """How many forwards this rank must run when it has `n` of its own: the most any rank
        has under sharding (every forward is a collective there), else `n`."""
        _, size = world()
        if not self.sharded or size == 1:
            return n
        t = torch.tensor([n], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    # -- scoring -----------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, trajectories: Sequence[Trajectory]) -> list[list[float]]:
        """Current-policy log-probs of every trajectory's response tokens (0.0 where mask is 0),
        computed in micro-batches under the token budget. With several ranks, each scores
        `trajectories[rank::world]` and all ranks get every result (a collective)."""
        rank, size = world()
        mine = list(range(rank, len(trajectories), size))
        scores: dict[int, list[float]] = {}
        groups = micro_batches([trajectories[i] for i in mine], self.settings.micro_batch_tokens)
        for j in range(self._passes(len(groups))):
            if j >= len(groups):  # only keeps the collectives of a sharded model in step
                token_logprobs(self.model, pack(trajectories[:1], self.pad_id, self.device), self.settings.temperature)
                continue
            idx = [mine[g] for g in groups[j]]
            b = pack([trajectories[i] for i in idx], self.pad_id, self.device)
            logp, _ = token_logprobs(self.model, b, self.settings.temperature)
            rows = response_rows(logp, b.mask, [len(trajectories[i].token_ids) for i in idx])
            scores.update(zip(idx, rows))
        if size > 1:
            parts: list[Any] = [None] * size
            torch.distributed.all_gather_object(parts, scores)
            scores = {i: v for part in parts for i, v in part.items()}
        return [scores.get(i, []) for i in range(len(trajectories))]

    @staticmethod
    def mean_abs_diff(
        trajectories: Sequence[Trajectory], a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]
    ) -> float:
        """Token-mean of |a - b| over generated tokens of all trajectories."""
        return mean_abs_diff(trajectories, a, b)

    def prompt_drift(self, problem_ids: Sequence[str]) -> list[float]:
        """Per-prompt D(x) for `problem_ids` (0 for problems without a stored response)."""
        if self.prompt_store is None:
            raise ConfigError("per-prompt drift needs `tracker.drift: per-prompt`")
        return self.prompt_store.drift(problem_ids, self.score)

    # -- the update --------------------------------------------------------------------------
    def update(self, trajectories: Sequence[Trajectory], advantages: Sequence[float] | torch.Tensor) -> LearnerStats:
        """One PPO-clip phase on the batch (module docstring). Every rank must call it with the
        same `trajectories` and `advantages`. The loss forwards run in train mode; the model is
        left in eval mode, so rollouts, evaluation and scoring never see dropout."""
        try:
            return self._update(trajectories, advantages)
        finally:
            self.model.eval()

    def _update(self, trajectories: Sequence[Trajectory], advantages: Sequence[float] | torch.Tensor) -> LearnerStats:
        s = self.settings
        trajs = list(trajectories)
        adv = torch.as_tensor(advantages, dtype=torch.float32).reshape(-1)
        if adv.numel() != len(trajs):
            raise ValueError(
                f"got {len(trajs)} trajectories but {adv.numel()} advantages; pass one advantage per trajectory"
            )
        _, size = world()
        stats = LearnerStats(tokens=sum(t.num_generated for t in trajs))
        if not trajs:
            return stats

        n_mb = min(s.mini_batches, len(trajs))
        # pi_before on the whole batch: free from the loss forward with one mini-batch, one epoch,
        # one process, no dropout and the rollout's pi_old; otherwise one extra no-grad forward
        needs_old = s.behaviour_logprobs == "recompute" or s.tis_cap is not None
        need_before = n_mb > 1 or s.epochs > 1 or size > 1 or has_dropout(self.model) or needs_old
        before = self.score(trajs) if need_before else None
        learner_old = before if needs_old else None
        before_free: list[list[float] | None] = [None] * len(trajs)

        self.model.train()
        acc = _Accumulator()
        chunks = mini_batch_chunks(trajs, n_mb)
        for epoch in range(s.epochs):
            for chunk in chunks:
                free = before_free if epoch == 0 and len(chunks) == 1 and size == 1 else None
                acc.grad_norms.append(self._mini_batch_step(trajs, adv, chunk, acc, free, learner_old))
                stats.optimizer_steps += 1
            stats.lr = self.optim.lr
        self.optim.scheduler.step()
        self._reduce_stats(stats, acc, n_mb * s.epochs)

        self.model.eval()
        # Drift of this step. Per-prompt mode stores each response with the log-probs of the
        # policy that acted on it (before this update), so D(x) at the next visit counts this
        # update too, as cumulative mode does (C at the visit is taken before `add_drift`).
        after = self.score(trajs)
        if before is None:
            before = [b if b is not None else [] for b in before_free]
        stats.drift = step_drift(trajs, after, before)
        stats.logprob_diff_mean, stats.logprob_diff_max = logprob_gap(trajs, before)
        if self.prompt_store is not None:
            for t, lp in zip(trajs, before):
                self.prompt_store.put(t, lp)
        return stats

    def _normalizer(self, trajs: Sequence[Trajectory]) -> float:
        if self.settings.aggregation == "seq-mean-token-mean":  # sequences with a trained token
            return float(max(1, sum(1 for t in trajs if t.num_generated > 0)))
        return float(max(1, sum(t.num_generated for t in trajs)))

    def _mini_batch_step(
        self,
        trajs: list[Trajectory],
        adv: torch.Tensor,
        chunk: list[int],
        acc: _Accumulator,
        before_free: list[list[float] | None] | None,
        learner_old: list[list[float]] | None,
    ) -> torch.Tensor:
        """One optimiser step on the mini-batch `chunk`: this rank's share in micro-batches,
        gradients accumulated against the whole mini-batch's normaliser; returns the grad norm.
        With `before_free`, the loss forward's log-probs are recorded there (pi_before)."""
        s = self.settings
        rank, size = world()
        normalizer = self._normalizer([trajs[i] for i in chunk])
        mine = chunk[rank::size]
        self.optim.zero_grad()
        groups = micro_batches([trajs[i] for i in mine], s.micro_batch_tokens) if mine else []
        for _ in range(self._passes(len(groups)) - len(groups)):
            # a sharded model's forward and backward are collectives: run as many as the busiest
            # rank, with zero weight
            logp, _ = token_logprobs(self.model, pack([trajs[chunk[0]]], self.pad_id, self.device), s.temperature)
            (logp.sum() * 0.0).backward()
        for group in groups:
            idx = [mine[g] for g in group]
            sub = [trajs[i] for i in idx]
            b = pack(sub, self.pad_id, self.device)
            logp, ent = token_logprobs(self.model, b, s.temperature, with_entropy=s.entropy_coef > 0)
            loss, lstats = self._loss(b, sub, idx, logp, ent, adv, normalizer, learner_old)
            loss.backward()
            acc.add(lstats, b.mask.sum())
            if before_free is not None:
                rows = response_rows(logp, None, [len(t.token_ids) for t in sub])
                for i, row in zip(idx, rows):
                    before_free[i] = row
        return self.optim.step()

    def _loss(
        self,
        b: PackedBatch,
        sub: list[Trajectory],
        idx: list[int],
        logp: torch.Tensor,
        ent: torch.Tensor | None,
        adv: torch.Tensor,
        normalizer: float,
        learner_old: list[list[float]] | None,
    ) -> tuple[torch.Tensor, Any]:
        """The PPO-clip loss of one micro-batch (`spo_agents.algorithm.loss`). pi_old is the
        rollout's log-probs, or the learner's re-score (`learner_old`) under
        `behaviour_logprobs: recompute` or `tis_cap`; `tis_cap` also weights each token's
        policy-gradient term by min(exp(learner_old - behaviour), cap)."""
        from spo_agents.algorithm.loss import policy_loss

        s = self.settings
        ref = None
        if self.ref_model is not None:
            with torch.no_grad():
                ref, _ = token_logprobs(self.ref_model, b, s.temperature)
        old = b.old_logprobs  # [B, T] the rollout's
        weights = None
        if learner_old is not None:
            mine = response_tensor(sub, [learner_old[i] for i in idx], b.mask)  # [B, T]
            if s.tis_cap is not None:
                weights = torch.exp(mine - b.old_logprobs).clamp(max=s.tis_cap) * b.mask  # [B, T]
            old = mine
        return policy_loss(
            logp,
            old,
            adv[idx].to(self.device),
            b.mask,
            eps_low=s.eps_low,
            eps_high=s.eps_high,
            dual_clip=s.dual_clip,
            aggregation=s.aggregation,
            ref_logprobs=ref,
            kl_coef=s.kl_coef,
            entropy=ent,
            entropy_coef=s.entropy_coef,
            normalizer=normalizer,
            token_weights=weights,
        )

    def _reduce_stats(self, stats: LearnerStats, acc: _Accumulator, phases: int) -> None:
        """Token-weighted means of the loss diagnostics over the whole batch (all ranks), the
        mean loss per optimiser step and the mean gradient norm: one device sync per update."""
        _, size = world()
        total = acc.total()  # float64 [loss, *_STAT_KEYS, weight]
        if size > 1:
            torch.distributed.all_reduce(total)
        values = total.tolist()
        stats.loss = values[0] / phases
        weight = values[-1]
        if weight > 0:
            for k, v in zip(_STAT_KEYS, values[1:-1]):
                setattr(stats, k, v / weight)
        norms = [sharding.grad_norm_value(n) for n in acc.grad_norms]
        stats.grad_norm = sum(norms) / max(1, len(norms))

    # -- state -------------------------------------------------------------------------------
    @property
    def _optimizer_format(self) -> str:
        return "fsdp-full" if self.sharded else "torch"

    def state_dict(self) -> dict[str, Any]:
        """Optimiser, scheduler and drift store. Sharded, the optimiser state is gathered on
        rank 0 keyed by parameter name (a collective; other ranks get an empty one)."""
        return {
            "optimizer": sharding.full_optimizer_state(self.model, self.optimizer)
            if self.sharded
            else self.optimizer.state_dict(),
            "optimizer_format": self._optimizer_format,
            "scheduler": self.scheduler.state_dict(),
            "prompt_store": self.prompt_store.state_dict() if self.prompt_store is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        fmt = state.get("optimizer_format", "torch")
        if fmt != self._optimizer_format:
            setting = {"torch": "none", "fsdp-full": "fsdp"}
            raise CheckpointError(
                f"the checkpoint's optimiser state was written with `train.sharding: {setting.get(fmt, fmt)}` "
                f"and this run uses `train.sharding: {setting[self._optimizer_format]}`; "
                f"resume with `train.sharding={setting.get(fmt, fmt)}`"
            )
        if self.sharded:
            sharding.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.prompt_store is not None and state.get("prompt_store"):
            self.prompt_store.load_state_dict(state["prompt_store"])


_STAT_KEYS = ("clip_frac", "approx_kl", "entropy", "ratio_mean")


class _Accumulator:
    """Sums of the micro-batches' loss and token-weighted diagnostics, kept as float64 device
    tensors until `_reduce_stats` reads them once."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None  # [loss, *_STAT_KEYS, weight]
        self.grad_norms: list[torch.Tensor] = []

    def add(self, lstats: Any, weight: torch.Tensor) -> None:
        w = weight.detach().double()
        row = torch.stack([lstats.loss.double()] + [getattr(lstats, k).detach().double() * w for k in _STAT_KEYS] + [w])
        self.sums = row if self.sums is None else self.sums + row

    def total(self) -> torch.Tensor:
        return self.sums.cpu() if self.sums is not None else torch.zeros(len(_STAT_KEYS) + 2, dtype=torch.float64)


def _check_settings(s: LearnerSettings) -> None:
    """The config's own rules, named by the setting each field comes from (one message per rule)."""
    check("rollout.temperature", s.temperature, POSITIVE)
    check("train.mini_batches", s.mini_batches, AT_LEAST_1)
    check("train.epochs", s.epochs, AT_LEAST_1)
    check("loss.behaviour_logprobs", s.behaviour_logprobs, BEHAVIOUR_LOGPROBS)
    check("loss.tis_cap", s.tis_cap, TIS_CAP)
