"""Advantage estimators: SPO's tracker baseline and the group baselines it is compared with.

SPO (SPO.md section 2; paper Sec. 4.2, Eqs. 8-10):
    A = r - v_hat_before                        # baseline BEFORE this reward is folded in
    A_tilde = (A - mean_B(A)) / (std_B(A) + 1e-8)   # global over the batch, no groups
std_B is the population standard deviation (ddof = 0), so a normalised batch has std exactly
std / (std + 1e-8), i.e. 1 for any non-degenerate batch. `spo-no-baseline` is the ablation with
v_hat = 0 (plain batch-normalised rewards).

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


def normalize(a: Any) -> np.ndarray:
    """(a - mean) / (std + 1e-8) with the population std; all-equal input gives zeros. # [B]"""
    a = np.asarray(a, dtype=np.float64)
    if a.size == 0 or a.max() == a.min():
        return np.zeros_like(a)
    centred = a - a.mean()
    return centred / (np.sqrt(np.mean(centred**2)) + EPS)


def spo_advantages(rewards: Any, v_hat_before: Any) -> np.ndarray:
    """Global-normalised r - v_hat_before (Eqs. 8-10). # rewards [B], v_hat_before [B] -> [B]"""
    r = _vector(rewards, "rewards")
    v = _vector(v_hat_before, "v_hat_before", r.size)
    return normalize(r - v)


def no_baseline_advantages(rewards: Any) -> np.ndarray:
    """Ablation: v_hat = 0, i.e. global-normalised rewards. # [B] -> [B]"""
    return normalize(_vector(rewards, "rewards"))


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
    """Share of samples in groups whose rewards are all equal (zero GRPO advantage; SPO.md 'Why')."""
    r = _vector(rewards, "rewards")
    if r.size == 0:
        return 0.0
    g, k = _groups(group_ids, r.size)
    return float(_constant_group(r, g, k).mean())


def compute_advantages(name: str, rewards: Any, v_hat_before: Any = None, group_ids: Any = None) -> np.ndarray:
    """Dispatch on the config name: `spo`, `spo-no-baseline`, `grpo` or `rloo`. # [B]"""
    if name == "spo":
        if v_hat_before is None:
            raise ConfigError("advantage `spo` needs `v_hat_before` (the tracker's values before this batch)")
        return spo_advantages(rewards, v_hat_before)
    if name == "spo-no-baseline":
        return no_baseline_advantages(rewards)
    if name in ("grpo", "rloo"):
        if group_ids is None:
            raise ConfigError(f"advantage `{name}` needs `group_ids` (grouped collection, `algorithm.group_size` > 1)")
        return grpo_advantages(rewards, group_ids) if name == "grpo" else rloo_advantages(rewards, group_ids)
    raise ConfigError(
        f"unknown advantage estimator `{name}`; expected one of {', '.join(NAMES)}.{did_you_mean(name, NAMES)}"
    )
