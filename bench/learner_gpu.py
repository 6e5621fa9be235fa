"""One learner update on a GPU: whole-model fp32, whole-model bf16, and sharded (FSDP2, one
rank) with bf16 compute over fp32 master weights. Per setting: seconds, trained tokens per
second, peak GPU memory, and the share of weights that the update moved at the paper's lr.

The model is Qwen3-0.6B's architecture with random weights (no download), the batch is random
token ids shaped like an agent rollout batch (`--batch` trajectories of `--prompt` + `--response`
tokens, alternating advantages). The first update of each setting is a warm-up; the figures are
from the second. Needs CUDA:

    python bench/learner_gpu.py                 # all three settings, the defaults below
    python bench/learner_gpu.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
import torch.distributed as dist
from transformers import Qwen3Config, Qwen3ForCausalLM

from spo_agents.sharding import full_model_state, shard_model
from spo_agents.training.learner import Learner, LearnerSettings
from spo_agents.types import Trajectory

QWEN3_06B = {
    "vocab_size": 151936,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "tie_word_embeddings": True,
    "rope_theta": 1e6,
}


def batch(n: int, prompt: int, response: int, vocab: int, seed: int) -> tuple[list[Trajectory], list[float]]:
    rng = random.Random(seed)
    trajs = [
        Trajectory(
            f"p{i}",
            "bench",
            [rng.randrange(1000, vocab) for _ in range(prompt)],
            [rng.randrange(1000, vocab) for _ in range(response)],
            [1] * response,
            [-11.0] * response,
            float(i % 2),
        )
        for i in range(n)
    ]
    return trajs, [1.0 if i % 2 else -1.0 for i in range(n)]


def flat_weights(model: torch.nn.Module, sharded: bool) -> torch.Tensor:
    if sharded:
        state = full_model_state(model)
        return torch.cat([state[n].reshape(-1).float() for n, _ in model.named_parameters()])
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])


def run(setting: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    config = Qwen3Config(**{**QWEN3_06B, "num_hidden_layers": args.layers})
    sharded = setting == "fsdp-bf16"
    dtype = torch.bfloat16 if setting == "bf16" else torch.float32
    model = Qwen3ForCausalLM(config).to(dtype)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if sharded:
        shard_model(model, compute_dtype="bfloat16", device_type=args.device)
    else:
        model.to(args.device)
    settings = LearnerSettings(lr=args.lr, mini_batches=args.mini_batches, micro_batch_tokens=args.micro_batch_tokens)
    learner = Learner(model, settings, pad_id=0)
    trajs, adv = batch(args.batch, args.prompt, args.response, config.vocab_size, 0)
    learner.update(trajs, adv)  # warm-up
    before = flat_weights(model, sharded)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    trajs, adv = batch(args.batch, args.prompt, args.response, config.vocab_size, 1)
    t = time.perf_counter()
    stats = learner.update(trajs, adv)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    after = flat_weights(model, sharded)
    moved = float(((after - before).abs() > 0.1 * args.lr).float().mean())
    out = {
        "setting": setting,
        "seconds": round(seconds, 3),
        "tokens": stats.tokens,
        "tokens_per_s": round(stats.tokens / seconds),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "moved_share": round(moved, 4),
        "loss": stats.loss,
        "grad_norm": stats.grad_norm,
        "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
    }
    del learner, model
    if cuda:
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="fp32,bf16,fsdp-bf16")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--response", type=int, default=1024)
    ap.add_argument("--mini-batches", type=int, default=2)
    ap.add_argument("--micro-batch-tokens", type=int, default=8192)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--layers", type=int, default=QWEN3_06B["num_hidden_layers"])
    ap.add_argument("--device", default="cuda", help="`cpu` only for a quick check of the script")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/learner_gpu.py needs a CUDA GPU")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    rows = []
    for setting in args.settings.split(","):
        rows.append(run(setting, args))
        print(json.dumps(rows[-1]), flush=True)
    dist.destroy_process_group()
    meta = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "args": vars(args),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
