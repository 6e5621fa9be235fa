"""The optimiser step: AdamW with linear warm-up, gradient summing across ranks, clipping.

Under `torch.distributed` with `train.sharding: none` every rank holds the whole model and the
gradients are all-reduced (summed) here; FSDP (`train.sharding: fsdp`) reduce-scatters them
itself. The loss is already divided by the whole mini-batch's normaliser on every rank, so the
sum equals the single-process gradient.
"""

from __future__ import annotations

import warnings

import torch

from spo_agents import sharding


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class Optimiser:
    """AdamW over the model's trainable parameters, its warm-up schedule, and one clipped step."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        lr: float,
        betas: tuple[float, float],
        weight_decay: float,
        warmup_steps: int,
        grad_clip: float,
        sharded: bool,
    ) -> None:
        self.model = model
        self.grad_clip = grad_clip
        self.sharded = sharded
        self.params = [p for p in model.parameters() if p.requires_grad]
        low = [p for p in self.params if p.dtype in (torch.bfloat16, torch.float16)]
        if low:
            # No fp32 master copy: AdamW writes straight into these weights, and a step of lr ~1e-6
            # on a bf16 weight of ~1e-2 (8 bits of mantissa) mostly rounds back to the old value.
            warnings.warn(
                f"{sum(p.numel() for p in low):,} trainable weights are in {low[0].dtype} "
                f"and are updated without an fp32 master copy: at lr {lr:g} most updates round away. "
                "Train with `model.dtype: float32`, or with LoRA (`model.lora.enabled: true`, adapters in fp32)",
                stacklevel=3,
            )
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=betas, weight_decay=weight_decay)
        warm = max(0, warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0
        )

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> torch.Tensor:
        """Sum gradients across ranks, clip, step; returns the pre-clip gradient norm (a tensor)."""
        _, n = world()
        if n > 1 and not self.sharded:  # FSDP reduce-scatters (sums) the gradients itself
            for p in self.model.parameters():
                if p.requires_grad:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
        norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad],
            self.grad_clip if self.grad_clip > 0 else float("inf"),
        )
        self.optimizer.step()
        return norm

    @staticmethod
    def norm_value(norm: torch.Tensor) -> float:
        return sharding.grad_norm_value(norm)

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])
