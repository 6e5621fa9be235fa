"""Cost of the training-trajectory log (`spo_agents.trajectories`): time of `record` per step
and bytes on disk, with the embedded model's real tokenizer (SmolLM2-135M-Instruct).

Each step logs `--batch` math-python-like trajectories of about `--tokens` tokens after the prompt
(model text, a code block, an interpreter reply, more model text) with a 400-token prompt; the
window keeps `--keep` steps whole and a sample of older ones (`--older-sample`, `--older-max`).
Reported: median and max milliseconds of `record` per step, with and without per-token
log-probs, and the gzip'ed bytes per kept trajectory, and the size of `visits.jsonl` per visit.

    .venv/bin/python bench/trajectory_log.py                     # 64 x ~1,000 tokens, 40 steps
    .venv/bin/python bench/trajectory_log.py --batch 256 --tokens 4000 --steps 12
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from spo_agents.models import resolve_model
from spo_agents.trajectories import LOG_DIR, VISITS, TrajectoryLog
from spo_agents.types import ToolCall, Trajectory


def make_batch(tok, rng, batch: int, tokens: int, step: int) -> list[Trajectory]:
    words = ["the", "answer", "is", "we", "compute", "first", "then", "value", "sum", "product", "check"]
    out = []
    for i in range(batch):
        prose = " ".join(rng.choice(words, size=max(1, tokens // 3)))
        first = f"{prose}\n<code>print({i} * {step})</code>"
        reply = f"\n<interpreter>\n{i * step}\n</interpreter>\n"
        last = f"{prose} so \\boxed{{{i * step}}}."
        parts = [tok.encode(x, add_special_tokens=False) for x in (first, reply, last)]
        ids = parts[0] + parts[1] + parts[2]
        mask = [1] * len(parts[0]) + [0] * len(parts[1]) + [1] * len(parts[2])
        lp = [float(-abs(x)) if m else 0.0 for x, m in zip(rng.normal(0, 0.5, len(ids)), mask)]
        out.append(
            Trajectory(
                f"p/{rng.integers(10**6)}",
                "math-python-v0",
                tok.encode(" ".join(rng.choice(words, 400))),
                ids,
                mask,
                lp,
                float(rng.random() < 0.5),
                terminated=True,
                turn_starts=[0, len(parts[0]) + len(parts[1])],
                tool_calls=[ToolCall(code=f"print({i} * {step})", output=str(i * step), ok=True)],
                info={"answer": str(i * step), "correct": True},
            )
        )
    return out


def run(args: argparse.Namespace, logprobs: bool) -> dict[str, float]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    rng = np.random.default_rng(0)
    batches = [make_batch(tok, rng, args.batch, args.tokens, s) for s in range(1, args.steps + 1)]
    times = []
    with tempfile.TemporaryDirectory() as d:
        with TrajectoryLog(
            d,
            keep_last_steps=args.keep,
            older_sample=args.older_sample,
            older_max=args.older_max,
            save_logprobs=logprobs,
        ) as log:
            for step, batch in enumerate(batches, start=1):
                n = len(batch)
                t0 = time.perf_counter()
                log.record(step, batch, rng.normal(size=n), rng.random(n), np.full(n, 0.9), tok)
                times.append(time.perf_counter() - t0)
        root = Path(d) / LOG_DIR
        files = list(root.glob("step-*.jsonl.gz"))
        import gzip

        kept = sum(gzip.decompress(f.read_bytes()).count(b"\n") for f in files)
        step_bytes = sum(f.stat().st_size for f in files)
        visits = (root / VISITS).stat().st_size
    return {
        "median_ms": 1000 * statistics.median(times),
        "max_ms": 1000 * max(times),
        "kept": kept,
        "bytes_per_traj": step_bytes / max(kept, 1),
        "bytes_per_visit": visits / (args.steps * args.batch),
        "tokens": statistics.mean(len(t.token_ids) for b in batches for t in b),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tokens", type=int, default=1000, help="about this many tokens after the prompt")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--keep", type=int, default=20)
    p.add_argument("--older-sample", type=float, default=0.1)
    p.add_argument("--older-max", type=int, default=5000)
    args = p.parse_args()
    for logprobs in (False, True):
        r = run(args, logprobs)
        print(
            f"batch {args.batch} x {r['tokens']:.0f} tokens, {args.steps} steps, logprobs={logprobs}: record "
            f"{r['median_ms']:.0f} ms median / {r['max_ms']:.0f} ms max per step; {r['kept']} trajectories kept, "
            f"{r['bytes_per_traj'] / 1024:.1f} KiB each (gzip); visits {r['bytes_per_visit']:.0f} B per visit"
        )


if __name__ == "__main__":
    main()
