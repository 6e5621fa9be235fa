"""Advantage estimators: SPO's tracker baseline and the group baselines it is compared with.

SPO (docs/algorithm.md section 2; paper Sec. 4.2, Eqs. 8-10):
    A = r - v_hat_before                        # baseline BEFORE this reward is folded in
    A_tilde = (A - mean_B(A)) / (std_B(A) + 1e-8)   # global over the batch, no groups
std_B is the population standard deviation (ddof = 0), so a normalised batch has std exactly
std / (std + 1e-8), i.e. 1 for any non-degenerate batch. The authors' code uses the sample std
(ddof = 1); the two differ by the factor sqrt(B / (B - 1)) (1.0002 at the paper's B = 2048, 3%
at B = 16). `spo-no-baseline` is the ablation with v_hat = 0 (plain batch-normalised rewards).

Token-measure normalisation (`norm="token"`, beyond the paper: SPO++, arXiv 2608.24870): one
advantage per trajectory feeds a token-mean loss, which weights each trajectory by its number of
trained tokens n_i, so whitening over trajectories does not centre what the loss sees. Here the
mean and std are taken under that measure: m = sum n_i A_i / sum n_i,
s = sqrt(sum n_i (A_i - m)^2 / sum n_i), A_tilde = (A - m) / (s + 1e-8).

Comparison estimators (they need groups of samples of the same problem):
- `grpo`: (r - mean_g) / (std_g + 1e-8) per group, with the sample std (ddof = 1) as the common
  GRPO implementations use; a group of one sample gets 0.
- `rloo`: r_i - mean_{j != i, j in g} r_j (leave-one-out mean, no std scaling); a group of one
  sample gets 0.

Every estimator returns exact zeros (never NaN) where all rewards it compares are equal.
Arrays in, arrays out (float64, shape [B]); the learner broadcasts them to tokens (`loss`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from spo_agents.errors import ConfigError, did_you_mean

NAMES = ("spo", "spo-no-baseline", "grpo", "rloo")
EPS = 1e-8


def _vector(x: Any, name: str, size: int | None = None) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ConfigError(f"`{name}` must be a 1-D array [B], got shape {a.shape}")
    if size is not None and a.size != size:
        raise ConfigError(f"`{name}` has {a.size} entries, expected {size} (one per sample)")
    if not np.all(np.isfinite(a)):
        raise ConfigError(f"`{name}` must be finite, got {a[~np.isfinite(a)][:5]}")
    return a


def _groups(group_ids: Any, size: int) -> tuple[np.ndarray, int]:
    g = np.asarray(group_ids)
    if g.shape != (size,):
        raise ConfigError(f"`group_ids` must have shape ({size},) (one label per sample), got {g.shape}")
    _, inverse = np.unique(g, return_inverse=True)
    inverse = inverse.reshape(-1)
    return inverse, int(inverse.max()) + 1 if size else 0


def normalize(a: Any, weights: Any = None) -> np.ndarray:
    """(a - mean) / (std + 1e-8) with the population std, under `weights` (e.g. trained tokens
    per trajectory) when given; all-equal input (or no weight) gives zeros. # [B] -> [B]"""
    a = np.asarray(a, dtype=np.float64)
    w = np.ones_like(a) if weights is None else _vector(weights, "weights", a.size)
    if weights is not None and np.any(w < 0):
        raise ConfigError("`weights` must be >= 0 (trained tokens per trajectory)")
    if a.size == 0 or a.max() == a.min() or w.sum() <= 0:
        return np.zeros_like(a)
    centred = a - np.sum(w * a) / w.sum()
    return centred / (np.sqrt(np.sum(w * centred**2) / w.sum()) + EPS)


def spo_advantages(rewards: Any, v_hat_before: Any, token_counts: Any = None) -> np.ndarray:
    """Global-normalised r - v_hat_before (Eqs. 8-10), under the token measure when
    `token_counts` is given. # rewards [B], v_hat_before [B], token_counts [B] -> [B]"""
    r = _vector(rewards, "rewards")
    v = _vector(v_hat_before, "v_hat_before", r.size)
    return normalize(r - v, token_counts)


def no_baseline_advantages(rewards: Any, token_counts: Any = None) -> np.ndarray:
    """Ablation: v_hat = 0, i.e. global-normalised rewards. # [B] -> [B]"""
    return normalize(_vector(rewards, "rewards"), token_counts)


def grpo_advantages(rewards: Any, group_ids: Any) -> np.ndarray:
    """(r - mean_g) / (std_g + 1e-8) per group, sample std (ddof = 1). # [B], [B] -> [B]"""
    r = _vector(rewards, "rewards")
    g, k = _groups(group_ids, r.size)
    count = np.bincount(g, minlength=k).astype(np.float64)  # [G]
    mean = np.bincount(g, weights=r, minlength=k) / np.maximum(count, 1)  # [G]
    centred = r - mean[g]  # [B]
    ss = np.bincount(g, weights=centred**2, minlength=k)  # [G]
    std = np.sqrt(ss / np.maximum(count - 1, 1))  # [G]
    out = centred / (std[g] + EPS)
    return np.where(_constant_group(r, g, k), 0.0, out)


def rloo_advantages(rewards: Any, group_ids: Any) -> np.ndarray:
    """r_i minus the mean of the other rewards of its group. # [B], [B] -> [B]"""
    r = _vector(rewards, "rewards")
    g, k = _groups(group_ids, r.size)
    count = np.bincount(g, minlength=k).astype(np.float64)  # [G]
    total = np.bincount(g, weights=r, minlength=k)  # [G]
    n = count[g]  # [B]
    loo_mean = (total[g] - r) / np.maximum(n - 1, 1)  # [B]
    return np.where(_constant_group(r, g, k), 0.0, r - loo_mean)


def _constant_group(r: np.ndarray, g: np.ndarray, k: int) -> np.ndarray:
    """Per sample: is every reward of its group equal (groups of one included)? # [B]"""
    if r.size == 0:
        return np.zeros(0, dtype=bool)
    hi = np.full(k, -np.inf)
    lo = np.full(k, np.inf)
    np.maximum.at(hi, g, r)
    np.minimum.at(lo, g, r)
    return (hi == lo)[g]


def degenerate_share(rewards: Any, group_ids: Any) -> float:
    """Share of samples in groups whose rewards are all equal (zero GRPO advantage; docs/algorithm.md section 0)."""
    r = _vector(rewards, "rewards")
    if r.size == 0:
        return 0.0
    g, k = _groups(group_ids, r.size)
    return float(_constant_group(r, g, k).mean())


def compute_advantages(
    name: str, rewards: Any, v_hat_before: Any = None, group_ids: Any = None, token_counts: Any = None
) -> np.ndarray:
    """Dispatch on the config name: `spo`, `spo-no-baseline`, `grpo` or `rloo`. # [B]

    `token_counts` (trained tokens per trajectory) selects the token-measure normalisation of
    the single-stream estimators; the group estimators do not take it."""
    if name == "spo":
        if v_hat_before is None:
            raise ConfigError("advantage `spo` needs `v_hat_before` (the tracker's values before this batch)")
        return spo_advantages(rewards, v_hat_before, token_counts)
    if name == "spo-no-baseline":
        return no_baseline_advantages(rewards, token_counts)
    if token_counts is not None:
        raise ConfigError(
            f"advantage `{name}` normalises within groups; token-measure normalisation applies to `spo` only"
        )
    if name in ("grpo", "rloo"):
        if group_ids is None:
            raise ConfigError(f"advantage `{name}` needs `group_ids` (grouped collection, `algorithm.group_size` > 1)")
        return grpo_advantages(rewards, group_ids) if name == "grpo" else rloo_advantages(rewards, group_ids)
    raise ConfigError(
        f"unknown advantage estimator `{name}`; expected one of {', '.join(NAMES)}.{did_you_mean(name, NAMES)}"
    )
