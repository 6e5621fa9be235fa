"""Environment costs: problem-set construction, `reset`, scoring a final answer, one tool call in the
local sandbox, one code-tests submission, and a whole `check-env` run, per built-in environment.

    .venv/bin/python bench/envs.py [--repeats 30] [--json]

Wall-clock and CPU (`time.process_time`, this process only: sandbox workers are not counted)
medians are reported with the 1-minute load average, since the build machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

FINAL = {
    "math-python-v0": "The answer is \\boxed{0}.",
    "countdown-python-v0": "The answer is \\boxed{1 + 2}.",
    "reasoning-gym-v0": "<answer>0</answer>",
    "code-tests-v0": "```python\ndef f(*args):\n    return 0\n```",
}
TOOL = "<code>print(sum(range(1000)))</code>"


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median wall and CPU milliseconds of `fn` over `repeats` calls."""
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3


def bench_env(env_id: str, repeats: int, tokenizer: Any) -> dict[str, Any]:
    from spo_agents import envs
    from spo_agents.envs.checker import check_env

    row: dict[str, Any] = {"env": env_id}
    w, c = time.perf_counter(), time.process_time()
    env = envs.make(env_id)
    row["construct_ms"] = ((time.perf_counter() - w) * 1e3, (time.process_time() - c) * 1e3)
    row["problems"] = len(env.problems)
    seeds = iter(range(10**6))
    row["reset_ms"] = timed(lambda: env.reset(seed=next(seeds)), repeats)

    def answer() -> None:
        env.reset(seed=next(seeds))
        env.step(FINAL[env_id])

    row["reset_and_answer_ms"] = timed(answer, repeats)
    if env.stop_sequences:
        env.reset(seed=0)
        env.step(TOOL)  # opens the episode's sandbox session

        def tool() -> None:
            if env.turn >= env.max_turns - 1:
                env.reset(seed=0)
            env.step(TOOL)

        row["tool_call_ms"] = timed(tool, repeats)
    env.close()
    w, c = time.perf_counter(), time.process_time()
    results = check_env(lambda: envs.make(env_id), tokenizer=tokenizer, episodes=2)
    row["check_env_s"] = (time.perf_counter() - w, time.process_time() - c)
    row["check_env_passed"] = all(r.passed for r in results)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from spo_agents import envs
    from spo_agents.envs.checker import load_tokenizer

    tokenizer = load_tokenizer()
    load = os.getloadavg()[0]
    rows = [bench_env(env_id, args.repeats, tokenizer) for env_id in envs.list_envs() if env_id in FINAL]
    load = (load, os.getloadavg()[0])
    if args.json:
        print(json.dumps({"load_average_1m": load, "rows": rows}, indent=2))
        return
    print(f"1-minute load average: {load[0]:.1f} at start, {load[1]:.1f} at end; values are wall / CPU")
    print(
        "| env | problems | construct ms | reset ms | reset + final answer ms | tool call ms "
        "| check-env s (2 episodes) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ok = "" if r["check_env_passed"] else " FAILED"
        cells = [_wall_cpu(r, k) for k in ("construct_ms", "reset_ms", "reset_and_answer_ms", "tool_call_ms")]
        print(f"| {r['env']} | {r['problems']} | {' | '.join(cells)} | {_wall_cpu(r, 'check_env_s')}{ok} |")


def _wall_cpu(row: dict, key: str) -> str:
    """The `wall / CPU` cell of `key`, `-` when the row has no such measurement."""
    return f"{row[key][0]:.1f} / {row[key][1]:.1f}" if key in row else "-"


if __name__ == "__main__":
    main()
