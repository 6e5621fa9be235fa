"""`spo-agent train` with `rollout.workers: ray`: episodes run in two Ray actors against a vLLM CPU
server the trainer starts, and one actor is killed during the second step.

The run must still complete both steps; step 1 must train on trajectories of both actors (their
index is in `Trajectory.info["rollout_worker"]`, kept by the trajectory log), step 2 only on the
survivor's, stamped with the version published after step 1; the killed actor's episodes must be
counted as infrastructure errors; and held-out evaluation (the learner's own client) must run.

Run: `make test-vllm ARGS=tests/vllm_server/test_train_ray_workers.py`.
"""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.ray, pytest.mark.timeout(1200)]
ray = pytest.importorskip("ray", reason="the `ray` extra is not installed")
pytest.importorskip("torch")


def test_two_actors_train_two_steps_and_a_killed_actor_loses_no_step(tmp_path, vllm_python, monkeypatch):
    from spo_agents.config import load_config
    from spo_agents.models import embedded_model_dir
    from spo_agents.training.components import build_components
    from spo_agents.training.loop import train
    from spo_agents.trajectories.reader import TrajectoryLogReader

    # Ray kills workers when the node's memory is 95% used; on a shared machine that is other
    # processes' memory, so its monitor is off (the kernel's OOM killer still applies)
    monkeypatch.setenv("RAY_memory_monitor_refresh_ms", "0")
    cfg = load_config(
        overrides=[
            f"model.name={embedded_model_dir()}",
            "model.dtype=float32",
            "model.device=cpu",
            "rollout.backend=vllm-server",
            f"rollout.server_python={vllm_python}",
            "rollout.server_kv_cache_gib=0.5",
            "rollout.server_args=[--max-model-len, '1024']",
            "rollout.workers=ray",
            "ray.num_workers=2",
            "ray.cpus_per_worker=0.5",
            "rollout.max_in_flight=4",
            "rollout.max_new_tokens=16",
            "rollout.max_episode_tokens=48",
            "train.steps=2",
            "train.batch_size=4",
            "train.checkpoint_every=100",
            "eval.every=2",
            "eval.limit=2",
            "eval.k=1",
            "optim.lr=1e-4",
            "logging.progress=false",
            f"train.output_dir={tmp_path}",
        ]
    )
    comp = build_components(cfg, log_dir=tmp_path)
    workers = comp.runner
    assert workers is not None and workers.alive == 2
    run_episode, calls, alive = workers.run_episode, [], []

    async def kill_during_step_two(problem_id, **kw):
        # step 1 runs episodes 1-4 (two per actor); step 2 starts with episode 5 on actor 0, and
        # actor 0 is killed as episode 6 is placed
        calls.append(problem_id)
        if len(calls) == 6:
            ray.kill(workers.handles[0])
        traj = await run_episode(problem_id, **kw)
        alive.append(workers.alive)
        return traj

    workers.run_episode = kill_during_step_two
    result = train(cfg, run_dir=tmp_path / "run", components=comp)

    assert result.step == 2 and not result.stopped_early
    assert alive[-1] == 1  # actor 0 died; the run went on with actor 1
    log = TrajectoryLogReader(tmp_path / "run")
    step1, step2 = log.read_step(1), log.read_step(2)
    assert len(step1) == len(step2) == 4
    assert {t.info["rollout_worker"] for t in step1} == {0, 1}  # both actors' episodes reached the learner
    assert {t.info["rollout_worker"] for t in step2} == {1}
    assert {t.policy_version for t in step1} == {0} and {t.policy_version for t in step2} == {1}
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if line]
    by_step = {r["step"]: r for r in rows if "train/reward_mean" in r}
    assert by_step[1]["episode/rollout_errors"] == 0
    assert by_step[2]["episode/rollout_errors"] >= 1  # the killed actor's episodes, counted and rerun
    evals = [r["step"] for r in rows if "eval/avg_at_k" in r]
    assert evals == [0, 2]  # held-out evaluation through the learner's client, before and after
    print(
        f"\nray workers: {len(calls)} episodes placed, {by_step[2]['episode/rollout_errors']} lost with actor 0 and "
        f"rerun; eval avg@1 {[r['eval/avg_at_k'] for r in rows if 'eval/avg_at_k' in r]}"
    )
