"""The learner and the training loop on a CUDA GPU (marked `gpu`; `make test-gpu`).

- whole-model training on CUDA with the in-process `hf` policy;
- `train.sharding: fsdp` on one GPU (NCCL, one rank) with bf16 compute: layers run in bf16,
  weights and checkpoints stay fp32, and the update equals the whole-model fp32 update when the
  compute is fp32 too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import test_distributed as D
import training_fixtures as T

from spo_agents.training.loop import train
from spo_agents.training.metrics import read_metrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def cuda_components():
    comp = T.tiny_components()
    comp.model.to("cuda")
    return comp


def test_whole_model_training_on_cuda(tmp_path):
    cfg = T.tiny_config(tmp_path, model={"device": "cuda"}, train={"steps": 2, "mini_batches": 2})
    comp = cuda_components()
    before = T.weights(comp.model)
    res = train(cfg, run_dir=tmp_path / "run", components=comp)
    assert res.step == 2
    assert next(comp.model.parameters()).is_cuda
    assert float((T.weights(comp.model) - before).abs().max()) > 1e-4
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(r["tracker/drift"] > 0 for r in rows)


def test_sharded_training_on_one_gpu_computes_in_bf16_and_keeps_fp32_weights(tmp_path):
    from safetensors.torch import load_file

    cfg = T.tiny_config(
        tmp_path,
        model={"device": "cuda", "dtype": "bfloat16"},
        train={"steps": 2, "mini_batches": 2, "sharding": "fsdp"},
    )
    comp = T.tiny_components()  # on the CPU: sharding moves it
    seen: set = set()
    proj = comp.model.model.layers[0].self_attn.q_proj
    proj.register_forward_pre_hook(lambda m, a: seen.add((m.weight.dtype, m.weight.device.type)))
    before = T.weights(comp.model)
    res = train(cfg, run_dir=tmp_path / "run", components=comp)
    assert res.step == 2
    assert seen == {(torch.bfloat16, "cuda")}  # generation, scoring and the update all ran in bf16
    params = list(comp.model.parameters())
    assert {p.dtype for p in params} == {torch.float32} and all(p.is_cuda for p in params)
    after = torch.cat([p.detach().full_tensor().reshape(-1).cpu() for p in params])
    assert float((after - before).abs().max()) > 1e-4
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step-000002" / "model" / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}


def test_sharded_fp32_update_equals_whole_model_update_on_one_gpu(tmp_path):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from spo_agents.models import tiny_model_dir
    from spo_agents.sharding import full_model_state, shard_model
    from spo_agents.training.learner import Learner, LearnerSettings

    trajs, adv = D.make_batch()
    out = {}
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for sharded in (False, True):
            model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32)
            if sharded:
                shard_model(model, compute_dtype="float32", device_type="cuda")
            else:
                model.to("cuda")
            learner = Learner(model, LearnerSettings(lr=D.LR, mini_batches=2, micro_batch_tokens=24), pad_id=2)
            stats = learner.update(trajs, adv)
            out[sharded] = (D.flat(model, full_model_state(model)) if sharded else D.flat(model).cpu(), stats)
    finally:
        dist.destroy_process_group()
    (a, sa), (b, sb) = out[False], out[True]
    diff = (a - b).abs()
    assert float(diff.max()) <= 2 * D.LR
    assert float((diff > 1e-3 * D.LR).float().mean()) < 1e-3
    assert sa.loss == pytest.approx(sb.loss, rel=1e-4, abs=1e-6)
    assert sa.tokens == sb.tokens
