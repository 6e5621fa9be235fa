"""Data-parallel learner on CPU: a 2-process update (torchrun, gloo) equals the 1-process update.

Every rank receives the whole batch; the learner trains each rank on its share of every
mini-batch with the global token normaliser and sums gradients across ranks before clipping
(`spo_agents.learner`). This file is also the worker: `torchrun --nproc_per_node 2
tests/test_distributed.py OUT_DIR` writes rank 0's updated parameters and gradient to OUT_DIR.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

LR = 1e-4


def make_batch():
    import torch

    from spo_agents.types import Trajectory

    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(6):
        p = torch.randint(10, 5000, (3 + i % 3,), generator=g).tolist()
        r = torch.randint(10, 5000, (4 + i,), generator=g).tolist()
        lp = (-torch.rand(len(r), generator=g) * 3 - 8).tolist()  # behaviour log-probs near a random model's
        mask = [1] * len(r)
        mask[1] = 0
        lp[1] = 0.0
        out.append(Trajectory(problem_id=f"p{i}", env_id="fake", prompt_ids=p, token_ids=r, loss_mask=mask, logprobs=lp, reward=float(i % 2)))
    adv = [1.0, -1.0, 0.5, -0.5, 1.5, -1.5]
    return out, adv


def run_update(out_dir: Path, mini_batches: int) -> None:
    """Build the tiny model, update it once on the batch, save params and summed gradients."""
    import torch
    from transformers import AutoModelForCausalLM

    from spo_agents.learner import Learner, LearnerSettings
    from spo_agents.models import tiny_model_dir

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32)
    learner = Learner(model, LearnerSettings(lr=LR, mini_batches=mini_batches, micro_batch_tokens=24), pad_id=2)
    grads: list[torch.Tensor] = []

    def record(optimizer, args, kwargs):
        grads.append(torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()]))

    learner.optimizer.register_step_pre_hook(record)
    trajs, adv = make_batch()
    stats = learner.update(trajs, adv)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]), "grads": grads, "loss": stats.loss, "drift": stats.drift, "tokens": stats.tokens},
            out_dir / "update.pt",
        )


@pytest.mark.slow
@pytest.mark.parametrize("mini_batches", [1, 2])
def test_two_process_update_equals_one_process_update(tmp_path, mini_batches):
    import torch

    single = tmp_path / "single"
    run_update(single, mini_batches)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPO_MINI_BATCHES": str(mini_batches)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0", "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0", __file__, str(tmp_path / "dist")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(single / "update.pt")
    b = torch.load(tmp_path / "dist" / "update.pt")
    assert len(a["grads"]) == len(b["grads"]) == mini_batches
    for ga, gb in zip(a["grads"], b["grads"]):
        scale = float(ga.abs().max())
        assert scale > 0
        assert torch.allclose(ga, gb, atol=1e-5 * scale, rtol=1e-4)
    # Adam divides by sqrt(v): elements whose gradient is float noise can move by up to lr.
    diff = (a["params"] - b["params"]).abs()
    assert float(diff.max()) <= 2 * LR
    assert float((diff > 1e-3 * LR).float().mean()) < 1e-3
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    assert a["drift"] == pytest.approx(b["drift"], rel=1e-3)
    assert a["tokens"] == b["tokens"]


def run_loop(out_dir: Path) -> None:
    """The whole training loop under torchrun: rank 0 collects and broadcasts, all ranks update."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    import test_training as T

    from spo_agents.training import train

    cfg = T.tiny_config(out_dir, train={"steps": 2, "batch_size": 8, "checkpoint_every": 1, "mini_batches": 2})
    comp = T.tiny_components()
    res = train(cfg, run_dir=out_dir / "run", components=comp)
    rank = torch.distributed.get_rank()
    torch.save({"weights": T.weights(comp.model), "step": res.step}, out_dir / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_process_training_loop_keeps_ranks_in_sync(tmp_path):
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPO_DIST_MODE": "loop"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0", __file__, str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["step"] == r1["step"] == 2
    assert torch.equal(r0["weights"], r1["weights"])
    from spo_agents.metrics import read_metrics

    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-000002"


if __name__ == "__main__":
    import torch

    if os.environ.get("SPO_DIST_MODE") == "loop":
        run_loop(Path(sys.argv[1]))  # `train` initialises the process group itself
    else:
        torch.distributed.init_process_group("gloo")
        run_update(Path(sys.argv[1]), int(os.environ.get("SPO_MINI_BATCHES", "1")))
    torch.distributed.destroy_process_group()
