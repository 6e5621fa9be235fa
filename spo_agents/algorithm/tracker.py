"""The persistent per-problem value tracker of SPO (docs/algorithm.md section 1; paper Sec. 4.1, Alg. 2).

Each problem x carries a Beta(alpha, beta) belief over its success probability, v_hat(x) =
alpha / (alpha + beta). A reward r folds in as alpha <- rho(x) alpha + r, beta <- rho(x) beta +
(1 - r), with rho(x) = clip(2 ** (-D(x) / d_half), rho_min, rho_max) (`rho_type: kl-adaptive`)
and D(x) how far the policy moved since it last acted on x: `drift: cumulative` (the learner
calls `add_drift` once per step) or `drift: per-prompt` (D per sample given to `update`).
The two drift estimators, rewards outside [0, 1] and the memory layout (28 bytes per problem,
ids hashed): docs/algorithm.md, section 1.

Departures from the authors' code (docs/algorithm.md, "Departures from the paper and the authors' code"):
1. Keyed by a stable problem id, not the prompt text.
2. Offline initialisation uses each problem's actual sample count.
3. The state is saved and restored (`state_dict` / `load_state_dict`).
4. D_half and rho_max are configurable.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from spo_agents.config import check_tracker_values
from spo_agents.errors import CheckpointError, ConfigError, SPOError

if TYPE_CHECKING:
    from spo_agents.config import TrackerConfig

STATE_VERSION = 1
_RHO_TYPES = ("kl-adaptive", "constant")
_DRIFTS = ("cumulative", "per-prompt")


class UnknownProblemError(SPOError, KeyError):
    """A problem id (or index) the tracker was not built with."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def hash_ids(ids: Sequence[str]) -> np.ndarray:
    """Stable 64-bit hash of each id: blake2b with an 8-byte digest of its UTF-8 bytes. # [N]"""
    digest = b"".join(hashlib.blake2b(_as_str(i).encode("utf-8"), digest_size=8).digest() for i in ids)
    return np.frombuffer(digest, dtype="<u8").astype(np.uint64, copy=False)


def _as_str(x: Any) -> str:
    if not isinstance(x, str):
        raise ConfigError(f"problem ids must be strings (stable ids, not prompt text), got {x!r} ({type(x).__name__})")
    return x


@dataclass(frozen=True)
class TrackerSummary:
    """Metrics of the tracker's beliefs (visited problems only; all problems if none visited)."""

    v_hat_mean: float
    v_hat_p10: float
    v_hat_p50: float
    v_hat_p90: float
    count_mean: float  # mean effective sample count alpha + beta
    visited_share: float  # share of problems updated at least once
    drift_total: float  # C, the running drift sum (cumulative mode)

    def as_dict(self, prefix: str = "tracker/") -> dict[str, float]:
        return {prefix + k: v for k, v in asdict(self).items()}


class ValueTracker:
    """Beta(alpha, beta) per problem, vectorised over problems (docs/algorithm.md section 1).

    Problems are addressed by their index in `problem_ids` (the order given at construction);
    `indices(ids)` maps ids to those indices.
    """

    def __init__(
        self,
        problem_ids: Sequence[str],
        *,
        rho_type: str = "kl-adaptive",
        rho_constant: float = 0.96,
        d_half: float = 0.06,
        rho_min: float = 0.875,
        rho_max: float = 0.96,
        drift: str = "cumulative",
    ) -> None:
        if rho_type not in _RHO_TYPES:
            raise ConfigError(f"`rho_type` must be one of {_RHO_TYPES}, got {rho_type!r}")
        if drift not in _DRIFTS:
            raise ConfigError(f"`drift` must be one of {_DRIFTS}, got {drift!r}")
        check_tracker_values(rho_min, rho_max, d_half, rho_constant)
        self.config = {
            "rho_type": rho_type,
            "rho_constant": float(rho_constant),
            "d_half": float(d_half),
            "rho_min": float(rho_min),
            "rho_max": float(rho_max),
            "drift": drift,
        }
        ids = list(problem_ids)
        n = len(ids)
        hashes = hash_ids(ids)  # [N], caller order
        order = np.argsort(hashes, kind="stable")
        self._sorted = hashes[order]  # [N] uint64
        self._order = order.astype(np.int32 if n < 2**31 else np.int64)  # [N] sorted pos -> index
        dup = np.flatnonzero(self._sorted[1:] == self._sorted[:-1])
        if dup.size:
            a, b = ids[self._order[dup[0]]], ids[self._order[dup[0] + 1]]
            what = f"duplicate problem id `{a}`" if a == b else f"ids `{a}` and `{b}` share a 64-bit hash"
            raise ConfigError(f"{what} ({dup.size} clash(es) among {n} ids); problem ids must be unique")
        self.alpha = np.full(n, 0.5, dtype=np.float32)  # [N]
        self.beta = np.full(n, 0.5, dtype=np.float32)  # [N]
        self.c_last = np.full(n, np.nan, dtype=np.float64)  # [N] C at the last visit; NaN = never
        self.C = 0.0

    @classmethod
    def from_config(cls, problem_ids: Sequence[str], cfg: TrackerConfig) -> ValueTracker:
        return cls(
            problem_ids,
            rho_type=cfg.rho_type,
            rho_constant=cfg.rho_constant,
            d_half=cfg.d_half,
            rho_min=cfg.rho_min,
            rho_max=cfg.rho_max,
            drift=cfg.drift,
        )

    def __len__(self) -> int:
        return int(self.alpha.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by the per-problem arrays (id index included)."""
        return sum(a.nbytes for a in (self._sorted, self._order, self.alpha, self.beta, self.c_last))

    # ---------------------------------------------------------------- addressing
    def _lookup(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sorted positions of hashes `h` and whether each is present. # [B], [B]"""
        if len(self) == 0:
            return np.zeros(h.shape, np.int64), np.zeros(h.shape, bool)
        pos = np.minimum(np.searchsorted(self._sorted, h), len(self) - 1)  # [B]
        return pos, self._sorted[pos] == h

    def contains(self, ids: Sequence[str]) -> np.ndarray:
        """Whether each id belongs to this tracker's problem set (bool, [B])."""
        return self._lookup(hash_ids(list(ids)))[1]

    def indices(self, ids: Sequence[str]) -> np.ndarray:
        """Index of each id (int64, [B]); unknown ids raise `UnknownProblemError`."""
        ids = list(ids)
        pos, found = self._lookup(hash_ids(ids))
        if not found.all():
            bad = np.flatnonzero(~found)
            raise UnknownProblemError(
                f"unknown problem id `{ids[bad[0]]}` ({bad.size} of {len(ids)} ids unknown); the tracker "
                f"was built with {len(self)} problems: build it from the same problem set (stable ids)"
            )
        return self._order[pos].astype(np.int64)

    def _check_idx(self, idx: Any) -> np.ndarray:
        idx = np.asarray(idx)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise UnknownProblemError(
                f"expected a 1-D integer array of problem indices, got shape {idx.shape} {idx.dtype}"
            )
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise UnknownProblemError(f"problem index out of range [0, {len(self)}): got {idx.min()}..{idx.max()}")
        return idx.astype(np.int64, copy=False)

    # ---------------------------------------------------------------- reading
    def v_hat(self, idx: Any = None) -> np.ndarray:
        """alpha / (alpha + beta), float64; all problems when `idx` is None. # [B] or [N]"""
        if idx is None:
            a, b = self.alpha.astype(np.float64), self.beta.astype(np.float64)
        else:
            i = self._check_idx(idx)
            a, b = self.alpha[i].astype(np.float64), self.beta[i].astype(np.float64)
        return a / (a + b)

    def rho(self, idx: Any, drift: Any = None) -> np.ndarray:
        """Forgetting factor of each indexed problem for its next update (Sec. 4.1). # [B]

        `drift` (per sample, >= 0) is D(x) and, when given, is used in either drift mode; when
        None, the cumulative estimate C - C_last is used (per-prompt mode requires `drift`).
        Problems never visited get D = 0, i.e. rho_max, whatever `drift` says.
        """
        i = self._check_idx(idx)
        cfg = self.config
        if cfg["rho_type"] == "constant":
            return np.full(i.shape, cfg["rho_constant"])
        if drift is None:
            if cfg["drift"] == "per-prompt":
                raise ConfigError(
                    "`drift: per-prompt` needs the drift of each sample: pass `drift=` (one value per index)"
                )
            d = self.C - self.c_last[i]  # [B]
        else:
            d = np.broadcast_to(np.asarray(drift, dtype=np.float64), i.shape).copy()
            bad = d[~(np.isfinite(d) & (d >= 0))]
            if bad.size:
                raise ConfigError(f"`drift` must be finite and >= 0 (mean |log pi_now - log pi_then|), got {bad[:5]}")
        d = np.where(np.isnan(self.c_last[i]), 0.0, d)  # first visit: D = 0
        return np.clip(np.exp2(-d / cfg["d_half"]), cfg["rho_min"], cfg["rho_max"])

    def summary(self) -> TrackerSummary:
        visited = ~np.isnan(self.c_last)
        sel = visited if visited.any() else np.ones_like(visited)
        v = self.v_hat()[sel]
        q = np.quantile(v, [0.1, 0.5, 0.9]) if v.size else np.zeros(3)
        count = (self.alpha[sel].astype(np.float64) + self.beta[sel]).mean() if v.size else 0.0
        return TrackerSummary(
            float(v.mean()) if v.size else 0.0,
            float(q[0]),
            float(q[1]),
            float(q[2]),
            float(count),
            float(visited.mean()) if visited.size else 0.0,
            float(self.C),
        )

    # ---------------------------------------------------------------- writing
    def add_drift(self, d: float) -> None:
        """Cumulative mode: add this step's measured policy drift to C (C += d)."""
        d = float(d)
        if not (np.isfinite(d) and d >= 0):
            raise ConfigError(f"`add_drift` expects a finite drift >= 0, got {d}")
        self.C += d

    def update(self, idx: Any, rewards: Any, drift: Any = None) -> np.ndarray:
        """Fold one reward per sample into its problem's belief (Alg. 2); returns the rho each
        sample was folded in with. # idx [B], rewards [B] -> rho [B]

        Duplicate indices are applied in order, exactly as a loop over the batch would: the
        k-th occurrence of a problem sees the state left by the (k-1)-th, and since the policy
        did not move between two copies in one update, every copy after the first has D = 0 in
        both drift modes (a `drift` passed for it is ignored). Vectorised by occurrence rank: one
        numpy pass per multiplicity level.
        """
        i = self._check_idx(idx)
        r = np.asarray(rewards, dtype=np.float64).reshape(-1)
        if r.shape != i.shape:
            raise ConfigError(f"`update` needs one reward per index: {i.size} indices, {r.size} rewards")
        if not np.all(np.isfinite(r)):
            raise ConfigError(f"rewards must be finite, got {r[~np.isfinite(r)][:5]}")
        d = None
        if drift is not None:
            d = np.broadcast_to(np.asarray(drift, dtype=np.float64), i.shape)
        elif self.config["drift"] == "per-prompt" and self.config["rho_type"] != "constant":
            raise ConfigError("`drift: per-prompt` needs the drift of each sample: pass `drift=` (one value per index)")
        rho_used = np.empty(i.shape, dtype=np.float64)  # [B]
        for rank, sel in enumerate(_occurrence_ranks(i)):
            j = i[sel]  # [b], distinct
            d_sel = None if d is None else (d[sel] if rank == 0 else np.zeros(sel.size))  # repeats: D = 0
            rho = self.rho(j, d_sel)  # [b]
            self.alpha[j] = rho * self.alpha[j] + r[sel]
            self.beta[j] = rho * self.beta[j] + (1.0 - r[sel])
            self.c_last[j] = self.C
            rho_used[sel] = rho
        return rho_used

    def init_offline(self, idx: Any, successes: Any, samples: Any) -> None:
        """Offline value estimation (paper Sec. 4.1): reward sum s (successes for 0/1 rewards)
        out of n ACTUAL samples.

        N0 = 1 / (1 - rho_min); alpha0 = N0 (s + 0.5) / (n + 1); beta0 = N0 (n - s + 0.5) / (n + 1).
        Problems with n = 0 keep alpha = beta = 0.5. Does not count as a visit.
        """
        i = self._check_idx(idx)
        s = np.asarray(successes, dtype=np.float64).reshape(-1)
        n = np.asarray(samples, dtype=np.float64).reshape(-1)
        if not (s.shape == n.shape == i.shape):
            raise ConfigError(
                f"`init_offline` needs one (successes, samples) pair per index: {i.size}, {s.size}, {n.size}"
            )
        if np.unique(i).size != i.size:
            raise ConfigError("`init_offline` got the same problem index twice; aggregate its samples first")
        if np.any(n < 0) or np.any(s < 0) or np.any(s > n) or np.any(n != np.round(n)) or not np.all(np.isfinite(s)):
            raise ConfigError(
                "`init_offline` needs integer sample counts and reward sums with 0 <= successes <= samples"
            )
        n0 = 1.0 / (1.0 - self.config["rho_min"])
        has = n > 0
        self.alpha[i] = np.where(has, n0 * (s + 0.5) / (n + 1.0), 0.5)
        self.beta[i] = np.where(has, n0 * (n - s + 0.5) / (n + 1.0), 0.5)

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Flat dict of numpy arrays and scalars, rows in problem-index order.

        Config fields are stored under `config/<name>`, so `np.savez(path, **sd)` writes it without
        pickling and `load_state_dict(dict(np.load(path)))` restores it.
        """
        ids_hash = np.empty_like(self._sorted)
        ids_hash[self._order] = self._sorted
        sd: dict[str, Any] = {"version": STATE_VERSION, "C": float(self.C), "id_hash": ids_hash}
        sd.update({"alpha": self.alpha.copy(), "beta": self.beta.copy(), "c_last": self.c_last.copy()})
        sd.update({f"config/{k}": v for k, v in self.config.items()})
        return sd

    def load_state_dict(self, sd: dict[str, Any], *, strict_config: bool = True) -> list[str]:
        """Restore a `state_dict`; returns the config differences (kept: this tracker's config).

        The saved problem set must equal this one (order may differ: rows are matched by id hash).
        Config differences raise `CheckpointError` unless `strict_config=False`.
        """
        version = _scalar(sd.get("version"))
        if version != STATE_VERSION:
            raise CheckpointError(f"tracker state version {version!r} unsupported; expected {STATE_VERSION}")
        saved = {k: _scalar(sd.get(f"config/{k}")) for k in self.config}
        diffs = [f"`{k}`: saved {saved[k]!r}, now {v!r}" for k, v in self.config.items() if saved[k] != v]
        if diffs and strict_config:
            raise CheckpointError(
                "tracker config differs from the checkpoint: "
                + "; ".join(diffs)
                + ". Resume with the saved tracker settings, or load with strict_config=False to keep the new ones"
            )
        h = np.asarray(sd["id_hash"], dtype=np.uint64)
        pos, ok = self._lookup(h)
        if h.size != len(self) or not ok.all():
            raise CheckpointError(
                f"tracker checkpoint is for another problem set: it holds {h.size} problems, this run has "
                f"{len(self)}, {int((~ok).sum())} saved ids are not in this run; use the same problem set"
            )
        rows = self._order[pos]
        self.alpha[rows] = np.asarray(sd["alpha"], dtype=np.float32)
        self.beta[rows] = np.asarray(sd["beta"], dtype=np.float32)
        self.c_last[rows] = np.asarray(sd["c_last"], dtype=np.float64)
        self.C = float(_scalar(sd["C"]))
        return diffs


def _scalar(x: Any) -> Any:
    """A Python scalar from a scalar or a 0-d numpy array (as `np.load` returns them)."""
    if isinstance(x, np.ndarray) and x.ndim == 0:
        x = x.item()
    return float(x) if isinstance(x, (np.floating, float)) else x.item() if isinstance(x, np.generic) else x


def _occurrence_ranks(idx: np.ndarray) -> list[np.ndarray]:
    """Split positions of `idx` by occurrence rank: [first occurrences, second ones, ...]. # [B]

    Each returned array holds positions (in batch order) whose indices are distinct.
    """
    if idx.size == 0:
        return []
    order = np.argsort(idx, kind="stable")  # [B]
    s = idx[order]
    start = np.r_[True, s[1:] != s[:-1]]  # [B] first of its run
    run_start = np.maximum.accumulate(np.where(start, np.arange(s.size), 0))
    rank = np.empty(s.size, dtype=np.int64)
    rank[order] = np.arange(s.size) - run_start  # [B]
    if rank.max() == 0:
        return [np.arange(idx.size)]
    return [np.flatnonzero(rank == k) for k in range(int(rank.max()) + 1)]
