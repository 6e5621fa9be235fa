"""A small fake run dir for the viewer's tests and screenshots, built with the real tracker,
sampler, advantages, trajectory log and eval report on simulated math-python episodes
(no model, no sandbox): metrics rows, a checkpoint holding the tracker, saved training
trajectories, eval dirs, and a standalone eval dir."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import yaml

from spo_agents.algorithm.advantages import compute_advantages
from spo_agents.algorithm.sampler import PrioritizedSampler
from spo_agents.algorithm.tracker import ValueTracker
from spo_agents.evaluation.runner import RESULTS, SETTINGS, TRANSCRIPTS, compute_report
from spo_agents.trajectories import TrajectoryLog
from spo_agents.types import ToolCall, Trajectory, write_jsonl

INJECTION = '<script>window.__pwned = 1</script><img src="x" onerror="window.__pwned = 2">'


class CharTokenizer:
    """One token per character (token id = code point)."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)


TOK = CharTokenizer()
OPS = {"add": ("+", lambda a, b: a + b), "sub": ("-", lambda a, b: a - b), "mul": ("*", lambda a, b: a * b)}


def problems(n: int, seed: int, prefix: str = "arith") -> list[tuple[str, str, int, float]]:
    """(id, prompt, answer, difficulty) of `n` two-digit arithmetic problems."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        op = ["add", "sub", "mul"][int(rng.integers(3))]
        a, b = (int(x) for x in rng.integers(10, 100, size=2))
        sym, fn = OPS[op]
        pid = f"{prefix}/{op}/{a}{'x' if op == 'mul' else sym}{b}"
        out.append(
            (pid, f"What is {a} {sym} {b}?", fn(a, b), {"add": -1.0, "sub": -0.5, "mul": 0.8}[op] + rng.normal(0, 0.4))
        )
    return list({p[0]: p for p in out}.values())


def episode(pid: str, prompt: str, answer: int, correct: bool, rng, version: int, inject: bool = False) -> Trajectory:
    """A math-python episode: code, interpreter reply, boxed answer (wrong when not `correct`)."""
    expr = prompt.removeprefix("What is ").removesuffix("?")
    given = answer if correct else answer + int(rng.choice([-10, -1, 1, 2, 10]))
    first = f"I will compute it with Python.\n<code>print({expr})</code>"
    reply = f"\n<interpreter>\n{given}\n</interpreter>\n"
    last = f"The interpreter printed {given}, so the answer is \\boxed{{{given}}}."
    if inject:
        last = f"Here is some markup: {INJECTION} and the answer is \\boxed{{{given}}}."
    ids = TOK.encode(first) + TOK.encode(reply) + TOK.encode(last)
    mask = [1] * len(first) + [0] * len(reply) + [1] * len(last)
    lp = [float(-abs(rng.normal(0, 0.35 if correct else 1.2))) if m else 0.0 for m in mask]
    call = ToolCall(code=f"print({expr})", output=str(given), ok=True, duration_s=float(rng.uniform(0.02, 0.09)))
    info = {"answer": str(given), "correct": correct, "check": "number", "completion": TOK.decode(ids)}
    return Trajectory(
        pid,
        "math-python-v0",
        TOK.encode(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"),
        ids,
        mask,
        lp,
        float(correct),
        terminated=True,
        policy_version=version,
        turn_starts=[0, len(first) + len(reply)],
        tool_calls=[call],
        timings={"generate": 0.4, "sandbox": call.duration_s},
        info=info,
    )


def _write_eval(d: Path, test: list, skill: float, rng, k: int, version: int, inject: bool = False) -> dict[str, float]:
    samples = {}
    for pid, prompt, answer, diff in test:
        for i in range(k):
            ok = bool(rng.random() < 1 / (1 + math.exp(-(skill - diff))))
            t = episode(pid, prompt, answer, ok, rng, version, inject=inject and i == 0)
            t.group_id, t.sample_index = pid, i
            samples[(pid, i)] = t
    d.mkdir(parents=True, exist_ok=True)
    write_jsonl(d / TRANSCRIPTS, samples.values())
    rep = compute_report(samples, [p[0] for p in test], k, lambda a, b: a is not None and str(a) == str(b))
    (d / RESULTS).write_text(json.dumps(rep.to_dict(), indent=2), encoding="utf-8")
    (d / SETTINGS).write_text(
        json.dumps({"sampling": {"temperature": 0.6, "top_p": 0.95, "top_k": 20}, "seed": 0}), encoding="utf-8"
    )
    return {
        "eval/avg_at_k": rep.avg_at_k,
        "eval/pass_at_k": rep.pass_at_k[k],
        "eval/maj_at_k": rep.maj_at_k,
        "eval/k": k,
        "eval/problems": rep.num_problems,
    }


def make_run(
    root: Path,
    name: str = "math-python-v0-spo-demo",
    *,
    steps: int = 40,
    batch: int = 16,
    num_problems: int = 240,
    seed: int = 0,
    learn_rate: float = 0.12,
    eval_every: int = 5,
    k: int = 4,
    inject: bool = False,
    checkpoint: bool = True,
) -> Path:
    """A run dir under `root` (see the module docstring); returns its path."""
    rng = np.random.default_rng(seed)
    run = root / name
    run.mkdir(parents=True)
    config = {
        "model": {"name": "smollm2-135m"},
        "env": {"id": "math-python", "split": "train", "eval_split": "test", "kwargs": {}},
        "algorithm": {"name": "spo"},
        "sampler": {"type": "prioritized", "eps": 0.05},
        "tracker": {
            "rho_type": "kl-adaptive",
            "d_half": 0.06,
            "rho_min": 0.875,
            "rho_max": 0.96,
            "drift": "cumulative",
        },
        "train": {"steps": steps, "batch_size": batch, "seed": seed},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    train = problems(num_problems, seed)
    test = problems(12, seed + 1000, prefix="arith")
    ids = [p[0] for p in train]
    tracker = ValueTracker(ids)
    sampler = PrioritizedSampler(len(ids), seed=seed)
    log = TrajectoryLog(
        run, keep_last_steps=10, older_sample=0.25, older_max=200, seed=seed, save_logprobs=True, problem_ids=ids
    )
    rows = []
    skill = -1.0
    elapsed = 0.0
    with open(run / "metrics.jsonl", "w", encoding="utf-8") as metrics:

        def emit(row: dict) -> None:
            rows.append(row)
            metrics.write(json.dumps(row) + "\n")

        emit({"step": 0, **_write_eval(run / "eval" / "step-000000", test, skill, rng, k, 0)})
        for step in range(1, steps + 1):
            idx = sampler.sample(tracker.v_hat(), batch)
            v_before = tracker.v_hat(idx)
            trajs = []
            for n, j in enumerate(idx):
                pid, prompt, answer, diff = train[j]
                ok = bool(rng.random() < 1 / (1 + math.exp(-(skill - diff))))
                trajs.append(
                    episode(pid, prompt, answer, ok, rng, step - 1, inject=inject and step == steps and n == 0)
                )
            rewards = np.array([t.reward for t in trajs])
            adv = compute_advantages("spo", rewards, v_before)
            rho = tracker.rho(idx)
            tracker.update(idx, rewards)
            drift = float(abs(rng.normal(0.03, 0.01)))
            tracker.add_drift(drift)
            log.record(step, trajs, adv, v_before, rho, TOK)
            skill += learn_rate * (1.0 + rng.normal(0, 0.3))
            step_s = float(rng.uniform(50, 70))
            elapsed += step_s
            w = sampler.weights(tracker.v_hat())
            p = w / w.sum()
            ent = float(-(p * np.log(p)).sum())
            q = np.quantile(v_before, [0.1, 0.5, 0.9])
            row = {
                "step": step,
                "train/reward_mean": float(rewards.mean()),
                "train/accuracy": float(rewards.mean()),
                "train/reward_std": float(rewards.std()),
                "train/advantage_raw_std": float(np.std(rewards - v_before)),
                "train/advantage_mean": float(adv.mean()),
                "train/advantage_std": float(adv.std()),
                "train/batch_size": batch,
                "tracker/v_hat_mean": float(v_before.mean()),
                "tracker/v_hat_p10": float(q[0]),
                "tracker/v_hat_p50": float(q[1]),
                "tracker/v_hat_p90": float(q[2]),
                "tracker/v_hat_all_mean": float(tracker.v_hat().mean()),
                "tracker/rho_mean": float(rho.mean()),
                "tracker/rho_min": float(rho.min()),
                "tracker/rho_max": float(rho.max()),
                "tracker/drift": drift,
                "sampler/entropy": ent,
                "sampler/entropy_ratio": ent / math.log(len(ids)),
                "episode/tool_calls": 1.0 + float(rng.uniform(0, 0.3)),
                "episode/tool_failures": float(rng.uniform(0, 0.1)),
                "episode/sandbox_errors": 0,
                "episode/rollout_errors": 0,
                "episode/truncation_rate": float(rng.uniform(0, 0.08)),
                "episode/generated_tokens": float(rng.uniform(30, 45)),
                "episode/length_tokens": float(rng.uniform(45, 60)),
                "episode/staleness": 0.0,
                "learner/loss": float(rng.normal(0, 0.02)),
                "learner/clip_frac": float(rng.uniform(0, 0.05)),
                "learner/approx_kl": float(rng.uniform(0.001, 0.01)),
                "learner/grad_norm": float(rng.uniform(0.5, 2.0)),
                "learner/lr": 3e-5,
                "perf/tokens_per_s": float(rng.uniform(9, 12)),
                "time/step_s": step_s,
                "time/elapsed_s": elapsed,
                "time/share_generate": 0.55,
                "time/share_sandbox": 0.1,
                "time/share_learner": 0.3,
            }
            if step % eval_every == 0 or step == steps:
                row.update(
                    _write_eval(run / "eval" / f"step-{step:06d}", test, skill, rng, k, step, inject and step == steps)
                )
            emit(row)
    log.close()
    if checkpoint:
        _checkpoint(run, steps, tracker, sampler, config)
    return run


def _checkpoint(run: Path, step: int, tracker: ValueTracker, sampler: PrioritizedSampler, config: dict) -> None:
    import torch

    d = run / "checkpoints" / f"step-{step:06d}"
    d.mkdir(parents=True)
    torch.save(
        {"tracker": tracker.state_dict(), "sampler": sampler.state_dict(), "step": step, "config": config},
        d / "trainer_state.pt",
    )
    (d / "meta.json").write_text(json.dumps({"step": step}), encoding="utf-8")
    (run / "checkpoints" / "latest").write_text(d.name + "\n", encoding="utf-8")


def make_eval_dir(root: Path, name: str = "eval-demo", *, k: int = 8, seed: int = 3, inject: bool = False) -> Path:
    """A standalone eval dir (as `spo-agent eval --out` writes it)."""
    rng = np.random.default_rng(seed)
    d = root / name
    _write_eval(d, problems(16, seed + 2000), 1.0, rng, k, 0, inject=inject)
    settings = json.loads((d / SETTINGS).read_text())
    settings.update({"env": "math-python-v0", "split": "test", "backend": "hf", "model": "smollm2-135m"})
    (d / SETTINGS).write_text(json.dumps(settings), encoding="utf-8")
    return d
