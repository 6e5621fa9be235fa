"""The training loop on the tiny model and `FirstTokenEnv` (tests/training_fixtures.py): a step's
order (v_hat before the update, the tracker after), metrics, checkpoints and resume, a SIGKILL,
the ablations and GRPO on the same loop, drift, and steps that lose episodes to the infrastructure.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from training_fixtures import FirstTokenEnv, tiny_components, tiny_config, weights

from spo_agents.config import Config, from_dict, load_config, to_dict
from spo_agents.training.loop import Trainer, train
from spo_agents.training.metrics import read_metrics, undocumented

HERE = Path(__file__).parent


def test_two_steps_change_weights_write_documented_metrics_and_checkpoints(tmp_path):
    cfg = tiny_config(tmp_path, eval={"every": 2, "limit": 8})
    comp = tiny_components()
    before = weights(comp.model)
    res = train(cfg, run_dir=tmp_path / "run", components=comp)
    assert res.step == 2
    assert not torch.equal(before, weights(comp.model))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]  # step 0 is the held-out evaluation before training
    keys = set().union(*rows)
    assert undocumented(keys) == []
    assert "eval/avg_at_k" in rows[0] and "eval/avg_at_k" in rows[2]
    for r in rows[1:]:
        assert r["train/batch_size"] == 8
        assert 0.0 <= r["train/reward_mean"] <= 1.0
        assert r["tracker/drift"] > 0
    ck = tmp_path / "run" / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step-000002"
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("step-")) == ["step-000001", "step-000002"]
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    # what the learner trained on is kept for the viewer, with the tracker's per-visit log
    from spo_agents.trajectories import TrajectoryLogReader

    log = TrajectoryLogReader(tmp_path / "run")
    visits = log.visits()
    assert [v.step for v in visits] == [1] * 8 + [2] * 8
    assert sorted(log.steps()) == [1, 2] and len(log.read_step(2)) == 8


def _state_after_setup(cfg, run_dir):
    t = Trainer(cfg, run_dir, tiny_components(), resume=True)
    t._setup()
    return t


def test_resume_restores_tracker_sampler_optimizer_and_weights_exactly(tmp_path):
    cfg = tiny_config(tmp_path)
    run = tmp_path / "run"
    trainer_holder = {}

    import asyncio

    async def go():
        t = Trainer(cfg, run, tiny_components())
        trainer_holder["t"] = t
        await t.run()
        await t.aclose()

    from spo_agents.config import save_config

    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    asyncio.run(go())
    writer = trainer_holder["t"]
    resumed = _state_after_setup(cfg, run)
    assert resumed.step == 2
    a, b = writer.tracker.state_dict(), resumed.tracker.state_dict()
    for k in ("alpha", "beta", "c_last", "id_hash"):
        np.testing.assert_array_equal(a[k], b[k])
    assert a["C"] == b["C"]
    assert writer.sampler.state_dict() == resumed.sampler.state_dict()
    oa, ob = writer.learner.optimizer.state_dict(), resumed.learner.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    for k, sa in oa["state"].items():
        for name, ta in sa.items():
            assert torch.equal(torch.as_tensor(ta), torch.as_tensor(ob["state"][k][name])), (k, name)
    assert torch.equal(weights(writer.model), weights(resumed.model))
    # the restored sampler draws the batch the writer would have drawn next
    v = writer.tracker.v_hat()
    assert writer.sampler.sample(v, 5).tolist() == resumed.sampler.sample(v, 5).tolist()


def test_resume_continues_to_the_requested_step_without_duplicate_metrics(tmp_path):
    cfg = tiny_config(tmp_path)
    run = tmp_path / "run"
    train(cfg, run_dir=run, components=tiny_components())
    more = from_dict(Config, {**to_dict(cfg), "train": {**to_dict(cfg)["train"], "steps": 3}})
    res = train(more, run_dir=run, resume=True, components=tiny_components())
    assert res.step == 3
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    # the resume's override is kept for the next resume, and the checkpoint records the config
    assert load_config(run / "config.yaml").train.steps == 3
    from spo_agents.training.checkpoint import CheckpointManager

    assert CheckpointManager(run, keep=2).load().state["config"]["train"]["steps"] == 3


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
import training_fixtures as T
from spo_agents.config import load_config
from spo_agents.training.loop import train

class SlowEnv(T.FirstTokenEnv):
    def step(self, text):
        time.sleep(0.05)
        return super().step(text)

comp = T.tiny_components()
comp.env_factory = lambda split: SlowEnv(split=split)
cfg = load_config({run!r} + "/config.yaml")
train(cfg, run_dir={run!r}, components=comp)
"""


def test_sigkill_then_resume_continues_from_the_last_checkpoint_with_the_tracker_intact(tmp_path):
    from spo_agents.config import save_config
    from spo_agents.training.checkpoint import CheckpointManager

    cfg = tiny_config(tmp_path, train={"steps": 1000})
    run = tmp_path / "run"
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT.format(tests=str(HERE), run=str(run))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    mgr = CheckpointManager(run)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and (len(mgr.steps()) == 0 or mgr.steps()[-1] < 2):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.1)
        time.sleep(0.3)  # likely mid-step (or mid-checkpoint) now
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    latest = mgr.latest()
    assert latest is not None
    saved = mgr.load()
    assert saved.step >= 2
    assert not latest.name.startswith(".tmp")  # a temporary left by the kill is never taken as a checkpoint
    rows = read_metrics(run / "metrics.jsonl")
    resumed = _state_after_setup(cfg, run)
    assert resumed.step == saved.step
    np.testing.assert_array_equal(resumed.tracker.state_dict()["alpha"], saved.state["tracker"]["alpha"])
    np.testing.assert_array_equal(resumed.tracker.state_dict()["beta"], saved.state["tracker"]["beta"])
    assert resumed.tracker.state_dict()["C"] == saved.state["tracker"]["C"] > 0
    assert max(r["step"] for r in rows) >= saved.step
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == saved.step  # lost steps dropped
    # and it trains on from there
    more = from_dict(Config, {**to_dict(cfg), "train": {**to_dict(cfg)["train"], "steps": saved.step + 1}})
    res = train(more, run_dir=run, resume=True, components=tiny_components())
    assert res.step == saved.step + 1


@pytest.mark.slow
def test_spo_raises_reward_on_a_learnable_env(tmp_path):
    cfg = tiny_config(
        tmp_path, train={"steps": 12, "batch_size": 16, "checkpoint_every": 0, "seed": 0}, optim={"lr": 1e-2}
    )
    train(cfg, run_dir=tmp_path / "run", components=tiny_components())
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    first = np.mean([r["train/reward_mean"] for r in rows[:3]])
    last = np.mean([r["train/reward_mean"] for r in rows[-3:]])
    assert last > first + 0.2, (first, last)


# --- ablations and the GRPO comparison share the loop ------------------------------------------
def _rows(tmp_path, **sections):
    cfg = tiny_config(tmp_path, **sections)
    train(cfg, run_dir=tmp_path / "run", components=tiny_components())
    return read_metrics(tmp_path / "run" / "metrics.jsonl")


def test_grpo_run_logs_only_documented_metrics(tmp_path):
    rows = _rows(
        tmp_path,
        algorithm={"name": "grpo", "group_size": 4},
        sampler={"type": "uniform"},
        train={"steps": 1, "checkpoint_every": 0},
    )
    assert rows[-1]["train/batch_size"] == 8 and "train/degenerate_share" in rows[-1]
    assert undocumented(rows[-1]) == []


def test_constant_rho_uniform_sampling_and_no_baseline_ablations(tmp_path):
    rows = _rows(
        tmp_path,
        tracker={"rho_type": "constant", "rho_constant": 0.9, "baseline": False},
        sampler={"type": "uniform"},
        train={"steps": 2, "checkpoint_every": 0},
    )
    for r in rows:
        assert r["tracker/rho_mean"] == pytest.approx(0.9)
        assert r["sampler/entropy_ratio"] == pytest.approx(1.0)
        assert r["train/advantage_raw_std"] == pytest.approx(r["train/reward_std"])  # no baseline: A = r


def test_grpo_needs_whole_groups_in_a_batch(tmp_path):
    from spo_agents.errors import ConfigError

    with pytest.raises(ConfigError, match="multiple of `algorithm.group_size`"):
        tiny_config(tmp_path, algorithm={"name": "grpo", "group_size": 3})


def test_a_run_without_a_run_dir_is_named_from_the_config(tmp_path):
    """`spo-agent train` passes no run directory: a single-process run must name its own."""
    cfg = tiny_config(tmp_path, train={"steps": 1, "run_name": "named"})
    res = train(cfg, components=tiny_components())
    assert res.step == 1
    run = tmp_path / "named"
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000001"


def _one_step_capturing_the_update(tmp_path, **sections):
    """Run one `train_step` and return (trainer, trajectories, advantages handed to the learner,
    tracker alpha/beta before the step, metrics row)."""
    import asyncio

    cfg = tiny_config(tmp_path, **sections)
    run = tmp_path / "run"
    run.mkdir(parents=True)
    t = Trainer(cfg, run, tiny_components())
    t._setup()
    # distinct, known beliefs per problem, so "the baseline before the update" is checkable
    n = len(t.problem_ids)
    t.tracker.init_offline(np.arange(n), np.arange(n) % 9, np.full(n, 8))
    alpha0, beta0 = t.tracker.alpha.copy(), t.tracker.beta.copy()
    seen = {}
    update = t.learner.update

    def spy(trajectories, advantages):
        seen["batch"], seen["adv"] = list(trajectories), np.asarray(advantages, dtype=np.float64)
        seen["alpha_at_update"] = t.tracker.alpha.copy()
        return update(trajectories, advantages)

    t.learner.update = spy

    async def go():
        try:
            return await t.train_step()
        finally:
            await t.aclose()

    row = asyncio.run(go())
    return t, seen, alpha0, beta0, row


def test_a_step_uses_the_value_before_the_update_and_updates_the_tracker_after(tmp_path):
    from spo_agents.algorithm.advantages import compute_advantages

    t, seen, alpha0, beta0, row = _one_step_capturing_the_update(tmp_path, train={"steps": 1, "checkpoint_every": 0})
    batch = seen["batch"]
    idx = t.tracker.indices([x.problem_id for x in batch])
    r = np.array([x.reward for x in batch])
    v_before = alpha0[idx].astype(np.float64) / (alpha0[idx].astype(np.float64) + beta0[idx])
    assert len(set(np.round(v_before, 6))) > 1  # the baselines differ, so the check below can fail
    np.testing.assert_allclose(seen["adv"], compute_advantages("spo", r, v_before), atol=1e-12)
    np.testing.assert_array_equal(seen["alpha_at_update"], alpha0)  # nothing folded in before the learner ran
    # after the update: first visit, so rho = rho_max (docs/algorithm.md section 1)
    rho = t.cfg.tracker.rho_max
    np.testing.assert_allclose(t.tracker.alpha[idx], rho * alpha0[idx] + r, rtol=1e-6)
    np.testing.assert_allclose(t.tracker.beta[idx], rho * beta0[idx] + (1 - r), rtol=1e-6)
    assert row["tracker/v_hat_mean"] == pytest.approx(v_before.mean())
    assert t.tracker.C == pytest.approx(row["tracker/drift"]) and t.tracker.C > 0  # this step's drift joins C after


def test_grpo_delivers_whole_groups_with_group_advantages_and_the_degenerate_share(tmp_path):
    from spo_agents.algorithm.advantages import degenerate_share, grpo_advantages

    t, seen, *_, row = _one_step_capturing_the_update(
        tmp_path,
        algorithm={"name": "grpo", "group_size": 4},
        sampler={"type": "uniform"},
        train={"steps": 1, "checkpoint_every": 0},
    )
    batch = seen["batch"]
    groups: dict = {}
    for x in batch:
        groups.setdefault(x.group_id, []).append(x)
    assert len(batch) == 8 and len(groups) == 2
    for members in groups.values():  # whole groups of one problem, each sample once
        assert len(members) == 4 and len({m.problem_id for m in members}) == 1
        assert sorted(m.sample_index for m in members) == [0, 1, 2, 3]
    r = np.array([x.reward for x in batch])
    gid = [x.group_id for x in batch]
    np.testing.assert_allclose(seen["adv"], grpo_advantages(r, gid), atol=1e-12)
    assert row["train/degenerate_share"] == pytest.approx(degenerate_share(r, gid))


def test_per_prompt_drift_runs_through_the_loop(tmp_path):
    # 8 problems, 8 per step, one token each: every problem comes back on the next step, and its
    # D(x) is then exactly the previous update's drift on its last response
    comp = tiny_components()
    comp.env_factory = lambda split: FirstTokenEnv(n=8, split=split)
    cfg = tiny_config(
        tmp_path,
        tracker={"drift": "per-prompt"},
        rollout={"max_in_flight": 8},
        train={"steps": 3, "checkpoint_every": 0, "mini_batches": 2},
    )
    train(cfg, run_dir=tmp_path / "run", components=comp)
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["step"] >= 1]
    assert len(steps) == 3 and all(r["tracker/drift"] > 0 for r in steps)
    assert steps[0]["tracker/drift_per_prompt_mean"] == 0.0  # first visits
    for prev, cur in zip(steps, steps[1:]):
        assert cur["tracker/drift_per_prompt_mean"] == pytest.approx(prev["tracker/drift"], rel=1e-3)


def test_compare_drift_logs_both_estimates_on_revisited_problems(tmp_path):
    comp = tiny_components()
    comp.env_factory = lambda split: FirstTokenEnv(n=10, split=split)  # 10 problems, 8 per step: revisits
    cfg = tiny_config(tmp_path, tracker={"compare_drift": True}, train={"steps": 3, "checkpoint_every": 0})
    train(cfg, run_dir=tmp_path / "run", components=comp)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[0]["tracker/drift_revisited"] == 0  # nothing seen before the first step
    later = [r for r in rows[1:] if r["tracker/drift_revisited"] > 0]
    assert later and all(
        r["tracker/drift_revisited_per_prompt"] > 0 and r["tracker/drift_revisited_cumulative"] > 0 for r in later
    )
    assert undocumented(set().union(*rows)) == []


class HalfBrokenEnv(FirstTokenEnv):
    """The sandbox of every other problem is broken (an infrastructure error the env reports)."""

    def step(self, text):
        if int(self.pid.split("-")[1]) % 2:
            return "", 0.0, False, True, {"error": "sandbox failure: worker gone"}
        return super().step(text)


def test_steps_that_lose_many_episodes_to_the_infrastructure_are_reported_then_stop_the_run(tmp_path, capsys):
    from spo_agents.errors import RolloutError

    comp = tiny_components()
    comp.env_factory = lambda split: HalfBrokenEnv(split=split)
    cfg = tiny_config(tmp_path, train={"steps": 6, "checkpoint_every": 0}, rollout={"max_error_steps": 2})
    with pytest.raises(RolloutError, match="2 steps in a row"):
        train(cfg, run_dir=tmp_path / "run", components=comp)
    assert "failed for infrastructure reasons" in capsys.readouterr().err
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows and rows[0]["episode/infra_error_share"] > 0.25 and rows[0]["episode/rollout_errors"] > 0


def test_time_shares_split_the_rollout_wait_by_the_episodes_own_timings():
    from spo_agents.training.metrics import StepTimes, time_row

    row = {
        "episode/generate_s": 3.0,  # per episode: 3 s generating, 1 s in the sandbox
        "episode/sandbox_s": 1.0,
        "time/rollout_wait_s": 8.0,
        "time/learner_s": 2.0,
        "perf/generated_tokens": 50,
    }
    t = time_row(row, StepTimes(step_s=10.0, eval_s=0.0, checkpoint_s=0.5, elapsed_s=30.0))
    assert t["time/share_generate"] == pytest.approx(0.6) and t["time/share_sandbox"] == pytest.approx(0.2)
    assert t["time/share_learner"] == pytest.approx(0.2) and t["perf/tokens_per_s"] == pytest.approx(5.0)
    assert t["time/checkpoint_s"] == 0.5 and t["time/elapsed_s"] == 30.0
    assert undocumented(t) == []
    no_tools = time_row({**row, "episode/generate_s": 0.0, "episode/sandbox_s": 0.0}, StepTimes(10.0, 0.0, 0.0, 30.0))
    assert no_tools["time/share_generate"] == pytest.approx(0.8) and no_tools["time/share_sandbox"] == 0.0
