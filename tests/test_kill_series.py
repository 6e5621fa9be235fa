"""SIGKILL a training run in each phase of a step, resume it with `spo-agent train --resume`.

The run is the CPU default config shrunk (`math-python`, the local sandbox, the in-process `hf`
backend) with the tiny random model, a batch of 4, 4 steps, evaluation off and a checkpoint
after every step. A driver runs `spo-agent train` with one function wrapped so that the process
SIGKILLs itself at a chosen point of a chosen step (the wrapping is in this test; the trainer has
no hook for it):

- `generate@K`: the second generation request of step K (one episode's turn is done, the rest
  are in flight);
- `update@K`: right after the optimiser step of step K (the weights in memory have moved,
  nothing of step K is written);
- `checkpoint@K`: inside the checkpoint of step K, after the weights, trainer state and
  checksums are written to the temporary directory, before it is renamed into place (the
  metrics row of step K is already written);
- `latest@K`: after the checkpoint of step K is renamed into place, before `latest` is updated.

After each kill: every complete checkpoint passes its checksums, the newest one is at most one
step behind the last logged step, and its value tracker is the one the metrics rows describe
(`C` is the sum of the logged drifts, the mean of `alpha / (alpha + beta)` is the logged
`tracker/v_hat_all_mean`). After the resume the metrics hold each step exactly once. A run
killed in all four phases (resumed after each) ends with the same weights, tracker, sampler and
optimiser state as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spo_agents.training.checkpoint import CheckpointManager, verify_checksums
from spo_agents.training.metrics import read_metrics

pytestmark = pytest.mark.slow

STEPS = 4
ARGS = [
    "--env",
    "math-python",
    "--model",
    "tiny-random",
    "--steps",
    str(STEPS),
    "train.batch_size=4",
    "rollout.max_in_flight=4",
    "rollout.max_new_tokens=12",
    "rollout.max_episode_tokens=40",
    "eval.every=0",
    "train.checkpoint_every=1",
    "train.keep_checkpoints=10",
    "train.seed=0",
    "logging.progress=false",
]

DRIVER = r"""
import os, signal, sys

phase, at = os.environ["KILL_AT"].split("@")
at = int(at)

import torch
from spo_agents.rollout.policy import hf
from spo_agents.training import checkpoint, loop

now = {"step": 0, "calls": 0}


def die():
    sys.stderr.write(f"SIGKILL at {phase}@{at}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


train_step = loop.Trainer.train_step


async def counted_step(self):
    now["step"] = self.step + 1
    return await train_step(self)


loop.Trainer.train_step = counted_step
if phase == "generate":
    generate = hf.HFPolicy.generate

    async def killing_generate(self, prompt_ids, params):
        if now["step"] == at:
            now["calls"] += 1
            if now["calls"] == 2:
                die()
        return await generate(self, prompt_ids, params)

    hf.HFPolicy.generate = killing_generate
elif phase == "update":
    step = torch.optim.AdamW.step

    def killing_step(self, *a, **k):
        out = step(self, *a, **k)
        if now["step"] == at:
            die()
        return out

    torch.optim.AdamW.step = killing_step
elif phase == "checkpoint":
    write_checksums = checkpoint.write_checksums

    def killing_checksums(root):
        write_checksums(root)
        if now["step"] == at:
            die()

    checkpoint.write_checksums = killing_checksums
elif phase == "latest":
    write_text_atomic = checkpoint.write_text_atomic

    def killing_latest(path, data, *a, **k):
        if now["step"] == at:
            die()
        return write_text_atomic(path, data, *a, **k)

    checkpoint.write_text_atomic = killing_latest
else:
    raise SystemExit(f"unknown phase {phase}")

from spo_agents.cli import main

sys.exit(main(sys.argv[1:]))
"""


def spo_train(args: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if kill_at:
        cmd = [sys.executable, "-c", DRIVER, "train", *args]
        env["KILL_AT"] = kill_at
    else:
        cmd = [sys.executable, "-m", "spo_agents", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def start(out: Path, name: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    values = f"tracker.init_values={out / 'values.json'}"
    return spo_train([*ARGS, values, f"train.output_dir={out}", f"train.run_name={name}"], kill_at)


def write_values(out: Path) -> None:
    """Prior values of 0, 1/4, ..., 1 spread over the training problems. The tiny random model
    earns no reward, so without them every advantage is zero and the updates would move the
    weights by weight decay only; with them the advantages `0 - v_hat` differ within a batch."""
    from spo_agents.envs import make
    from spo_agents.training.values import write_values

    ids = make("math-python", split="train").problem_ids
    write_values(out / "values.json", {pid: (float(i % 5), 4) for i, pid in enumerate(ids)}, {})


def resume(run: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    return spo_train(["--resume", str(run)], kill_at)


def steps_logged(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run / "metrics.jsonl") if "train/reward_mean" in r]


def check_after_kill(run: Path, p: subprocess.CompletedProcess, kill_at: str) -> int:
    """The state a kill left: intact checkpoints, at most one step lost, the tracker the rows
    describe. Returns the step a resume continues from."""
    assert p.returncode == -signal.SIGKILL, f"exit {p.returncode}, expected SIGKILL:\n{p.stderr[-3000:]}"
    assert f"SIGKILL at {kill_at}" in p.stderr
    mgr = CheckpointManager(run, keep=10)
    for s in mgr.steps():
        verify_checksums(mgr.path_for(s))  # no corrupt checkpoint
    saved = mgr.load()
    logged = steps_logged(run)
    phase, k = kill_at.split("@")
    completed = int(k) if phase in ("checkpoint", "latest") else int(k) - 1
    assert logged == list(range(1, completed + 1))
    assert saved.step == (int(k) if phase == "latest" else int(k) - 1)
    assert completed - saved.step <= 1  # at most one step lost
    rows = {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if "train/reward_mean" in r}
    tracker = saved.state["tracker"]
    assert tracker["C"] == sum(rows[s]["tracker/drift"] for s in range(1, saved.step + 1))
    alpha, beta = tracker["alpha"].astype(np.float64), tracker["beta"].astype(np.float64)
    assert float((alpha / (alpha + beta)).mean()) == rows[saved.step]["tracker/v_hat_all_mean"]
    return saved.step


def final_state(run: Path) -> dict:
    ckpt = CheckpointManager(run, keep=10).load()
    from safetensors.torch import load_file

    weights = {}
    for f in sorted(ckpt.model_dir.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    return {"step": ckpt.step, "weights": weights, **ckpt.state}


def differences(a: dict, b: dict) -> list[str]:
    """What differs between two final states, by name (empty when bit-identical)."""
    out = []
    for name, wa in a["weights"].items():
        if not torch.equal(wa, b["weights"][name]):
            out.append(f"weight {name}: max |diff| {float((wa - b['weights'][name]).abs().max()):.3g}")
    for k, va in a["tracker"].items():
        va, vb = np.asarray(va), np.asarray(b["tracker"][k])
        if not np.array_equal(va, vb, equal_nan=va.dtype.kind == "f"):  # c_last is NaN where never visited
            out.append(f"tracker {k}: {va!r} != {b['tracker'][k]!r}")
    if json.dumps(a["sampler"], sort_keys=True, default=str) != json.dumps(b["sampler"], sort_keys=True, default=str):
        out.append("sampler state")
    oa, ob = a["learner"]["optimizer"]["state"], b["learner"]["optimizer"]["state"]
    for i, sa in oa.items():
        for key, ta in sa.items():
            if not torch.equal(torch.as_tensor(ta), torch.as_tensor(ob[i][key])):
                out.append(f"optimizer state {i}/{key}")
    return out


@pytest.mark.timeout(1800)  # seven training processes, each importing torch and transformers
def test_a_run_killed_in_every_phase_resumes_to_the_uninterrupted_result(tmp_path):
    write_values(tmp_path)
    ref = start(tmp_path, "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    rows = [r for r in read_metrics(tmp_path / "ref" / "metrics.jsonl") if "learner/grad_norm" in r]
    assert all(r["learner/grad_norm"] > 0 for r in rows), "the updates must move the weights for the comparison"
    run = tmp_path / "killed"
    p = start(tmp_path, "killed", kill_at="generate@2")
    resumed_at = [check_after_kill(run, p, "generate@2")]
    for kill_at in ("update@2", "checkpoint@3", "latest@4"):
        p = resume(run, kill_at=kill_at)
        resumed_at.append(check_after_kill(run, p, kill_at))
    assert resumed_at == [1, 1, 2, 4]
    # the kill at `latest@4` came after the last checkpoint was in place: the resume has nothing to do
    p = resume(run)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"finished at step {STEPS}" in p.stdout
    assert steps_logged(run) == list(range(1, STEPS + 1))  # no duplicated rows
    assert steps_logged(tmp_path / "ref") == list(range(1, STEPS + 1))
    assert differences(final_state(tmp_path / "ref"), final_state(run)) == []
