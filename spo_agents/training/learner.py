"""The learner: one PPO-clip update of the policy on a batch of finished trajectories.

What one `Learner.update(trajectories, advantages)` does (docs/algorithm.md sections 2-3, paper Sec. 4.2):

1. Pack each trajectory as `prompt_ids + token_ids`, left-padded into `[B, L]` tensors. The
   tokens trained on are exactly the ones the policy produced (`loss_mask == 1`); tokens the
   environment inserted are context only (token-in, token-out).
2. Split the batch into `mini_batches` equal parts (one optimiser step each, one epoch), after a
   shuffle (`mini_batch_order`): trajectories arrive in the order they finished, shortest first,
   and unshuffled chunks would give the first optimiser step only the short responses. Each
   mini-batch is split into micro-batches whose padded size stays under `micro_batch_tokens`, so memory is
   bounded by the token budget and not by the batch size.
3. Score every micro-batch with the current model: fp32 `log_softmax(logits / temperature)` at
   the positions that predict generated tokens. Dividing by the *sampling* temperature makes the
   new log-probs comparable with the behaviour log-probs, which backends report for the
   temperature-scaled distribution they sampled from. Top-p / top-k truncation is not
   reproduced: train with them off (the default and the paper's setting, docs/algorithm.md section 3).
4. PPO-clip token loss against the behaviour log-probs (`pi_old`), via `spo_agents.algorithm.loss`. The
   normaliser is the whole mini-batch's token count (or sequence count for
   `seq-mean-token-mean`), so the sum of micro-batch losses equals the full mini-batch loss.
5. AdamW step with gradient clipping. Under `torch.distributed` every rank sees the whole batch,
   trains on its share of each mini-batch (`indices[rank::world_size]`) with the *global*
   normaliser, and gradients are summed across ranks before clipping: the update equals the
   single-process one (tests/test_distributed.py). Two ways to hold the model:
   - data-parallel (`train.sharding: none`): every rank holds the whole model and optimiser,
     and the learner all-reduces the gradients;
   - sharded (`train.sharding: fsdp`, `spo_agents.sharding`): FSDP2 holds `1 / world_size` of
     the fp32 weights, gradients and optimiser state per rank and sums the gradients itself.
     Every forward is then a collective, so ranks with fewer micro-batches run zero-weighted
     ones until all have run as many (`_passes`).
   Scoring (`score`) is split the same way: each rank scores its share of the trajectories
   and the results are gathered.

Policy drift for the value tracker (docs/algorithm.md section 1):
- `cumulative` mode: `drift = token-mean |log pi_after - log pi_before|` over the step's own
  batch, where `pi_before` is the model before this step's update and `pi_after` after it. With
  one mini-batch `pi_before` comes free from the loss forward; with several it costs one extra
  no-grad forward before the update. The re-score after the update is one more no-grad forward.
- `per-prompt` mode (the authors' estimate): `PromptDriftStore` keeps each problem's last
  response with the log-probs of the policy that acted on it (`pi_then`, scored before that
  step's update); before an update the responses of the batch's problems are re-scored and
  `D(x) = token-mean |log pi_now - log pi_then|`. Departure: the authors store the log-probs of
  the policy after the update that followed the visit and re-score after each later update, so
  their D(x) at a visit spans the updates from the one after the previous visit up to the last
  one, one update later than ours at both ends (a one-update shift; consecutive visits get a
  non-zero D in both). Storing the behaviour policy's log-probs makes D(x) span the same updates
  as the cumulative estimate. It costs one stored response per problem (memory grows with the
  number of distinct problems seen) and one extra forward over the stored responses each step.
- `tracker.compare_drift` keeps the store in cumulative mode too and logs both estimates on the
  batch's revisited problems, so their ratio can be measured on a real run.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from spo_agents import sharding
from spo_agents.errors import CheckpointError, ConfigError, PolicyError
from spo_agents.types import Trajectory


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------
@dataclass
class PackedBatch:
    """Left-padded tensors of `prompt + response`; `T = L - 1` target positions.

    input_ids       [B, L]  token ids (pad where attention_mask is 0)
    attention_mask  [B, L]
    position_ids    [B, L]  0.. over real tokens (left padding does not shift positions)
    mask            [B, T]  1 where the target token was sampled by the policy
    old_logprobs    [B, T]  behaviour log-probs of the targets (0 elsewhere)
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    mask: torch.Tensor
    old_logprobs: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum().item())


def mini_batch_order(trajectories: Sequence[Trajectory]) -> list[int]:
    """A permutation of the batch for splitting it into mini-batches. Seeded by the batch's own
    content (problem ids, sample indices, lengths), so it needs no saved state, is the same on
    every rank and after a resume, and differs from batch to batch."""
    key = "\n".join(f"{t.problem_id}:{t.sample_index}:{len(t.token_ids)}" for t in trajectories)
    order = list(range(len(trajectories)))
    random.Random(zlib.crc32(key.encode("utf-8"))).shuffle(order)
    return order


def _has_dropout(model: torch.nn.Module) -> bool:
    """Whether dropout would be active in train mode: a dropout layer with p > 0 (LoRA's), or a
    transformers config with a dropout probability > 0 (applied functionally in attention)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p > 0:
            return True
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            if any("dropout" in k and isinstance(v, (int, float)) and v > 0 for k, v in cfg.to_dict().items()):
                return True
    return False


def pack(trajectories: Sequence[Trajectory], pad_id: int, device: torch.device | str = "cpu") -> PackedBatch:
    """Pack trajectories into left-padded tensors (see `PackedBatch`)."""
    if not trajectories:
        raise ValueError("cannot pack an empty list of trajectories")
    seqs = [list(t.prompt_ids) + list(t.token_ids) for t in trajectories]
    L = max(len(s) for s in seqs)
    B = len(seqs)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.float32)  # aligned with input positions first
    old = torch.zeros((B, L), dtype=torch.float32)
    for i, (t, s) in enumerate(zip(trajectories, seqs)):
        bad = [j for j, (m, lp) in enumerate(zip(t.loss_mask, t.logprobs)) if m and not math.isfinite(lp)]
        if bad:
            raise PolicyError(
                f"trajectory of `{t.problem_id}` has non-finite behaviour log-probs at {len(bad)} sampled tokens "
                f"(first at token {bad[0]}: {t.logprobs[bad[0]]}); the policy backend must report a finite "
                "log-prob for every token it samples"
            )
        off = L - len(s)
        input_ids[i, off:] = torch.tensor(s, dtype=torch.long)
        attn[i, off:] = 1
        r0 = off + len(t.prompt_ids)
        if t.token_ids:
            mask[i, r0:] = torch.tensor(t.loss_mask, dtype=torch.float32)
            old[i, r0:] = torch.tensor(
                [lp if m else 0.0 for m, lp in zip(t.loss_mask, t.logprobs)], dtype=torch.float32
            )
    position_ids = (attn.cumsum(dim=1) - 1).clamp(min=0)
    # Target j of the shifted view is token j + 1, predicted from position j.
    return PackedBatch(
        input_ids=input_ids.to(device),
        attention_mask=attn.to(device),
        position_ids=position_ids.to(device),
        mask=mask[:, 1:].to(device),
        old_logprobs=old[:, 1:].to(device),
    )


def micro_batches(trajectories: Sequence[Trajectory], token_budget: int) -> list[list[int]]:
    """Group indices (in order) so each group's padded size `n * max_len` stays within the
    budget; a single sequence longer than the budget forms a group of its own."""
    groups: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i, t in enumerate(trajectories):
        n = len(t.prompt_ids) + len(t.token_ids)
        new_max = max(cur_max, n)
        if cur and new_max * (len(cur) + 1) > token_budget:
            groups.append(cur)
            cur, new_max = [], n
        cur.append(i)
        cur_max = new_max
    if cur:
        groups.append(cur)
    return groups


def token_logprobs(
    model: torch.nn.Module, batch: PackedBatch, temperature: float, *, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs `[B, T]` of each target token under `model` (fp32, logits / temperature);
    with `with_entropy`, also the per-position entropy `[B, T]` of that distribution.

    Only the trailing positions that hold trained tokens get logits (`logits_to_keep`): with
    left padding every response ends at the last column, so the prompt's positions, often most
    of the sequence, never pay for the `[*, V]` output layer and log-softmax. Entries left of
    them are 0 (their mask is 0)."""
    B, T = batch.mask.shape
    cols = torch.nonzero(batch.mask.any(dim=0)).flatten()
    keep = T - int(cols[0]) if cols.numel() else 1  # trailing target positions that matter
    kwargs = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "position_ids": batch.position_ids,
        "use_cache": False,
    }
    try:
        out = model(**kwargs, logits_to_keep=keep + 1)
    except TypeError:  # a model without `logits_to_keep`: compute every position
        out = model(**kwargs)
    logits = out.logits[:, -(keep + 1) : -1, :].float()  # [B, keep, V]
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)  # [B, keep, V]
    targets = batch.input_ids[:, T + 1 - keep :].unsqueeze(-1)  # [B, keep, 1]
    logp = torch.zeros((B, T), dtype=logits.dtype, device=logits.device)
    logp[:, T - keep :] = logp_all.gather(-1, targets).squeeze(-1)  # [B, T]
    ent = None
    if with_entropy:
        ent = torch.zeros_like(logp)
        ent[:, T - keep :] = -(logp_all.exp() * logp_all).sum(-1)  # [B, T]
    return logp, ent


# --------------------------------------------------------------------------------------------
# Per-prompt drift (the authors' estimate)
# --------------------------------------------------------------------------------------------
@dataclass
class _Stored:
    prompt_ids: list[int]
    token_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]  # log-probs of the policy that acted at the last visit (before its update)


class PromptDriftStore:
    """Each problem's last response with the log-probs of the policy that acted on it (scored
    before the update that followed); `drift(...)` re-scores them with the current policy
    (docs/algorithm.md section 1)."""

    def __init__(self) -> None:
        self.items: dict[str, _Stored] = {}

    def put(self, traj: Trajectory, logprobs: list[float]) -> None:
        self.items[traj.problem_id] = _Stored(
            list(traj.prompt_ids), list(traj.token_ids), list(traj.loss_mask), list(logprobs)
        )

    def as_trajectories(self, problem_ids: Sequence[str]) -> list[Trajectory | None]:
        out: list[Trajectory | None] = []
        for pid in problem_ids:
            s = self.items.get(pid)
            out.append(
                None
                if s is None
                else Trajectory(
                    problem_id=pid,
                    env_id="",
                    prompt_ids=s.prompt_ids,
                    token_ids=s.token_ids,
                    loss_mask=s.loss_mask,
                    logprobs=s.logprobs,
                    reward=0.0,
                )
            )
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"items": {k: dataclasses.asdict(v) for k, v in self.items.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.items = {k: _Stored(**v) for k, v in state.get("items", {}).items()}


# --------------------------------------------------------------------------------------------
# Learner
# --------------------------------------------------------------------------------------------
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
    tokens: int = 0  # generated tokens trained on (all ranks)
    sequences: int = 0
    optimizer_steps: int = 0
    seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


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
        if settings.temperature <= 0:
            raise ConfigError(
                "`rollout.temperature` must be > 0 for training (log-probs are scored at it), "
                f"got {settings.temperature}"
            )
        if settings.mini_batches < 1 or settings.epochs < 1:
            raise ConfigError(
                "`train.mini_batches` and `train.epochs` must be >= 1, "
                f"got {settings.mini_batches} and {settings.epochs}"
            )
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
        params = [p for p in model.parameters() if p.requires_grad]
        low = [p for p in params if p.dtype in (torch.bfloat16, torch.float16)]
        if low:
            # No fp32 master copy: AdamW writes straight into these weights, and a step of lr ~1e-6
            # on a bf16 weight of ~1e-2 (8 bits of mantissa) mostly rounds back to the old value.
            warnings.warn(
                f"{sum(p.numel() for p in low):,} trainable weights are in {low[0].dtype} "
                f"and are updated without an fp32 master copy: at lr {settings.lr:g} most updates round away. "
                "Train with `model.dtype: float32`, or with LoRA (`model.lora.enabled: true`, adapters in fp32)",
                stacklevel=2,
            )
        self.optimizer = torch.optim.AdamW(
            params, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay
        )
        warm = max(0, settings.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0
        )
        self.ref_model = None
        if settings.kl_coef > 0:
            self.ref_model = copy.deepcopy(model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        self.prompt_store = PromptDriftStore() if settings.drift == "per-prompt" else None

    # -- distributed -------------------------------------------------------------------------
    @staticmethod
    def _world() -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _all_reduce_grads(self, world: int) -> None:
        if world == 1 or self.sharded:  # FSDP reduce-scatters (sums) the gradients itself
            return
        for p in self.model.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)

    def _passes(self, n: int) -> int:
        """How many forwards this rank must run when it has `n` of its own: the most any rank
        has under sharding (every forward is a collective there), else `n`."""
        _, world = self._world()
        if not self.sharded or world == 1:
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
        rank, world = self._world()
        mine = list(range(rank, len(trajectories), world))
        scores: dict[int, list[float]] = {}
        groups = micro_batches([trajectories[i] for i in mine], self.settings.micro_batch_tokens)
        for j in range(self._passes(len(groups))):
            if j >= len(groups):  # only keeps the collectives of a sharded model in step
                token_logprobs(self.model, pack(trajectories[:1], self.pad_id, self.device), self.settings.temperature)
                continue
            idx = [mine[g] for g in groups[j]]
            b = pack([trajectories[i] for i in idx], self.pad_id, self.device)
            logp, _ = token_logprobs(self.model, b, self.settings.temperature)
            for row, i in enumerate(idx):
                n = len(trajectories[i].token_ids)
                scores[i] = (logp[row, logp.shape[1] - n :] * b.mask[row, b.mask.shape[1] - n :]).tolist() if n else []
        if world > 1:
            parts: list[Any] = [None] * world
            torch.distributed.all_gather_object(parts, scores)
            scores = {i: v for part in parts for i, v in part.items()}
        return [scores.get(i, []) for i in range(len(trajectories))]

    @staticmethod
    def mean_abs_diff(
        trajectories: Sequence[Trajectory], a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]
    ) -> float:
        """Token-mean of |a - b| over generated tokens of all trajectories."""
        num, den = 0.0, 0
        for t, xa, xb in zip(trajectories, a, b):
            for m, u, v in zip(t.loss_mask, xa, xb):
                if m and math.isfinite(u) and math.isfinite(v):
                    num += abs(u - v)
                    den += 1
        return num / den if den else 0.0

    def prompt_drift(self, problem_ids: Sequence[str]) -> list[float]:
        """Per-prompt D(x) for `problem_ids` (0 for problems without a stored response)."""
        if self.prompt_store is None:
            raise ConfigError("per-prompt drift needs `tracker.drift: per-prompt`")
        stored = self.prompt_store.as_trajectories(problem_ids)
        present = [s for s in stored if s is not None]
        if not present:
            return [0.0] * len(problem_ids)
        now = self.score(present)
        it = iter(now)
        out = []
        for s in stored:
            out.append(0.0 if s is None else self.mean_abs_diff([s], [next(it)], [s.logprobs]))
        return out

    # -- the update --------------------------------------------------------------------------
    def _normalizer(self, trajs: Sequence[Trajectory]) -> float:
        if self.settings.aggregation == "seq-mean-token-mean":  # sequences with a trained token
            return float(max(1, sum(1 for t in trajs if t.num_generated > 0)))
        return float(max(1, sum(t.num_generated for t in trajs)))

    def update(self, trajectories: Sequence[Trajectory], advantages: Sequence[float] | torch.Tensor) -> LearnerStats:
        """One PPO-clip phase on the batch (module docstring). Every rank must call it with the
        same `trajectories` and `advantages`. The loss forwards run in train mode; the model is
        left in eval mode, so rollouts, evaluation and scoring never see dropout."""
        try:
            return self._update(trajectories, advantages)
        finally:
            self.model.eval()

    def _update(self, trajectories: Sequence[Trajectory], advantages: Sequence[float] | torch.Tensor) -> LearnerStats:
        from spo_agents.algorithm.loss import policy_loss

        s = self.settings
        t0 = time.perf_counter()
        trajs = list(trajectories)
        adv = torch.as_tensor(advantages, dtype=torch.float32).reshape(-1)
        if adv.numel() != len(trajs):
            raise ValueError(
                f"got {len(trajs)} trajectories but {adv.numel()} advantages; pass one advantage per trajectory"
            )
        rank, world = self._world()
        stats = LearnerStats(sequences=len(trajs), tokens=sum(t.num_generated for t in trajs))
        if not trajs:
            return stats

        n_mb = min(s.mini_batches, len(trajs))
        # pi_before on the whole batch: free from the loss forward with one mini-batch, one epoch
        # and one process; otherwise one extra no-grad forward before the update
        # (and with dropout on, since the loss forward runs in train mode)
        need_before = n_mb > 1 or s.epochs > 1 or world > 1 or _has_dropout(self.model)
        before = self.score(trajs) if need_before else None
        before_free: list[list[float] | None] = [None] * len(trajs)

        self.model.train()
        acc: dict[str, float] = {}
        acc_w = 0.0
        bounds = [round(k * len(trajs) / n_mb) for k in range(n_mb + 1)]
        order = mini_batch_order(trajs) if n_mb > 1 else list(range(len(trajs)))
        chunks = [order[bounds[k] : bounds[k + 1]] for k in range(n_mb)]
        grad_norms = []
        for epoch in range(s.epochs):
            for chunk in chunks:
                mb = [trajs[i] for i in chunk]
                normalizer = self._normalizer(mb)
                mine = chunk[rank::world]
                self.optimizer.zero_grad(set_to_none=True)
                groups = micro_batches([trajs[i] for i in mine], s.micro_batch_tokens) if mine else []
                for _ in range(self._passes(len(groups)) - len(groups)):
                    # a sharded model's forward and backward are collectives: run as many as the
                    # busiest rank, with zero weight
                    logp, _ = token_logprobs(
                        self.model, pack([trajs[chunk[0]]], self.pad_id, self.device), s.temperature
                    )
                    (logp.sum() * 0.0).backward()
                for group in groups:
                    idx = [mine[g] for g in group]
                    sub = [trajs[i] for i in idx]
                    b = pack(sub, self.pad_id, self.device)
                    logp, ent = token_logprobs(self.model, b, s.temperature, with_entropy=s.entropy_coef > 0)
                    ref = None
                    if self.ref_model is not None:
                        with torch.no_grad():
                            ref, _ = token_logprobs(self.ref_model, b, s.temperature)
                    loss, lstats = policy_loss(
                        logp,
                        b.old_logprobs,
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
                    )
                    loss.backward()
                    w = float(b.mask.sum().item())
                    acc["loss"] = acc.get("loss", 0.0) + float(loss.detach().item())
                    for k, v in _stat_items(lstats):
                        acc[k] = acc.get(k, 0.0) + v * w
                    acc_w += w
                    if epoch == 0 and len(chunks) == 1 and world == 1:
                        lp = logp.detach()
                        for row, i in enumerate(idx):
                            n = len(trajs[i].token_ids)
                            before_free[i] = lp[row, lp.shape[1] - n :].tolist() if n else []
                self._all_reduce_grads(world)
                norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in self.model.parameters() if p.requires_grad],
                    s.grad_clip if s.grad_clip > 0 else float("inf"),
                )
                grad_norms.append(sharding.grad_norm_value(norm))
                self.optimizer.step()
                stats.optimizer_steps += 1
            stats.lr = float(self.scheduler.get_last_lr()[0])
        self.scheduler.step()

        if world > 1:
            t = torch.tensor(
                [acc.get("loss", 0.0)] + [acc.get(k, 0.0) for k in _STAT_KEYS] + [acc_w], dtype=torch.float64
            )
            torch.distributed.all_reduce(t)
            acc["loss"] = float(t[0])
            for j, k in enumerate(_STAT_KEYS):
                acc[k] = float(t[1 + j])
            acc_w = float(t[-1])
        stats.loss = acc.get("loss", 0.0) / (n_mb * s.epochs)
        for k in _STAT_KEYS:
            if k in acc and acc_w > 0:
                setattr(stats, k, acc[k] / acc_w)
        stats.grad_norm = sum(grad_norms) / max(1, len(grad_norms))

        self.model.eval()
        # Drift of this step. Per-prompt mode stores each response with the log-probs of the
        # policy that acted on it (before this update), so D(x) at the next visit counts this
        # update too, as cumulative mode does (C at the visit is taken before `add_drift`).
        after = self.score(trajs)
        if before is None:
            before = [b if b is not None else [] for b in before_free]
        stats.drift = self.mean_abs_diff(trajs, after, before)
        if self.prompt_store is not None:
            for t, lp in zip(trajs, before):
                self.prompt_store.put(t, lp)
        stats.seconds = time.perf_counter() - t0
        return stats

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


def _stat_items(lstats: Any) -> list[tuple[str, float]]:
    """(name, value) of the loss stats this learner aggregates, whatever their container."""
    if dataclasses.is_dataclass(lstats):
        d = dataclasses.asdict(lstats)
    elif isinstance(lstats, dict):
        d = lstats
    else:
        d = {k: getattr(lstats, k) for k in _STAT_KEYS if hasattr(lstats, k)}
    if "clip_frac" not in d and "clip_frac_low" in d:
        d = {**d, "clip_frac": sum(float(d.get(k, 0.0)) for k in ("clip_frac_low", "clip_frac_high", "clip_frac_dual"))}
    out = []
    for k in _STAT_KEYS:
        v = d.get(k)
        if v is None:
            continue
        if isinstance(v, torch.Tensor):
            v = v.item()
        out.append((k, float(v)))
    return out
