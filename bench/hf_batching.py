"""The `hf` backend's schedulers compared: static batches (`generate` per batch) vs continuous
batching (requests join and leave between decode steps), without and with prefix reuse, in the
same process, interleaved.

    .venv/bin/python bench/hf_batching.py                      # CPU default, 2 rounds
    .venv/bin/python bench/hf_batching.py --rounds 3 --episodes 24 --json out.json
    .venv/bin/python bench/hf_batching.py --model tiny-random --rounds 1 --episodes 8 --long-tokens 64   # smoke run

Part 1, episodes: the CPU default's rollout (`math-python`, `SmolLM2-135M` fp32, single-stream
`Collector` with 16 episodes in flight, temperature 1.0, 48 new tokens per turn, 160 tokens per
episode, the local sandbox). A round submits `episodes + 16` problems, takes the first
`episodes` that finish (as a training step does), then cancels the rest and waits until the
backend is idle before the next round starts (the pause that checks this also ends prefix
reuse across rounds, as a learner step does). Three variants: `static`, `continuous, no prefix
reuse` (`prefix_cache_tokens=0`) and `continuous` (the default). Every round runs each variant
on the same problems and seeds, a different variant first each round, so a change in the
machine's load hits all of them; a rate is the summed episodes over the summed seconds.

Part 2, latency (`static` and `continuous`): one long request (`--long-tokens`, end-of-turn
disabled so it runs its whole budget, as a runaway generation does) and, once it runs,
`--shorts` requests of 32 tokens (a turn after a tool call) sent `--short-gap` seconds apart.
Reported: each short request's latency and the long one's duration.

Prints markdown tables and the machine's load average before and after each part; results are
recorded in bench/RESULTS.md ("In-process generation: continuous batching").
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Any

#: the variants compared: name -> `HFPolicy` arguments
VARIANTS = {
    "static": {"scheduler": "static"},
    "continuous, no prefix reuse": {"scheduler": "continuous", "prefix_cache_tokens": 0},
    "continuous": {"scheduler": "continuous"},
}
LATENCY = ("static", "continuous")


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
        status = ["git", "status", "--porcelain", "--", "spo_agents"]
        dirty = subprocess.run(status, capture_output=True, text=True, check=False)
        return out.stdout.strip() + (" (spo_agents modified)" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


async def _drain(policy: Any) -> None:
    """Return once the backend has run nothing for 0.3 s (the static scheduler also runs the
    cancelled episodes' queued requests; the continuous one drops them at its next step)."""
    last = None
    while True:
        await policy.pause()
        policy.resume(policy.version)
        now = (policy.stats["batches"], policy.stats["steps"], policy.stats["rows"])
        if now == last:
            return
        last = now
        await asyncio.sleep(0.3)


async def episode_round(
    policy: Any, env_factory: Any, problems: list[str], n: int, seed: int, args: argparse.Namespace
) -> dict:
    from spo_agents.rollout.collector import Collector
    from spo_agents.rollout.policy.base import SamplingParams

    sampling = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    collector = Collector(
        env_factory, policy, max_in_flight=args.in_flight, sampling=sampling,
        max_episode_tokens=args.max_episode_tokens, seed=seed,
    )  # fmt: skip
    before = dict(policy.stats)
    collector.submit(problems)
    t0 = time.perf_counter()
    trajs = await collector.next_batch(n)
    wall = time.perf_counter() - t0
    await collector.close()
    await _drain(policy)
    done = [t.timings.get("total", 0.0) + t.timings.get("queued", 0.0) for t in trajs]
    return {
        "variant": policy.variant,
        "episodes": len(trajs),
        "errors": sum(t.error is not None for t in trajs),
        "wall_s": wall,
        "episodes_per_s": len(trajs) / wall,
        "generated_tokens": sum(sum(t.loss_mask) for t in trajs),
        "mean_turns": statistics.mean(len(t.turn_starts) for t in trajs),
        "reward": statistics.mean(t.reward for t in trajs),
        "episode_s_p50": statistics.median(done),
        "episode_s_max": max(done),
        "prefills_or_batches": policy.stats["batches"] - before["batches"],
        "decode_steps": policy.stats["steps"] - before["steps"],
        "prefill_tokens": policy.stats["prefill_tokens"] - before["prefill_tokens"],
        "prefill_s": policy.stats["prefill_s"] - before["prefill_s"],
        "decode_s": policy.stats["decode_s"] - before["decode_s"],
        "load": _load(),
    }


async def latency_run(
    policy: Any, prompt_long: list[int], prompts_short: list[list[int]], args: argparse.Namespace
) -> dict:
    from spo_agents.rollout.policy.base import SamplingParams

    saved = policy.eos_ids
    policy.eos_ids = [-1]  # no end-of-turn: every request runs its whole budget
    try:
        ends: dict[str, float] = {}
        t0 = time.perf_counter()
        params = SamplingParams(max_new_tokens=args.long_tokens, seed=1)
        long = asyncio.create_task(policy.generate(prompt_long, params))
        long.add_done_callback(lambda _: ends.setdefault("long", time.perf_counter() - t0))
        while not policy._busy.locked() and not long.done():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)

        async def short(i: int, ids: list[int]) -> tuple[float, float, bool]:
            await asyncio.sleep(i * args.short_gap)
            sent = time.perf_counter()
            g = await policy.generate(ids, SamplingParams(max_new_tokens=32, seed=10 + i))
            assert len(g.token_ids) == 32
            return sent - t0, time.perf_counter() - sent, long.done()

        shorts = await asyncio.gather(*(short(i, ids) for i, ids in enumerate(prompts_short)))
        g = await long
        await _drain(policy)
        return {
            "variant": policy.variant,
            "long_tokens": len(g.token_ids),
            "long_s": ends["long"],
            "short_sent_s": [s for s, _, _ in shorts],
            "short_latency_s": [lat for _, lat, _ in shorts],
            "short_after_long": sum(after for _, _, after in shorts),
            "load": _load(),
        }
    finally:
        policy.eos_ids = saved


async def main(args: argparse.Namespace) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spo_agents.config import Config
    from spo_agents.models import resolve_model
    from spo_agents.rollout.policy.hf import HFPolicy
    from spo_agents.training.components import make_env_factory

    transformers.logging.set_verbosity_error()  # part 2's disabled end-of-turn id is reported as a warning
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    policies = {name: HFPolicy(model=model, tokenizer=tok, **kw) for name, kw in VARIANTS.items()}
    for name, p in policies.items():
        p.variant = name
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "commit": _commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} "
        f"{platform.python_version()}, torch {torch.__version__}",
        "torch_threads": args.threads,
        "model": args.model,
        "load_start": _load(),
    }
    result: dict[str, Any] = {"info": info, "args": vars(args), "episodes": [], "latency": []}
    if args.episodes > 0:
        factory = make_env_factory(Config())
        probe = factory("train")
        ids = list(probe.problem_ids)
        probe.close()
        for r in range(args.rounds):
            problems = ids[r * (args.episodes + args.in_flight) : (r + 1) * (args.episodes + args.in_flight)]
            names = list(VARIANTS)
            order = names[r % len(names) :] + names[: r % len(names)]  # each variant goes first in turn
            for s in order:
                row = await episode_round(policies[s], lambda: factory("train"), problems, args.episodes, 100 + r, args)
                row["round"] = r
                result["episodes"].append(row)
                print(f"round {r} {s}: {row['episodes']} episodes, {row['wall_s']:.1f} s", flush=True)
    if args.shorts > 0:
        story = [{"role": "user", "content": "Write a very long story about a lighthouse."}]
        long_prompt = tok.apply_chat_template(story, add_generation_prompt=True)
        long_prompt = list(long_prompt["input_ids"] if hasattr(long_prompt, "keys") else long_prompt)
        turn = "<code>print({i} * 17)</code>\n<interpreter>\n{v}\n</interpreter>\n"
        shorts = [tok.encode(turn.format(i=i, v=i * 17), add_special_tokens=False) for i in range(args.shorts)]
        for s in LATENCY:
            row = await latency_run(policies[s], long_prompt, shorts, args)
            result["latency"].append(row)
            lat = [round(x, 1) for x in row["short_latency_s"]]
            print(f"latency {s}: long {row['long_s']:.1f} s, shorts {lat} s", flush=True)
    for p in policies.values():
        await p.close()
    info["load_end"] = _load()
    return result


def report(result: dict) -> str:
    info, args = result["info"], result["args"]
    out = [
        (
            f"date {info['date_utc']} UTC, commit {info['commit']}, {info['machine']}, "
            f"torch threads {info['torch_threads']}, model `{info['model']}`"
        ),
        f"load average (1/5/15 min) at the start {info['load_start']}, at the end {info.get('load_end', '?')}",
        "",
    ]
    rows = result["episodes"]
    if rows:
        out += [
            (
                f"Episodes ({args['in_flight']} in flight, first {args['episodes']} of "
                f"{args['episodes'] + args['in_flight']} per round):"
            ),
            "",
            (
                "| round | variant | episodes | wall s | episodes/s | gen. tokens | turns | episode s p50 / max "
                "| prefills (static: batches) | decode steps | prefill tokens / s, decode s | load 1/5/15 |"
            ),
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            split = f"{r['prefill_tokens']} / {r['prefill_s']:.1f}, {r['decode_s']:.1f}"
            split = "-" if r["variant"] == "static" else split
            out.append(
                f"| {r['round']} | {r['variant']} | {r['episodes']} | {r['wall_s']:.1f} | {r['episodes_per_s']:.3f} "
                f"| {r['generated_tokens']} | {r['mean_turns']:.2f} "
                f"| {r['episode_s_p50']:.1f} / {r['episode_s_max']:.1f} "
                f"| {r['prefills_or_batches']} | {r['decode_steps']} | {split} | {r['load']} |"
            )
        rate = {}
        for name in VARIANTS:
            mine = [r for r in rows if r["variant"] == name]
            rate[name] = sum(r["episodes"] for r in mine) / sum(r["wall_s"] for r in mine)
        out.append("")
        for name in VARIANTS:
            out.append(f"- {name}: {rate[name]:.3f} episodes/s, **{rate[name] / rate['static']:.2f}x** static")
        out.append("")
        result["rates"] = rate
    if result["latency"]:
        out += [
            (
                f"Short requests (32 tokens, {args['short_gap']} s apart) while a {args['long_tokens']}-token "
                "request runs:"
            ),
            "",
            "| variant | long request s | short latencies s | shorts returned after the long one | load 1/5/15 |",
            "|---|---|---|---|---|",
        ]
        for r in result["latency"]:
            lat = ", ".join(f"{x:.1f}" for x in r["short_latency_s"])
            after = f"{r['short_after_long']} of {len(r['short_latency_s'])}"
            out.append(f"| {r['variant']} | {r['long_s']:.1f} | {lat} | {after} | {r['load']} |")
    return "\n".join(out)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per variant (interleaved)")
    ap.add_argument("--episodes", type=int, default=16, help="episodes taken per round (0: skip part 1)")
    ap.add_argument("--in-flight", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-episode-tokens", type=int, default=160)
    ap.add_argument("--long-tokens", type=int, default=512)
    ap.add_argument("--shorts", type=int, default=4, help="short requests in part 2 (0: skip it)")
    ap.add_argument("--short-gap", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    return ap.parse_args(argv)


if __name__ == "__main__":
    a = parse()
    res = asyncio.run(main(a))
    text = report(res)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
