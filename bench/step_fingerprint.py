"""A fingerprint of the first training steps, to check that a refactor of the loop changed nothing.

Runs `train.steps=N` of a config with a seed, held-out evaluation off and the progress bar off,
and writes a JSON file with, per step, the token ids of every trajectory the learner received
(sorted by problem id and sample index, so the order episodes finished in does not matter) and
the step's metrics row without the timing keys (`time/*`, `perf/*`, `episode/generate_s`,
`episode/sandbox_s`). Run it on the code before
and after a change, then compare the two files:

    python bench/step_fingerprint.py configs/cpu-default.yaml --seed 0 --steps 1 \
        --out /tmp/fp-before.json train.batch_size=4
    python bench/step_fingerprint.py --compare /tmp/fp-before.json /tmp/fp-after.json

`--compare A B` exits 1 unless the trajectories are equal and every metric agrees: the learner's
`learner/loss` and `learner/grad_norm` within `--atol` (1e-5 by default), every other number
within 1e-9, every other value equal. The run directory is a temporary one, removed at the end.
Trajectories come from the in-process (`hf`) backend, deterministic for a seed on CPU.

When generation itself changed between the two versions (another scheduler, other random
draws), the learner can still be compared on the same input: `--save-batches FILE` on the
first version keeps every trajectory the learner received, and `--replay FILE` on the second
hands the learner those trajectories in place of the ones it generated (generation still runs,
so the sampler and the collector do their usual work). The problems the sampler submitted are
recorded either way (`submitted`), so `--compare` also shows whether both versions drew the
same problems. The script runs on the package layouts before and after the `spo_agents` layer
folders (it imports from either), so a commit from before that change can be fingerprinted too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

LOOSE = ("learner/loss", "learner/grad_norm")
SKIPPED = ("time/", "perf/", "episode/generate_s", "episode/sandbox_s")


def _package() -> tuple[Any, Any, Any, Any]:
    """`load_config`, `Collector`, `train`, `read_metrics` from this checkout's layout."""
    from spo_agents.config import load_config

    try:
        from spo_agents.rollout.collector import Collector
        from spo_agents.training.loop import train
        from spo_agents.training.metrics import read_metrics
    except ImportError:  # the flat layout, before the layer folders
        from spo_agents.metrics import read_metrics  # type: ignore[no-redef]
        from spo_agents.rollout import Collector  # type: ignore[no-redef]
        from spo_agents.training import train  # type: ignore[no-redef]
    return load_config, Collector, train, read_metrics


def fingerprint(
    config: str,
    seed: int,
    steps: int,
    overrides: list[str],
    save_batches: str | None = None,
    replay: str | None = None,
) -> dict[str, Any]:
    """Train `steps` steps of `config` and record what each step trained on and logged."""
    from spo_agents.types import Trajectory

    load_config, Collector, train, read_metrics = _package()
    batches: list[list[dict[str, Any]]] = []
    saved: list[list[dict[str, Any]]] = []
    submitted: list[list[str]] = []
    recorded = json.loads(Path(replay).read_text()) if replay else None
    original, original_submit = Collector.next_batch, Collector.submit

    def submitting(self: Any, problem_ids: Any) -> None:
        ids = list(problem_ids)
        submitted.append(ids)
        original_submit(self, ids)

    async def recording(self: Any, n: int) -> Any:
        batch = await original(self, n)
        if recorded is not None:
            step = len(batches)
            if step >= len(recorded):
                raise SystemExit(f"--replay {replay} holds {len(recorded)} step(s); this run asked for more")
            batch = [Trajectory.from_dict(d) for d in recorded[step]]
        saved.append([t.to_dict() for t in batch])
        units = [
            {"problem_id": t.problem_id, "token_ids": list(t.token_ids), "reward": t.reward}
            for t in batch
            if t.error is None
        ]
        batches.append(sorted(units, key=lambda u: (u["problem_id"], u["token_ids"])))
        return batch

    Collector.next_batch = recording  # type: ignore[method-assign]
    Collector.submit = submitting  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory(prefix="spo-fingerprint-") as out:
        cfg = load_config(
            config,
            [
                *overrides,
                f"train.seed={seed}",
                f"train.steps={steps}",
                "eval.every=0",
                "logging.progress=false",
                "rollout.backend=hf",
                f"train.output_dir={out}",
                "train.run_name=run",
            ],
        )
        train(cfg)
        rows = read_metrics(Path(out) / "run" / "metrics.jsonl")
    Collector.next_batch, Collector.submit = original, original_submit  # type: ignore[method-assign]
    if save_batches:
        Path(save_batches).write_text(json.dumps(saved))
    metrics = [{k: v for k, v in r.items() if not k.startswith(SKIPPED)} for r in rows]
    return {
        "config": config,
        "seed": seed,
        "steps": steps,
        "overrides": overrides,
        "replayed": replay is not None,
        "submitted": submitted,
        "batches": batches,
        "metrics": metrics,
    }


def compare(a: dict[str, Any], b: dict[str, Any], atol: float, ignore: tuple[str, ...] = ()) -> list[str]:
    """What differs between two fingerprints (empty when they agree); metric keys starting with
    one of `ignore` are left out (a metric one version adds on purpose)."""
    problems = []
    if a.get("submitted") != b.get("submitted"):
        problems.append("the sampler submitted other problems")
    if a["batches"] != b["batches"]:
        for i, (x, y) in enumerate(zip(a["batches"], b["batches"])):
            if x != y:
                problems.append(f"step {i + 1}: the trajectories differ")
        if len(a["batches"]) != len(b["batches"]):
            problems.append(f"{len(a['batches'])} vs {len(b['batches'])} batches")
    for ra, rb in zip(a["metrics"], b["metrics"]):
        for k in sorted(k for k in set(ra) | set(rb) if not k.startswith(SKIPPED + ignore)):
            va, vb = ra.get(k), rb.get(k)
            if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
                tol = atol if k in LOOSE else 1e-9
                if not math.isclose(va, vb, rel_tol=0.0, abs_tol=tol):
                    problems.append(f"step {ra.get('step')}: {k} {va!r} vs {vb!r} (tolerance {tol})")
            elif va != vb:
                problems.append(f"step {ra.get('step')}: {k} {va!r} vs {vb!r}")
    if len(a["metrics"]) != len(b["metrics"]):
        problems.append(f"{len(a['metrics'])} vs {len(b['metrics'])} metrics rows")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", help="a config YAML (e.g. configs/cpu-default.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--out", help="write the fingerprint here (JSON); printed otherwise")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two fingerprint files")
    p.add_argument("--atol", type=float, default=1e-5, help="tolerance of learner/loss and learner/grad_norm")
    p.add_argument("--ignore", action="append", default=[], metavar="PREFIX", help="metric keys --compare skips")
    p.add_argument("--save-batches", metavar="FILE", help="keep every trajectory the learner received (JSON)")
    p.add_argument("--replay", metavar="FILE", help="give the learner the trajectories of a --save-batches file")
    args = p.parse_intermixed_args(argv)
    if args.compare:
        a, b = (json.loads(Path(f).read_text()) for f in args.compare)
        problems = compare(a, b, args.atol, tuple(args.ignore))
        for line in problems:
            print(line)
        print("same" if not problems else f"{len(problems)} difference(s)")
        return 1 if problems else 0
    if not args.config:
        p.error("give a config, or --compare A B")
    fp = fingerprint(args.config, args.seed, args.steps, args.overrides, args.save_batches, args.replay)
    text = json.dumps(fp, indent=1)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}: {len(fp['batches'])} batch(es), {len(fp['metrics'])} metrics row(s)")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
