"""Packing trajectories into tensors and scoring their tokens: pure tensor functions.

`pack` left-pads `prompt_ids + token_ids` into `[B, L]` tensors whose targets are the `T = L - 1`
next tokens; the tokens trained on are exactly the ones the policy produced (`loss_mask == 1`),
tokens the environment inserted are context only. `token_logprobs` scores the targets with a
model at the sampling temperature (docs/algorithm.md section 3).
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from spo_agents.errors import PolicyError
from spo_agents.models import takes_logits_to_keep
from spo_agents.types import Trajectory


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


def mini_batch_chunks(trajectories: Sequence[Trajectory], n: int) -> list[list[int]]:
    """`n` near-equal chunks of batch indices, shuffled first (`mini_batch_order`) when `n > 1`:
    trajectories arrive shortest first, and unshuffled chunks would give the first optimiser
    step only the short responses."""
    bounds = [round(k * len(trajectories) / n) for k in range(n + 1)]
    order = mini_batch_order(trajectories) if n > 1 else list(range(len(trajectories)))
    return [order[bounds[k] : bounds[k + 1]] for k in range(n)]


def has_dropout(model: torch.nn.Module) -> bool:
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
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)  # [B, L]
    attn = torch.zeros((B, L), dtype=torch.long)  # [B, L]
    mask = torch.zeros((B, L), dtype=torch.float32)  # [B, L], aligned with input positions first
    old = torch.zeros((B, L), dtype=torch.float32)  # [B, L]
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
    position_ids = (attn.cumsum(dim=1) - 1).clamp(min=0)  # [B, L]
    # Target j of the shifted view is token j + 1, predicted from position j.
    return PackedBatch(
        input_ids=input_ids.to(device),
        attention_mask=attn.to(device),
        position_ids=position_ids.to(device),
        mask=mask[:, 1:].to(device),  # [B, T]
        old_logprobs=old[:, 1:].to(device),  # [B, T]
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
    if takes_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep + 1
    out = model(**kwargs)  # without `logits_to_keep`: every position, sliced below
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


def response_rows(logp: torch.Tensor, mask: torch.Tensor | None, lengths: Sequence[int]) -> list[list[float]]:
    """Per row, the last `lengths[row]` entries of `logp` `[B, T]` (the response tokens), times
    `mask` when given, as Python lists (one device sync for the whole micro-batch)."""
    vals = (logp * mask if mask is not None else logp).detach().cpu().tolist()
    return [row[len(row) - n :] if n else [] for row, n in zip(vals, lengths)]


def response_tensor(
    trajectories: Sequence[Trajectory], values: Sequence[Sequence[float]], like: torch.Tensor
) -> torch.Tensor:
    """Per-token `values` of each trajectory's response, aligned as `pack` aligns its targets:
    `[B, T]` shaped like `like`, right-aligned, 0 where the loss mask is 0."""
    out = torch.zeros(like.shape, dtype=torch.float32)  # [B, T]
    for i, (t, v) in enumerate(zip(trajectories, values)):
        n = len(t.token_ids)
        if n:
            out[i, out.shape[1] - n :] = torch.tensor(
                [x if m else 0.0 for m, x in zip(t.loss_mask, v)], dtype=torch.float32
            )
    return out.to(like.device)
