"""Offline value estimation: the tracker's starting point (docs/algorithm.md section 1, paper Sec. 4.1).

Before training, sample `n` episodes of every training problem with the initial policy and the
TRAINING sampling settings (temperature 1.0 by default; the authors used eval settings, which
biases v_hat0), and sum the rewards: the same reward the tracker folds in during training, so
with fractional rewards (partial credit, share of tests passed) s is that sum, not a count of
fully correct episodes (which would bias v_hat0 low). `spo-agent estimate-values` writes the
counts to a values file; `train` reads it through `tracker.init_values` and sets, per problem,
alpha0 = N0 (s + 0.5) / (n + 1), beta0 = N0 (n - s + 0.5) / (n + 1), N0 = 1 / (1 - rho_min),
where s is the sum of rewards in [0, 1] (the number of successes for 0/1 rewards) and n the
number of samples actually drawn (episodes with infrastructure errors are not samples). Problems
missing from the file keep alpha = beta = 0.5.

The values file is JSON::

    {"format": "spo-agents/values", "version": 1, "env": "math-python", "model": "...",
     "sampling": {...}, "problems": {"<problem id>": {"successes": 3, "samples": 8}, ...}}

Episodes run through `spo_agents.evaluation.runner.evaluate` (the same episodes as training).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from spo_agents.errors import ConfigError

log = logging.getLogger(__name__)

FORMAT = "spo-agents/values"
VERSION = 1


def _number(x: float) -> float | int:
    """An integral reward sum as an int (files stay readable), else the float."""
    return int(x) if float(x).is_integer() else float(x)


def write_values(path: str | Path, counts: dict[str, tuple[float, int]], meta: dict[str, Any]) -> None:
    """Write `problem id -> (reward sum, samples)` with its metadata (atomically)."""
    from spo_agents.files import write_text_atomic

    doc = {
        "format": FORMAT,
        "version": VERSION,
        **meta,
        "problems": {pid: {"successes": _number(s), "samples": int(n)} for pid, (s, n) in counts.items()},
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(p, json.dumps(doc, indent=1) + "\n")


def read_values(path: str | Path) -> dict[str, tuple[float, int]]:
    """`problem id -> (successes, samples)` from a values file (validated)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"values file `{p}` (`tracker.init_values`) does not exist; "
            f"write one with `spo-agent estimate-values --env ID -n 8 --out {p}`"
        )
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"values file `{p}` is not valid JSON ({e}); write it again with `spo-agent estimate-values`"
        ) from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("problems"), dict):
        raise ConfigError(
            f"`{p}` is not a values file (expected `format: {FORMAT}` and a `problems` mapping); "
            "write one with `spo-agent estimate-values`"
        )
    out = {}
    for pid, rec in doc["problems"].items():
        try:
            s, n = float(rec["successes"]), rec["samples"]
            if not isinstance(n, int) or isinstance(n, bool):
                raise TypeError("samples must be an integer")
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(
                f"values file `{p}`: problem `{pid}` needs a number `successes` (reward sum) "
                f"and an integer `samples`, got {rec!r}"
            ) from e
        if not 0 <= s <= n:
            raise ConfigError(
                f"values file `{p}`: problem `{pid}` has {s} successes out of {n} samples; "
                "need 0 <= successes <= samples"
            )
        out[str(pid)] = (s, n)
    return out


def init_tracker(tracker: Any, path: str | Path) -> int:
    """Initialise `tracker` from a values file; returns how many problems were initialised.
    Ids in the file that are not in the tracker's problem set are ignored (and logged)."""
    counts = read_values(path)
    known = set(tracker_ids(tracker, counts))
    unknown = len(counts) - len(known)
    if unknown:
        log.warning(
            "values file `%s`: %d of %d problem ids are not in this run's problem set; ignored",
            path,
            unknown,
            len(counts),
        )
    if not known:
        raise ConfigError(
            f"values file `{path}` shares no problem id with this run's training problems; "
            "was it written for another env or split?"
        )
    ids = sorted(known)
    idx = tracker.indices(ids)
    tracker.init_offline(idx, [counts[i][0] for i in ids], [counts[i][1] for i in ids])
    return len(ids)


def tracker_ids(tracker: Any, counts: dict[str, tuple[float, int]]) -> list[str]:
    """The ids of `counts` the tracker knows (one vectorised lookup)."""
    ids = list(counts)
    return [pid for pid, known in zip(ids, tracker.contains(ids)) if known] if ids else []


async def estimate(
    env_factory: Any,
    policy: Any,
    problem_ids: list[str],
    *,
    n: int,
    sampling: Any,
    concurrency: int,
    max_episode_tokens: int,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, tuple[float, int]]:
    """Run `n` episodes per problem; `problem id -> (reward sum, valid samples)`."""
    from spo_agents.evaluation.runner import evaluate

    report = await evaluate(
        env_factory,
        policy,
        problem_ids,
        k=n,
        sampling=sampling,
        concurrency=concurrency,
        progress=progress,
        max_episode_tokens=max_episode_tokens,
        seed=seed,
    )
    return {r.problem_id: (r.reward_sum, int(r.n)) for r in report.problems}


def estimate_values(
    cfg: Any, *, n: int, out: str | Path, limit: int | None = None, progress: bool = True
) -> dict[str, tuple[float, int]]:
    """`spo-agent estimate-values`: counts for the training split of `cfg.env` under the training
    sampling settings of `cfg.rollout`, written to `out`."""
    import asyncio

    from spo_agents.rollout.policy.base import SamplingParams
    from spo_agents.training.components import build_components

    if n < 1:
        raise ConfigError(f"`-n` must be >= 1 (samples per problem), got {n}")
    comp = build_components(cfg)
    env = comp.env_factory(cfg.env.split)
    ids = list(env.problem_ids)[: limit or None]
    env.close()
    r = cfg.rollout
    sampling = SamplingParams.of(r, r.max_new_tokens)

    async def main() -> dict[str, tuple[float, int]]:
        try:
            return await estimate(
                lambda: comp.env_factory(cfg.env.split),
                comp.policy,
                ids,
                n=n,
                sampling=sampling,
                concurrency=r.max_in_flight,
                max_episode_tokens=r.max_episode_tokens,
                seed=cfg.train.seed,
                progress=progress,
            )
        finally:
            for closer in comp.closers:
                res = closer()
                if asyncio.iscoroutine(res):
                    await res

    counts = asyncio.run(main())
    meta = {
        "env": cfg.env.id,
        "split": cfg.env.split,
        "model": cfg.model.name,
        "n": n,
        "sampling": asdict(sampling),
        "max_episode_tokens": r.max_episode_tokens,
        "env_kwargs": cfg.env.kwargs,
    }
    write_values(out, counts, meta)
    return counts
