"""Which problems are attempted next: prioritised sampling from the tracker (docs/algorithm.md section 4).

Paper Eq. 11: w(x) = sqrt(v_hat(x) (1 - v_hat(x))) / N_eff(x)^gamma + eps, eps = 0.05, with
N_eff = alpha + beta the tracker's effective sample count; the next batch is drawn with
probability proportional to w, without replacement, from the whole problem pool. The authors'
code drops the N_eff term; `gamma = 0` (the default) does the same, and gamma > 0 draws
problems the tracker has much evidence on less often.

Drawing without replacement uses exponential keys (Efraimidis & Spirakis 2006): each problem
gets k = E / w with E ~ Exp(1), and the n smallest keys, in increasing order, are the sample.
Because min_j E_j / w_j falls on problem i with probability w_i / sum_j w_j and exponentials are
memoryless, the first key is a draw proportional to w, the second a draw proportional to w
among the rest, and so on: the result has exactly the distribution of n successive draws
without replacement (the same as the Gumbel-top-k trick, log k = -(log w + Gumbel)). It costs
one O(N) pass plus an O(N) partial sort, with no Python loop over draws.

v_hat outside [0, 1] (possible with rewards outside [0, 1], see `tracker`) is clipped into
[0, 1] for the weights. `exclude` (e.g. problems already in flight) gets weight 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from spo_agents.errors import CheckpointError, ConfigError, SPOError

if TYPE_CHECKING:
    from spo_agents.config import SamplerConfig

STATE_VERSION = 1


class SamplingError(SPOError, ValueError):
    """A draw cannot be made (more problems requested than are available, bad v_hat)."""


class PrioritizedSampler:
    """Draws problem indices with probability proportional to sqrt(v (1 - v)) + eps (Eq. 11)."""

    kind = "prioritized"

    def __init__(self, num_problems: int, eps: float = 0.05, seed: int = 0, gamma: float = 0.0) -> None:
        if num_problems < 0:
            raise ConfigError(f"`num_problems` must be >= 0, got {num_problems}")
        if not eps >= 0:
            raise ConfigError(f"`sampler.eps` must be >= 0, got {eps}")
        if not (np.isfinite(gamma) and gamma >= 0):
            raise ConfigError(f"`sampler.gamma` must be a finite number >= 0, got {gamma}")
        self.num_problems = int(num_problems)
        self.eps = float(eps)
        self.gamma = float(gamma)
        self.rng = np.random.default_rng(seed)
        self.draws = 0  # batches drawn so far

    def weights(self, v_hat: Any, n_eff: Any = None) -> np.ndarray:
        """w = sqrt(v (1 - v)) / n_eff^gamma + eps, unnormalised. # [N]

        `n_eff` (alpha + beta per problem, [N]) is needed only when gamma > 0."""
        v = self._check_v(v_hat)
        w = v * v  # [N]; in place below: this runs on the whole pool every step
        np.subtract(v, w, out=w)  # v (1 - v), negative exactly when v is outside [0, 1]
        np.maximum(w, 0.0, out=w)  # == clipping v into [0, 1]
        np.sqrt(w, out=w)
        if self.gamma > 0:
            if n_eff is None:
                raise SamplingError("`sampler.gamma` > 0 needs each problem's effective count alpha + beta (`n_eff`)")
            n = np.asarray(n_eff, dtype=np.float64)
            if n.shape != w.shape or not np.all(n > 0):
                raise SamplingError(f"`n_eff` must be {w.shape[0]} positive counts alpha + beta, got shape {n.shape}")
            w /= n**self.gamma
        w += self.eps
        if np.isnan(w.sum()):
            raise SamplingError("`v_hat` contains NaN or infinity; the tracker state is corrupt")
        return w

    def entropy(self, v_hat: Any) -> float:
        """Entropy of the normalised weights divided by log N: 1 = uniform, -> 0 = concentrated."""
        w = self.weights(v_hat)
        total = w.sum()
        if self.num_problems <= 1 or total <= 0:
            return 0.0 if total <= 0 else 1.0
        p = w[w > 0] / total
        return float(-(p * np.log(p)).sum() / np.log(self.num_problems))

    def sample(self, v_hat: Any, n: int, exclude: Any = None, n_eff: Any = None) -> np.ndarray:
        """n distinct indices (int64, in draw order), drawn proportionally to w without replacement."""
        w = self.weights(v_hat, n_eff)  # [N]
        if exclude is not None:
            ex = np.asarray(exclude, dtype=np.int64).reshape(-1)
            if ex.size and (ex.min() < 0 or ex.max() >= self.num_problems):
                raise SamplingError(f"`exclude` holds indices outside [0, {self.num_problems})")
            w[ex] = 0.0  # `weights` returned a fresh array
        if self.eps > 0:  # every weight is >= eps: only the excluded ones are unavailable
            available = self.num_problems - (0 if exclude is None else np.unique(ex).size)
        else:
            available = int(np.count_nonzero(w > 0))
        if not 0 <= n <= available:
            raise SamplingError(
                f"cannot draw {n} distinct problems: {available} of {self.num_problems} are available "
                f"(weight > 0 and not excluded); lower the batch size or in-flight count, or add problems"
            )
        self.draws += 1
        if n == 0:
            return np.empty(0, dtype=np.int64)
        keys = self.rng.standard_exponential(self.num_problems)  # [N] E ~ Exp(1)
        with np.errstate(divide="ignore"):
            keys /= w  # [N] E / w; weight 0 -> inf, never drawn
        top = np.argpartition(keys, n - 1)[:n] if n < self.num_problems else np.arange(self.num_problems)
        return top[np.argsort(keys[top], kind="stable")].astype(np.int64)

    def _check_v(self, v_hat: Any) -> np.ndarray:
        v = np.asarray(v_hat, dtype=np.float64)
        if v.shape != (self.num_problems,):
            raise SamplingError(
                f"`v_hat` must have shape ({self.num_problems},) (one value per problem), got {v.shape}"
            )
        return v

    def draw(self, v_hat: Any, n: int, busy: Any = (), n_eff: Any = None) -> np.ndarray:
        """n indices for new episodes while the problems in `busy` still run. # -> [n]

        Distinct and outside `busy` as long as the pool allows it; when it runs short, the rest
        come from `busy` (still distinct within this draw), and a problem is drawn twice in one
        call only when `n` exceeds the number of drawable problems."""
        w = self.weights(v_hat, n_eff)  # [N]
        drawable = w > 0
        if n > 0 and not drawable.any():
            raise SamplingError("no problem has a weight > 0; raise `sampler.eps` above 0")
        taken = np.zeros(self.num_problems, dtype=bool)  # [N] busy, then drawn in this call
        taken[np.asarray(busy, dtype=np.int64).reshape(-1)] = True
        out: list[np.ndarray] = []
        left = n
        while left > 0:
            free = int(np.count_nonzero(drawable & ~taken))
            if free == 0:  # the pool is exhausted: start another round over every problem
                taken[:] = False
                for got in out:  # ...except the ones this call already drew in the current round
                    taken[got] = True
                if not (drawable & ~taken).any():
                    taken[:] = False
                continue
            got = self.sample(v_hat, min(left, free), exclude=np.flatnonzero(taken), n_eff=n_eff)
            taken[got] = True
            out.append(got)
            left -= got.size
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)

    def state_dict(self) -> dict[str, Any]:
        """RNG state and draw counter: a restored sampler draws the same next batch."""
        return {
            "version": STATE_VERSION,
            "type": self.kind,
            "num_problems": self.num_problems,
            "eps": self.eps,
            "draws": self.draws,
            "bit_generator": self.rng.bit_generator.state,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("version") != STATE_VERSION or sd.get("type") != self.kind:
            raise CheckpointError(
                f"sampler state is `{sd.get('type')}` v{sd.get('version')}; "
                f"this run uses `{self.kind}` v{STATE_VERSION}"
            )
        if sd["num_problems"] != self.num_problems:
            raise CheckpointError(
                f"sampler checkpoint is for {sd['num_problems']} problems, this run has {self.num_problems}; "
                "use the same problem set"
            )
        state = sd["bit_generator"]
        if state.get("bit_generator") != type(self.rng.bit_generator).__name__:
            raise CheckpointError(
                f"sampler RNG `{state.get('bit_generator')}` cannot be restored into "
                f"`{type(self.rng.bit_generator).__name__}`"
            )
        self.rng.bit_generator.state = state
        self.draws = int(sd["draws"])


class UniformSampler(PrioritizedSampler):
    """Uniform draws without replacement (the ablation of prioritised sampling)."""

    kind = "uniform"

    def __init__(self, num_problems: int, seed: int = 0) -> None:
        super().__init__(num_problems, eps=1.0, seed=seed)

    def weights(self, v_hat: Any, n_eff: Any = None) -> np.ndarray:
        return np.ones(self._check_v(v_hat).shape)


def make_sampler(cfg: SamplerConfig, num_problems: int, seed: int) -> PrioritizedSampler:
    """The sampler named by `sampler.type`."""
    if cfg.type == "prioritized":
        return PrioritizedSampler(num_problems, eps=cfg.eps, seed=seed, gamma=cfg.gamma)
    if cfg.type == "uniform":
        return UniformSampler(num_problems, seed=seed)
    raise ConfigError(f"`sampler.type` must be `prioritized` or `uniform`, got {cfg.type!r}")
