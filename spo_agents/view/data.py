"""What the viewer reads: run dirs and eval dirs, cached by file modification time.

A run dir (`spo_agents.training.checkpoint`) gives the metrics rows, the latest checkpoint's tracker, the
trajectory log (`spo_agents.trajectories`) and its eval dirs; an eval dir
(`spo_agents.evaluation.runner`) gives its report and transcripts. Every reader tolerates files that a
running trainer or evaluation is writing: torn last lines are skipped, vanished files are empty.
"""

from __future__ import annotations

import inspect
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spo_agents.errors import ConfigError

LIVE_SECONDS = 300.0  # a run whose metrics changed this recently is shown as training


class _Cache:
    """Values computed from files, recomputed when a file's (mtime, size) changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[Any, tuple[Any, Any]] = {}

    def get(self, key: Any, paths: list[Path], compute: Callable[[], Any]) -> Any:
        stamp = tuple(_stamp(p) for p in paths)
        with self._lock:
            hit = self._data.get(key)
            if hit is not None and hit[0] == stamp:
                return hit[1]
        value = compute()
        with self._lock:
            self._data[key] = (stamp, value)
        return value


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
        return (st.st_mtime_ns, st.st_size)
    except OSError:
        return (0, -1)


# --------------------------------------------------------------------------------------------
# Eval dirs
# --------------------------------------------------------------------------------------------
@dataclass
class Cluster:
    """Equivalent answers of one problem and their votes."""

    answer: Any
    votes: int
    correct: bool
    samples: list[int]


def answer_key(answer: Any) -> Any:
    """The grouping key of an answer for display: its exact value when it is a number, else its
    normalised spelling (`spo_agents.envs.answers`). The report's maj@k used the env's own
    `answers_equivalent`, which may group more."""
    from spo_agents.envs.answers import exact_number, normalize

    value = exact_number(answer)
    return ("number", value) if value is not None else ("text", normalize(answer))


def clusters_of(answers: list[Any], correct: list[bool], sample_ids: list[int]) -> list[Cluster]:
    """Answer clusters, most votes first (`None` answers do not vote)."""
    from spo_agents.algorithm.passk import cluster_answers

    keys = [answer_key(a) if a is not None else None for a in answers]
    groups = cluster_answers(keys, lambda a, b: a == b)
    out = [Cluster(answers[g[0]], len(g), any(correct[i] for i in g), [sample_ids[i] for i in g]) for g in groups]
    return sorted(out, key=lambda c: -c.votes)


class EvalDir:
    """An eval dir: report (`results.json`, or recomputed while the evaluation runs) and transcripts."""

    def __init__(self, path: Path, name: str | None = None) -> None:
        self.path = Path(path)
        self.name = name or self.path.name
        self._cache = _Cache()

    def _files(self) -> tuple[Path, Path, Path]:
        from spo_agents.evaluation.runner import RESULTS, SETTINGS, TRANSCRIPTS

        return self.path / TRANSCRIPTS, self.path / RESULTS, self.path / SETTINGS

    def samples(self) -> dict[tuple[str, int], Any]:
        """(problem id, sample index) -> `Trajectory`; the last record of a sample wins."""
        from spo_agents.types import read_jsonl

        transcripts = self._files()[0]

        def load() -> dict[tuple[str, int], Any]:
            if not transcripts.is_file():
                return {}
            return {(t.problem_id, t.sample_index): t for t in read_jsonl(transcripts)}

        return self._cache.get("samples", [transcripts], load)

    def settings(self) -> dict[str, Any]:
        path = self._files()[2]
        return self._cache.get("settings", [path], lambda: _json_file(path) or {})

    def report(self) -> dict[str, Any]:
        """`results.json`, or the report recomputed from the transcripts written so far."""
        transcripts, results, _ = self._files()

        def load() -> dict[str, Any]:
            saved = _json_file(results)
            if saved is not None:
                return saved
            from spo_agents.evaluation.runner import compute_report

            samples = self.samples()
            ids = list(dict.fromkeys(pid for pid, _ in samples))
            k = max((i for _, i in samples), default=0) + 1
            rep = compute_report(samples, ids, k, lambda a, b: a is not None and answer_key(a) == answer_key(b))
            return {**rep.to_dict(), "partial": True}

        return self._cache.get("report", [transcripts, results], load)

    def problem_samples(self, problem_id: str) -> list[Any]:
        return [t for (pid, _), t in sorted(self.samples().items(), key=lambda kv: kv[0][1]) if pid == problem_id]


def _json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------------------------
# Run dirs
# --------------------------------------------------------------------------------------------
@dataclass
class ProblemRow:
    """One line of the problems table."""

    index: int  # row in the tracker (-1: known from the visit log only)
    problem_id: str | None  # None when only the id's hash is known
    id_hash: int | None
    alpha: float | None = None
    beta: float | None = None
    v_hat: float | None = None
    prob: float | None = None  # probability of the next single draw
    visits: int = 0
    last_reward: float | None = None
    last_step: int | None = None

    @property
    def n_eff(self) -> float | None:
        return None if self.alpha is None or self.beta is None else self.alpha + self.beta

    @property
    def label(self) -> str:
        return self.problem_id if self.problem_id is not None else f"#{self.id_hash:016x}"


@dataclass
class TrackerView:
    """The tracker of a run's latest checkpoint, with what the viewer adds to it."""

    step: int
    checkpoint: str
    rows: list[ProblemRow]
    config: dict[str, Any] = field(default_factory=dict)
    note: str | None = None  # how the sampling probability was computed


class RunDir:
    """A training run dir (`spo_agents.training.checkpoint` layout)."""

    def __init__(self, path: Path) -> None:
        from spo_agents.trajectories import TrajectoryLogReader

        self.path = Path(path)
        self.name = self.path.name
        self.log = TrajectoryLogReader(self.path)
        self._cache = _Cache()
        self._evals: dict[str, EvalDir] = {}

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def metrics(self) -> list[dict[str, Any]]:
        from spo_agents.training.metrics import read_metrics

        return self._cache.get("metrics", [self.metrics_path], lambda: read_metrics(self.metrics_path))

    def config(self) -> dict[str, Any]:
        import yaml

        path = self.path / "config.yaml"

        def load() -> dict[str, Any]:
            try:
                return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError):
                return {}

        return self._cache.get("config", [path], load)

    def live(self) -> bool:
        """Metrics were written within `LIVE_SECONDS`: the run is probably training."""
        stamp = _stamp(self.metrics_path)
        return stamp[1] >= 0 and time.time() - stamp[0] / 1e9 < LIVE_SECONDS

    def eval_names(self) -> list[str]:
        from spo_agents.evaluation.runner import TRANSCRIPTS

        root = self.path / "eval"
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if (p / TRANSCRIPTS).is_file())

    def eval_dir(self, name: str) -> EvalDir:
        if name not in self.eval_names():
            raise KeyError(name)
        if name not in self._evals:
            self._evals[name] = EvalDir(self.path / "eval" / name)
        return self._evals[name]

    # -- tracker ---------------------------------------------------------------------------
    def checkpoint(self) -> Path | None:
        from spo_agents.training.checkpoint import CheckpointManager

        return CheckpointManager(self.path).latest()

    def visit_summary(self) -> dict[str, tuple[int, float, int]]:
        """problem id -> (visits, last reward, last step), from the visit log."""
        path = self.log.dir / "visits.jsonl"

        def load() -> dict[str, tuple[int, float, int]]:
            out: dict[str, tuple[int, float, int]] = {}
            for v in self.log.visits():
                n = out.get(v.problem_id, (0, 0.0, 0))[0]
                out[v.problem_id] = (n + 1, v.reward, v.step)
            return out

        return self._cache.get("visit-summary", [path], load)

    def tracker(self) -> TrackerView | None:
        """The latest checkpoint's tracker joined with the visit log; None without a checkpoint."""
        ckpt = self.checkpoint()
        if ckpt is None:
            return None
        state_file = ckpt / "trainer_state.pt"
        paths = [
            state_file,
            self.log.dir / "visits.jsonl",
            self.log.dir / "problems.json.gz",
            self.path / "config.yaml",
        ]
        return self._cache.get("tracker", paths, lambda: self._load_tracker(ckpt))

    def _load_tracker(self, ckpt: Path) -> TrackerView:
        state = load_trainer_state(ckpt / "trainer_state.pt")
        sd = state.get("tracker") or {}
        alpha = np.asarray(sd.get("alpha", []), dtype=np.float64)
        beta = np.asarray(sd.get("beta", []), dtype=np.float64)
        hashes = np.asarray(sd.get("id_hash", np.zeros(alpha.shape, np.uint64)), dtype=np.uint64)
        ids = self._names(hashes)
        v = alpha / np.maximum(alpha + beta, 1e-300)
        cfg = state.get("config") or self.config()
        prob, note = sampling_probs(cfg.get("sampler") or {}, v, alpha + beta)
        visits = self.visit_summary()
        rows = []
        for i in range(alpha.size):
            pid = ids[i]
            n, last_r, last_s = visits.get(pid, (0, None, None)) if pid is not None else (0, None, None)
            rows.append(
                ProblemRow(
                    i,
                    pid,
                    int(hashes[i]),
                    float(alpha[i]),
                    float(beta[i]),
                    float(v[i]),
                    None if prob is None else float(prob[i]),
                    n,
                    last_r,
                    last_s,
                )
            )
        return TrackerView(int(state.get("step", 0)), ckpt.name, rows, cfg.get("tracker") or {}, note)

    def _names(self, hashes: np.ndarray) -> list[str | None]:
        """Problem id of each tracker row, from the log's problem list and visited ids."""
        from spo_agents.algorithm.tracker import hash_ids

        known = list(dict.fromkeys((self.log.problem_ids() or []) + list(self.visit_summary())))
        if not known:
            return [None] * hashes.size
        lookup = dict(zip(hash_ids(known).tolist(), known))
        return [lookup.get(int(h)) for h in hashes]

    def problem_rows(self) -> list[ProblemRow]:
        """The tracker's rows, or rows from the visit log alone when there is no checkpoint."""
        view = self.tracker()
        if view is not None:
            return view.rows
        return [
            ProblemRow(-1, pid, None, visits=n, last_reward=r, last_step=s)
            for pid, (n, r, s) in self.visit_summary().items()
        ]


def load_trainer_state(path: Path) -> dict[str, Any]:
    """A checkpoint's `trainer_state.pt`, memory-mapped so the optimiser state is not read."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # a checkpoint being replaced, or a corrupt one: say which
        raise ConfigError(
            f"cannot read `{path}` ({e}); the viewer shows the tracker of the latest readable checkpoint"
        ) from e


def sampling_probs(sampler_cfg: dict[str, Any], v_hat: np.ndarray, n_eff: np.ndarray) -> tuple[np.ndarray | None, str]:
    """Probability that the next single draw picks each problem, from the run's sampler settings
    (`spo_agents.algorithm.sampler`); batches draw without replacement, so a batch of B includes a problem
    with probability up to about B times this."""
    from spo_agents.algorithm import sampler as sampling

    n = v_hat.size
    if n == 0:
        return None, ""
    kind = sampler_cfg.get("type", "prioritized")
    if kind == "uniform":
        return np.full(n, 1.0 / n), "uniform sampler"
    params = inspect.signature(sampling.PrioritizedSampler.__init__).parameters
    kwargs = {k: float(v) for k, v in sampler_cfg.items() if k in ("eps", "gamma") and k in params}
    s = sampling.PrioritizedSampler(n, **kwargs)
    takes_counts = "n_eff" in inspect.signature(s.weights).parameters
    w = s.weights(v_hat, n_eff) if takes_counts else s.weights(v_hat)
    total = float(w.sum())
    note = "w = sqrt(v (1 - v)) + eps" + (" over N_eff^gamma" if kwargs.get("gamma") else "") + f", eps = {s.eps:g}"
    return (w / total if total > 0 else None), note


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------
def open_target(path: str | Path) -> RunDir | EvalDir:
    """A run dir (`config.yaml` or `metrics.jsonl`) or an eval dir (`transcripts.jsonl`)."""
    from spo_agents.evaluation.runner import TRANSCRIPTS

    p = Path(path)
    if not p.is_dir():
        raise ConfigError(
            f"`{p}` is not a directory; pass a run dir (`runs/NAME`) or an eval dir (`spo-agent eval --out`)"
        )
    if (p / "config.yaml").is_file() or (p / "metrics.jsonl").is_file() or (p / "checkpoints").is_dir():
        return RunDir(p)
    if (p / TRANSCRIPTS).is_file() or (p / "results.json").is_file():
        return EvalDir(p)
    raise ConfigError(
        f"`{p}` is neither a run dir (no `config.yaml` / `metrics.jsonl`) nor an eval dir (no `{TRANSCRIPTS}`); "
        "pass the directory `spo-agent train` or `spo-agent eval --out` wrote"
    )
