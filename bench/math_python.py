"""Benchmarks of `math-python-v0`: env construction, answer checking, and how the embedded model
does on the default problem tier with the env's prompt.

    .venv/bin/python bench/math_python.py                      # construction + checker
    .venv/bin/python bench/math_python.py --model -n 32        # + embedded SmolLM2-135M episodes

Prints a markdown table; results are recorded in bench/RESULTS.md (section `math-python`).
The model part drives episodes with plain `transformers.generate` (text level, stop at
`</code>`), not the training rollout code: it measures the env's prompt and parser, nothing else.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time


def bench_construction(n_envs: int) -> list[tuple[str, str]]:
    from spo_agents.envs import make
    from spo_agents.envs.problems import clear_cache

    clear_cache()
    t = time.perf_counter()
    first = make("math-python", split="train", sandbox=None)
    first_s = time.perf_counter() - t
    t = time.perf_counter()
    envs = [make("math-python", split="train", sandbox=None) for _ in range(n_envs)]
    many_s = time.perf_counter() - t
    shared = all(e.problems is first.problems for e in envs)
    return [
        ("first `make` (generates the arith train split)", f"{first_s * 1000:.0f} ms, {len(first.problems)} problems"),
        (f"{n_envs} more instances (shared set: {shared})", f"{many_s * 1000:.1f} ms total"),
    ]


def bench_checker(n: int) -> list[tuple[str, str]]:
    from spo_agents.envs.answers import AnswerChecker

    c = AnswerChecker(workers=1)
    try:
        t = time.perf_counter()
        c.check("x+1", "1+x")
        start_s = time.perf_counter() - t
        rows = [("symbolic worker start + first check", f"{start_s * 1000:.0f} ms")]
        for label, pred, ref in [
            ("exact number (no sympy)", "0.5", "1/2"),
            ("math-verify", "\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"),
        ]:
            times = []
            for _ in range(n):
                t = time.perf_counter()
                c.check(pred, ref)
                times.append(time.perf_counter() - t)
            rows.append((f"check: {label}, median of {n}", f"{statistics.median(times) * 1000:.2f} ms"))
        return rows
    finally:
        c.close()


def bench_model(
    n: int, temperature: float, max_new_tokens: int, seed: int, transcripts: str | None = None
) -> list[tuple[str, str]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spo_agents.envs import make
    from spo_agents.models import embedded_model_dir

    torch.manual_seed(seed)
    path = embedded_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    envs = [make("math-python", split="test", sandbox="local") for _ in range(n)]
    ids = envs[0].problem_ids
    prompts, partial, done = [], [""] * n, [False] * n
    results: list[dict] = [{} for _ in range(n)]
    first_turn_code = [False] * n
    for i, env in enumerate(envs):
        messages, _ = env.reset(options={"problem_id": ids[i % len(ids)]})
        prompts.append(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    gen_s = 0.0
    turn = 0
    while not all(done):
        active = [i for i in range(n) if not done[i]]
        batch = tok(
            [prompts[i] + partial[i] for i in active], return_tensors="pt", padding=True, add_special_tokens=False
        )
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **batch,
                do_sample=True,
                temperature=temperature,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                stop_strings=list(envs[0].stop_sequences),
                tokenizer=tok,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            )
        gen_s += time.perf_counter() - t
        for row, i in enumerate(active):
            text = tok.decode(out[row, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            stop = envs[i].stop_sequences[0]
            if stop in text:
                text = text[: text.index(stop) + len(stop)]
            if turn == 0:
                first_turn_code[i] = text.rstrip().endswith(stop) and "<code>" in text
            obs, reward, terminated, truncated, info = envs[i].step(text)
            partial[i] += text + obs
            if terminated or truncated:
                done[i] = True
                results[i] = {
                    "reward": reward,
                    "turns": info["turn"],
                    "tool_calls": info["tool_calls"],
                    "truncated": truncated,
                }
        turn += 1
    for env in envs:
        env.close()
    if transcripts:
        import json

        with open(transcripts, "w", encoding="utf-8") as f:
            for i in range(n):
                f.write(json.dumps({"problem_id": ids[i % len(ids)], "text": partial[i], **results[i]}) + "\n")
    rewards = [r["reward"] for r in results]
    return [
        (f"episodes (embedded SmolLM2-135M, test split, T={temperature})", str(n)),
        ("first turn is a complete `<code>` block", f"{sum(first_turn_code) / n:.0%}"),
        ("avg reward (correct final \\boxed{})", f"{statistics.mean(rewards):.2f}"),
        (
            "mean turns / tool calls",
            f"{statistics.mean(r['turns'] for r in results):.1f} / "
            f"{statistics.mean(r['tool_calls'] for r in results):.1f}",
        ),
        ("truncated by a budget", f"{sum(r['truncated'] for r in results) / n:.0%}"),
        ("generation time", f"{gen_s:.1f} s over {turn} batched turns"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--envs", type=int, default=64)
    ap.add_argument("--checks", type=int, default=50)
    ap.add_argument("--model", action="store_true", help="also run embedded-model episodes")
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--transcripts", help="write each episode's assistant text to this JSONL file")
    args = ap.parse_args()
    rows = bench_construction(args.envs) + bench_checker(args.checks)
    if args.model:
        rows += bench_model(args.n, args.temperature, args.max_new_tokens, args.seed, args.transcripts)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}\n")
    print("| measurement | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
