"""Our learner against TRL's `GRPOTrainer` on the same model, batch and lengths, on the CPU.

    .venv/bin/python bench/vs_trl.py                       # 3 interleaved repeats, profiles in the last
    .venv/bin/python bench/vs_trl.py --repeats 2 --no-profile --json out.json

What is compared. The embedded SmolLM2-135M-Instruct in fp32, one batch of 16 completions of
`--completion-len` tokens after a `--prompt-len`-token prompt, one optimiser step per batch on
both sides (ours: `Learner.update` with the default config's settings, one mini-batch, one
epoch; TRL: `per_device_train_batch_size=16`, `num_generations=16`, no gradient accumulation,
`num_iterations=1`, the `dapo` loss with the same clip range 0.2 / 0.28, `beta=0`, fp32
(`bf16=False`) and no gradient checkpointing, since TRL's defaults turn both on and ours are off).
Every completion's tokens are trained on, on both sides.

Both sides run with `--threads` torch threads (`OMP_NUM_THREADS`, default 1: on a shared,
oversubscribed machine OpenMP's spinning barriers make 2 threads slower than one). Each repeat
runs one process per side, ours first, then TRL (A B A B ...), so both see the same
drift in the shared machine's load. A process loads the model, builds its trainer, runs one
untimed warm-up step, then:

1. `--train-steps` training steps on a fixed batch of random token ids (TRL gets it through its
   `rollout_func` hook, so its generation is skipped): seconds per step, trained tokens per
   second of wall time and per second of the process's CPU time (`time.process_time`, less
   sensitive than wall time to what else runs on a shared machine), and the peak resident
   memory during these steps (`VmHWM` after resetting it through `/proc/self/clear_refs` at the
   first timed step), also as the rise over the resident set before them (model, gradients and
   AdamW state are already allocated by the warm-up);
2. `--e2e-steps` end-to-end steps with generation: 16 samples of a chat prompt at temperature
   1.0 (up to `--completion-len` new tokens; a sample may end earlier at the end-of-turn token),
   then the update. Ours generates with the `hf` backend (`HFPolicy`, static scheduler, the 16
   requests batched into one `generate` call) and builds the trajectories and advantages
   directly (no environment, collector or tracker); TRL generates with its own
   `transformers.generate` path (reached from the same `rollout_func`).

Ratios are ours / TRL within a repeat; the summary gives their median and range over repeats.
Unless `--no-profile`, the last repeat's processes then run one more training step under
`torch.profiler` (the operators with the most self CPU time) and one under cProfile (the Python
calls with the most cumulative time) and print both. Results and their reading are in bench/RESULTS.md
("Our learner against TRL's GRPOTrainer").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

BATCH = 16
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def reset_peak() -> int:
    """Reset the kernel's peak resident set of this process to its current one; return that (kB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS")


def peak_kb() -> int:
    return _status_kb("VmHWM")


# --------------------------------------------------------------------------------------------
# The shared inputs
# --------------------------------------------------------------------------------------------
def fixed_batch(prompt_len: int, completion_len: int, seed: int = 0) -> tuple[list[int], list[list[int]]]:
    """One prompt and 16 completions of random token ids (the same on both sides)."""
    import random

    rng = random.Random(seed)
    prompt = [rng.randrange(1000, 40000) for _ in range(prompt_len)]
    completions = [[rng.randrange(1000, 40000) for _ in range(completion_len)] for _ in range(BATCH)]
    return prompt, completions


def rewards(n: int) -> list[float]:
    return [float(i % 2) for i in range(n)]


def load_model() -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spo_agents.models import embedded_model_dir

    torch.manual_seed(0)
    d = embedded_model_dir()
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32), AutoTokenizer.from_pretrained(d)


# --------------------------------------------------------------------------------------------
# Ours
# --------------------------------------------------------------------------------------------
def run_ours(args: argparse.Namespace, profile: bool) -> dict[str, Any]:
    import asyncio

    from spo_agents.config import Config
    from spo_agents.rollout.policy.base import SamplingParams
    from spo_agents.rollout.policy.hf import HFPolicy
    from spo_agents.training.learner import Learner, LearnerSettings
    from spo_agents.types import Trajectory

    model, tok = load_model()
    settings = LearnerSettings.from_config(Config())
    learner = Learner(model, settings, pad_id=tok.pad_token_id if tok.pad_token_id is not None else 2)
    prompt, completions = fixed_batch(args.prompt_len, args.completion_len)

    def trajectories(prompt_ids: list[int], outs: list[list[int]], logprobs: list[list[float]] | None) -> list:
        return [
            Trajectory(f"p{i}", "bench", list(prompt_ids), c, [1] * len(c), lp, r)
            for i, (c, lp, r) in enumerate(zip(outs, logprobs or [[0.0] * len(c) for c in outs], rewards(len(outs))))
        ]

    fixed = trajectories(prompt, completions, None)
    for t, lp in zip(fixed, learner.score(fixed)):  # behaviour log-probs of the starting policy
        t.logprobs = lp
    adv = [r - 0.5 for r in rewards(BATCH)]

    def train_step() -> float:
        t0, c0 = time.perf_counter(), time.process_time()
        learner.update(fixed, adv)
        cpu.append(time.process_time() - c0)
        return time.perf_counter() - t0

    cpu: list[float] = []

    train_step()  # warm-up: allocates gradients and AdamW state
    out: dict[str, Any] = {"rss_before_kb": reset_peak()}
    cpu.clear()
    out["train_s"] = [train_step() for _ in range(args.train_steps)]
    out["train_cpu_s"] = list(cpu)
    out["peak_kb"] = peak_kb()
    out["train_tokens"] = BATCH * args.completion_len

    policy = HFPolicy(model, tok)
    prompt_ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
        prompt_ids = list(prompt_ids["input_ids"])
    params = SamplingParams(temperature=1.0, max_new_tokens=args.completion_len)

    async def generate() -> list:
        return await asyncio.gather(*[policy.generate(prompt_ids, params) for _ in range(BATCH)])

    out["gen_s"], out["update_s"], out["gen_tokens"] = [], [], []
    for _ in range(args.e2e_steps):
        t0 = time.perf_counter()
        gens = asyncio.run(generate())
        t1 = time.perf_counter()
        trajs = trajectories(prompt_ids, [g.token_ids for g in gens], [g.logprobs for g in gens])
        learner.update(trajs, adv)
        out["gen_s"].append(t1 - t0)
        out["update_s"].append(time.perf_counter() - t1)
        out["gen_tokens"].append(sum(len(g.token_ids) for g in gens))
    asyncio.run(policy.close())
    if profile:  # after the timed steps, so the figures above are not disturbed
        prof = Profiler()
        for _ in range(2):
            prof.start()
            train_step()
            prof.stop()
        out["profile"] = prof.text
    return out


# --------------------------------------------------------------------------------------------
# TRL
# --------------------------------------------------------------------------------------------
def run_trl(args: argparse.Namespace, profile: bool) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from spo_agents.config import Config

    model, tok = load_model()
    prompt, completions = fixed_batch(args.prompt_len, args.completion_len)
    n_train, n_e2e = args.train_steps, args.e2e_steps
    prof = Profiler()
    state: dict[str, Any] = {"step": 0, "gen_s": 0.0, "gen_tokens": 0}

    def rollout(prompts: list, trainer: Any) -> dict[str, Any]:
        if not n_train < state["step"] <= n_train + n_e2e:  # all but the e2e steps: the fixed batch
            return {
                "prompt_ids": [list(prompt) for _ in prompts],
                "completion_ids": [list(c) for c in completions[: len(prompts)]],
                "logprobs": [[0.0] * len(c) for c in completions[: len(prompts)]],
            }
        t0 = time.perf_counter()
        prompt_ids, images, fields = trainer._tokenize_prompts(prompts)
        ids, logprobs = trainer._generate_single_turn(prompt_ids, images, fields, len(prompts))
        state["gen_s"] = time.perf_counter() - t0
        state["gen_tokens"] = sum(len(c) for c in ids)
        return {"prompt_ids": prompt_ids, "completion_ids": ids, "logprobs": logprobs}

    def reward(completions: list, **kwargs: Any) -> list[float]:
        return rewards(len(completions))

    out: dict[str, Any] = {"train_s": [], "train_cpu_s": [], "gen_s": [], "update_s": [], "gen_tokens": []}
    marks: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, a: Any, s: Any, c: Any, **kw: Any) -> None:
            if state["step"] == 1:
                out["rss_before_kb"] = reset_peak()
            if state["step"] > n_train + n_e2e:
                prof.start()
            marks["t0"], marks["c0"] = time.perf_counter(), time.process_time()

        def on_step_end(self, a: Any, s: Any, c: Any, **kw: Any) -> None:
            dt, dc = time.perf_counter() - marks["t0"], time.process_time() - marks["c0"]
            step = state["step"]
            if step > n_train + n_e2e:
                prof.stop()
            if 1 <= step <= n_train:
                out["train_s"].append(dt)
                out["train_cpu_s"].append(dc)
                if step == n_train:
                    out["peak_kb"] = peak_kb()
            elif n_train < step <= n_train + n_e2e:
                out["gen_s"].append(state["gen_s"])
                out["update_s"].append(dt - state["gen_s"])
                out["gen_tokens"].append(state["gen_tokens"])
            state["step"] += 1

    cfg = Config()
    with tempfile.TemporaryDirectory() as tmp:
        targs = GRPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=1,
            num_generations=BATCH,
            max_completion_length=args.completion_len,
            max_steps=1 + n_train + n_e2e + (2 if profile else 0),
            learning_rate=cfg.optim.lr,
            weight_decay=cfg.optim.weight_decay,
            max_grad_norm=cfg.optim.grad_clip,
            lr_scheduler_type="constant",
            beta=0.0,
            epsilon=cfg.loss.eps_low,
            epsilon_high=cfg.loss.eps_high,
            loss_type="dapo",
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            bf16=False,
            gradient_checkpointing=False,
            use_cpu=True,
            report_to=[],
            logging_steps=10_000,
            save_strategy="no",
            seed=0,
            dataloader_num_workers=0,
        )
        data = Dataset.from_list([{"prompt": [{"role": "user", "content": PROMPT}]}] * (BATCH * 4))
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=targs,
            train_dataset=data,
            processing_class=tok,
            rollout_func=rollout,
            callbacks=[Clock()],
        )
        trainer.train()
    if profile:
        out["profile"] = prof.text
    out["train_tokens"] = BATCH * args.completion_len
    return out


# --------------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------------
class Profiler:
    """Profiles one step under torch.profiler (operators by self CPU time), then the next under
    cProfile (Python calls by cumulative time); `text` holds both listings."""

    def __init__(self) -> None:
        self.text = ""
        self.steps = 0
        self._torch: Any = None
        self._py: Any = None
        self._t0 = 0.0

    def start(self) -> None:
        import cProfile

        import torch

        self._t0 = time.perf_counter()
        if self.steps == 0:
            self._torch = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self._torch.start()
        else:
            self._py = cProfile.Profile()
            self._py.enable()

    def stop(self) -> None:
        import io
        import pstats

        wall = time.perf_counter() - self._t0
        if self.steps == 0:
            self._torch.stop()
            ops = self._torch.key_averages().table(
                sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=48
            )
            self.text += f"step under torch.profiler: {wall:.2f} s\n{ops}\n"
        else:
            self._py.disable()
            buf = io.StringIO()
            pstats.Stats(self._py, stream=buf).strip_dirs().sort_stats("cumulative").print_stats(30)
            self.text += f"step under cProfile: {wall:.2f} s\n{buf.getvalue()}"
        self.steps += 1


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------
def child(side: str, args: argparse.Namespace, profile: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", side, "--prompt-len", str(args.prompt_len)]
    cmd += ["--completion-len", str(args.completion_len), "--train-steps", str(args.train_steps)]
    cmd += ["--e2e-steps", str(args.e2e_steps)] + (["--profile-worker"] if profile else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit(f"the {side} worker failed (exit {proc.returncode}); its stderr is above")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_s"] = time.perf_counter() - t0
    return res


def summarise(runs: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    def rate(r: dict[str, Any]) -> float:
        return r["train_tokens"] * len(r["train_s"]) / sum(r["train_s"])

    def cpu_rate(r: dict[str, Any]) -> float:
        return r["train_tokens"] * len(r["train_cpu_s"]) / sum(r["train_cpu_s"])

    def e2e(r: dict[str, Any]) -> float:
        return (sum(r["gen_s"]) + sum(r["update_s"])) / len(r["gen_s"])

    rows = []
    for pair in runs:
        o, t = pair["ours"], pair["trl"]
        rows.append(
            {
                "ours_tok_s": rate(o),
                "trl_tok_s": rate(t),
                "tok_s_ratio": rate(o) / rate(t),
                "ours_tok_cpu_s": cpu_rate(o),
                "trl_tok_cpu_s": cpu_rate(t),
                "tok_cpu_s_ratio": cpu_rate(o) / cpu_rate(t),
                "ours_peak_gb": o["peak_kb"] / 1e6,
                "trl_peak_gb": t["peak_kb"] / 1e6,
                "peak_ratio": o["peak_kb"] / t["peak_kb"],
                "ours_rise_gb": (o["peak_kb"] - o["rss_before_kb"]) / 1e6,
                "trl_rise_gb": (t["peak_kb"] - t["rss_before_kb"]) / 1e6,
                "ours_e2e_s": e2e(o),
                "trl_e2e_s": e2e(t),
                "e2e_ratio": e2e(o) / e2e(t),
                "ours_gen_s": statistics.mean(o["gen_s"]),
                "trl_gen_s": statistics.mean(t["gen_s"]),
                "ours_gen_tokens": statistics.mean(o["gen_tokens"]),
                "trl_gen_tokens": statistics.mean(t["gen_tokens"]),
            }
        )
    keys = list(rows[0])
    return {
        "rows": rows,
        "median": {k: statistics.median(r[k] for r in rows) for k in keys},
        "min": {k: min(r[k] for r in rows) for k in keys},
        "max": {k: max(r[k] for r in rows) for k in keys},
    }


def table(s: dict[str, Any]) -> str:
    lines = [
        "| repeat | ours tok/s | TRL tok/s | ratio | ours tok/CPU-s | TRL tok/CPU-s | ratio"
        " | ours peak GB (rise) | TRL peak GB (rise) | ratio"
        " | ours e2e s (gen) | TRL e2e s (gen) | ratio | gen tokens ours / TRL |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(s["rows"]):
        lines.append(
            f"| {i + 1} | {r['ours_tok_s']:.1f} | {r['trl_tok_s']:.1f} | {r['tok_s_ratio']:.2f}"
            f" | {r['ours_tok_cpu_s']:.1f} | {r['trl_tok_cpu_s']:.1f} | {r['tok_cpu_s_ratio']:.2f}"
            f" | {r['ours_peak_gb']:.2f} ({r['ours_rise_gb']:.2f}) | {r['trl_peak_gb']:.2f} ({r['trl_rise_gb']:.2f})"
            f" | {r['peak_ratio']:.2f} | {r['ours_e2e_s']:.1f} ({r['ours_gen_s']:.1f})"
            f" | {r['trl_e2e_s']:.1f} ({r['trl_gen_s']:.1f}) | {r['e2e_ratio']:.2f}"
            f" | {r['ours_gen_tokens']:.0f} / {r['trl_gen_tokens']:.0f} |"
        )
    m, lo, hi = s["median"], s["min"], s["max"]
    names = (
        ("tok_s_ratio", "trained tokens/s (wall)"),
        ("tok_cpu_s_ratio", "trained tokens per CPU second"),
        ("peak_ratio", "peak RSS"),
        ("e2e_ratio", "end-to-end step s (wall)"),
    )
    for k, name in names:
        lines.append(f"ours / TRL, {name}: median {m[k]:.2f} (range {lo[k]:.2f}-{hi[k]:.2f})")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--completion-len", type=int, default=16)
    p.add_argument("--train-steps", type=int, default=2)
    p.add_argument("--e2e-steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of both sides (default 1)")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--json", help="also write the raw figures here")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--profile-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        fn = run_ours if args.worker == "ours" else run_trl
        print(json.dumps(fn(args, args.profile_worker)))
        return
    import torch
    import trl

    print(
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, CPython {platform.python_version()}, torch {torch.__version__}, "
        f"trl {trl.__version__}, {args.threads} thread(s) per side, load average {os.getloadavg()[0]:.1f}"
    )
    runs = []
    for i in range(args.repeats):
        last = i == args.repeats - 1 and not args.no_profile
        pair = {side: child(side, args, last) for side in ("ours", "trl")}
        runs.append(pair)
        print(f"repeat {i + 1}: ours {pair['ours']['process_s']:.0f} s, TRL {pair['trl']['process_s']:.0f} s")
    s = summarise(runs)
    print(table(s))
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    for side in ("ours", "trl") if not args.no_profile else ():
        print(f"\n### profile: {side}\n{runs[-1][side].pop('profile')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "summary": s}, f, indent=1)


if __name__ == "__main__":
    main()
