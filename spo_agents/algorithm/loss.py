"""Token-level PPO-clip policy loss with clip-higher and dual clip (docs/algorithm.md section 3).

`policy_loss` takes per-token log-probs of the current policy and of the behaviour policy that
sampled each token (pi_old), the samples' advantages (broadcast to their tokens) and the loss
mask, and returns the clipped loss aggregated over the tokens with mask 1 (`token-mean` or
`seq-mean-token-mean`; `normalizer` sets the denominator, so micro-batch losses add up to the
whole batch's) with its diagnostics (`LossStats`, detached, read once per update). Optional KL
(k3) and entropy terms, off by default as in the paper. The formula, the aggregation and the
numeric guards: docs/algorithm.md, section 3.

Beyond the paper:
1. Optional `token_weights` multiply each token's loss before aggregation (truncated importance
   sampling, `loss.tis_cap`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch

from spo_agents.errors import ConfigError

Aggregation = Literal["token-mean", "seq-mean-token-mean"]
_LOG_RATIO_CLAMP = 20.0


@dataclass(frozen=True)
class LossStats:
    """Detached diagnostics of one `policy_loss` call (averages over masked tokens), each a 0-d
    tensor on the loss's device."""

    loss: torch.Tensor
    pg_loss: torch.Tensor  # the clipped policy-gradient part, same aggregation
    kl_loss: torch.Tensor  # k3 vs the reference policy (0 when no reference is given)
    entropy: torch.Tensor  # mean entropy of masked tokens (0 when not given)
    clip_frac_low: torch.Tensor  # A < 0 and ratio < 1 - eps_low (gradient cut by the lower clip)
    clip_frac_high: torch.Tensor  # A > 0 and ratio > 1 + eps_high (gradient cut by the upper clip)
    clip_frac_dual: torch.Tensor  # A < 0 and ratio > c (dual clip active)
    approx_kl: torch.Tensor  # k3 estimate of KL(pi_old || pi) from the sampled tokens
    abs_logp_diff: torch.Tensor  # mean |log pi - log pi_old|: the drift SPO's rho uses (section 1)
    ratio_mean: torch.Tensor
    ratio_max: torch.Tensor
    num_tokens: torch.Tensor
    num_sequences: torch.Tensor  # samples with at least one masked token

    @property
    def clip_frac(self) -> torch.Tensor:
        """Share of tokens whose gradient a clip cut (low, high or dual)."""
        return self.clip_frac_low + self.clip_frac_high + self.clip_frac_dual

    def floats(self) -> dict[str, float]:
        """Every field as a Python float (one device sync)."""
        names = [f.name for f in fields(self)]
        values = torch.stack([getattr(self, n).detach().double().cpu() for n in names]).tolist()
        return dict(zip(names, values))

    def as_dict(self, prefix: str = "loss/") -> dict[str, float]:
        return {prefix + k: v for k, v in self.floats().items()}


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float = 10.0,
    aggregation: Aggregation = "token-mean",
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    normalizer: float | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """PPO-clip loss of a batch. # logprobs, old_logprobs, mask, token_weights [B, T]; advantages [B] -> scalar

    `token_weights` (no gradient) multiply each token's policy-gradient term: the truncated
    importance-sampling weights min(pi_old / pi_behaviour, cap) of `loss.tis_cap`."""
    _check(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, eps_low, eps_high, aggregation, normalizer)
    if token_weights is not None and token_weights.shape != logprobs.shape:
        raise ConfigError(
            f"`token_weights` must have the shape of `logprobs` {tuple(logprobs.shape)}, "
            f"got {tuple(token_weights.shape)}"
        )
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    logp = logprobs.to(dtype)  # [B, T]
    m = mask.to(dtype)  # [B, T]
    adv = advantages.to(dtype=dtype, device=logp.device).unsqueeze(-1)  # [B, 1]
    log_ratio = (logp - old_logprobs.to(dtype)).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]

    l1 = -adv * ratio
    l2 = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = torch.maximum(l1, l2)  # [B, T]
    dual_on = dual_clip > 1.0
    if dual_on:
        per_token = torch.where(adv < 0, torch.minimum(per_token, -adv * dual_clip), per_token)
    pg_token = per_token if token_weights is None else per_token * token_weights.detach().to(dtype)
    kl_token = torch.zeros_like(logp)
    if ref_logprobs is not None:
        d = ref_logprobs.to(dtype) - logp
        kl_token = torch.exp(d) - d - 1.0  # [B, T], k3 >= 0
    total_token = pg_token + kl_coef * kl_token
    if entropy is not None and entropy_coef != 0.0:
        total_token = total_token - entropy_coef * entropy.to(dtype)

    def aggregate(x: torch.Tensor) -> torch.Tensor:
        return _aggregate(x, m, aggregation, normalizer)

    loss = aggregate(total_token)
    with torch.no_grad():
        n_tok = m.sum()
        denom = n_tok.clamp(min=1.0)
        zero = n_tok.new_zeros(())

        def tmean(x: torch.Tensor) -> torch.Tensor:
            return (x * m).sum() / denom

        neg, pos = (adv < 0).to(dtype), (adv > 0).to(dtype)
        stats = LossStats(
            loss=loss.detach(),
            pg_loss=aggregate(pg_token),
            kl_loss=aggregate(kl_token) if ref_logprobs is not None else zero,
            entropy=tmean(entropy.to(dtype)) if entropy is not None else zero,
            clip_frac_low=tmean(neg * (ratio < 1.0 - eps_low).to(dtype)),
            clip_frac_high=tmean(pos * (ratio > 1.0 + eps_high).to(dtype)),
            clip_frac_dual=tmean(neg * (ratio > dual_clip).to(dtype)) if dual_on else zero,
            approx_kl=tmean(torch.exp(log_ratio) - 1.0 - log_ratio),  # (r - 1) - log r, r = pi / pi_old, x ~ pi_old
            abs_logp_diff=tmean(log_ratio.abs()),
            ratio_mean=tmean(ratio),
            ratio_max=torch.where(m > 0, ratio, zero).max() if m.numel() else zero,  # ratios are > 0
            num_tokens=n_tok,
            num_sequences=(m.sum(-1) > 0).sum().to(dtype),
        )
    return loss, stats


def _aggregate(x: torch.Tensor, m: torch.Tensor, aggregation: str, normalizer: float | None) -> torch.Tensor:
    """Masked reduction of per-token values to a scalar (docs/algorithm.md section 3). # [B, T] -> []"""
    if aggregation == "token-mean":
        total = (x * m).sum()
        count = m.sum()  # tokens
    else:
        per_seq_tokens = m.sum(-1)  # [B]
        total = ((x * m).sum(-1) / per_seq_tokens.clamp(min=1.0)).sum()  # sum of per-sample means
        count = (per_seq_tokens > 0).sum().to(x.dtype)  # samples with at least one token
    if normalizer is not None:
        return total / torch.as_tensor(float(normalizer), dtype=x.dtype, device=x.device)
    return total / count.clamp(min=1.0)


def _check(
    logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, eps_low, eps_high, aggregation, normalizer
) -> None:
    if logprobs.dim() != 2:
        raise ConfigError(f"`logprobs` must be [B, T], got shape {tuple(logprobs.shape)}")
    shape = logprobs.shape
    for name, t in (
        ("old_logprobs", old_logprobs),
        ("mask", mask),
        ("ref_logprobs", ref_logprobs),
        ("entropy", entropy),
    ):
        if t is not None and t.shape != shape:
            raise ConfigError(f"`{name}` must have the shape of `logprobs` {tuple(shape)}, got {tuple(t.shape)}")
    if advantages.shape != shape[:1]:
        raise ConfigError(f"`advantages` must be [B] = ({shape[0]},) (one per sample), got {tuple(advantages.shape)}")
    if not (0.0 <= eps_low < 1.0 and eps_high >= 0.0):
        raise ConfigError(f"need 0 <= eps_low < 1 and eps_high >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    if aggregation not in ("token-mean", "seq-mean-token-mean"):
        raise ConfigError(f"`loss.aggregation` must be `token-mean` or `seq-mean-token-mean`, got {aggregation!r}")
    if normalizer is not None and not normalizer > 0:
        raise ConfigError(f"`normalizer` must be > 0 (the full batch's token or sequence count), got {normalizer}")
