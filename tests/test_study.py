"""`bench/study.py`: the SPO-vs-GRPO study runs every arm (`--quick`: 2 steps on the tiny model),
resumes per (arm, seed), and refuses overrides that do not exist."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "bench" / "study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("bench_study", STUDY)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_study"] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("bench_study", None)


def _run(*args: str, timeout: float = 280) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(STUDY), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)


def _numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def test_quick_study_runs_every_arm_on_an_equal_budget_then_skips_finished_runs(tmp_path, study):
    out = tmp_path / "quick"
    res = _run("--quick", "--out", str(out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    table = (out / "table.md").read_text()
    arms = summary["arms"]
    # every arm ran, or (an optional arm whose config keys do not exist yet) says why not
    assert set(arms) | set(summary["unavailable"]) == set(study.ARMS)
    assert set(study.DEFAULT_ARMS) <= set(arms)
    assert all(summary["unavailable"][a] for a in summary["unavailable"])
    assert summary["failed"] == {}
    for name, a in arms.items():
        assert f"| {name} |" in table
        assert a["finished"] == a["runs"] == 1
        assert a["trajectories"] == [16]  # budget 16 = 2 steps of 8, for GRPO too (2 groups of 4)
        assert a["final_avg"] is not None and 0.0 <= a["final_avg"]["mean"] <= 1.0
        assert a["seconds_per_trajectory"]["mean"] > 0
    assert all(math.isfinite(x) for x in _numbers(summary["arms"]))
    assert arms["grpo"]["degenerate_share"] is not None and arms["spo"]["degenerate_share"] is None
    assert arms["spo"]["std_r_minus_vhat"] is not None and arms["grpo"]["std_r_minus_vhat"] is None
    for run in summary["runs"]:
        assert [e["step"] for e in run["evals"]] == [0, 1, 2]
        assert (Path(run["dir"]) / "study-done.json").is_file()
        assert not (Path(run["dir"]) / "checkpoints").exists()  # dropped once the run is done
    # the GRPO arm differs from SPO in the algorithm and the sampler only
    grpo_settings = set(summary["config_differences_from_spo"]["grpo"])
    assert grpo_settings == {"algorithm.name", "algorithm.group_size", "sampler.type"}
    for png in ("eval_avg.png", "eval_maj.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    again = _run("--quick", "--out", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "[study] started" not in again.stdout
    assert again.stdout.count("done, skipped") == len(arms)


@pytest.mark.slow
def test_an_unfinished_run_is_resumed_from_its_checkpoint(tmp_path):
    out = tmp_path / "resume"
    first = _run("--quick", "--arms", "spo", "--budget", "8", "--keep-checkpoints", "--out", str(out))
    assert first.returncode == 0, first.stderr[-2000:]
    more = _run("--quick", "--arms", "spo", "--budget", "16", "--out", str(out))
    assert more.returncode == 0, more.stderr[-2000:]
    assert "resuming from step 1 of 2" in more.stdout
    rows = [json.loads(line) for line in (out / "runs" / "spo-s0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "--resume" in (out / "runs" / "spo-s0.log").read_text()


def _plan(study, tmp_path, **kw):
    plan, _ = study.parse(["--quick", "--out", str(tmp_path), *kw.pop("argv", [])])
    for k, v in kw.items():
        setattr(plan, k, v)
    return plan


def test_an_override_that_does_not_exist_stops_the_study_but_only_drops_an_optional_arm(tmp_path, study, monkeypatch):
    arms = dict(study.ARMS)
    arms["typo"] = study.Arm("typo", "cpu-default.yaml", ("tracker.baselin=false",))
    arms["future"] = study.Arm("future", "cpu-default.yaml", ("algorithm.no_such_key=1",), optional=True)
    monkeypatch.setattr(study, "ARMS", arms)
    runs, unavailable, _ = study.make_runs(_plan(study, tmp_path, arms=["spo", "future"]))
    assert [r.arm for r in runs] == ["spo"]
    assert "no_such_key" in unavailable["future"]
    with pytest.raises(study.StudyError, match="baselin"):
        study.make_runs(_plan(study, tmp_path, arms=["spo", "typo"]))


def test_the_budget_sets_the_steps_and_must_fill_whole_batches(tmp_path, study):
    runs, _, _ = study.make_runs(_plan(study, tmp_path, arms=["spo", "grpo"], budget=48))
    assert {r.steps for r in runs} == {6}
    for r in runs:
        assert "train.max_minutes=null" in r.overrides and "train.steps=6" in r.overrides
        assert "eval.every=2" in r.overrides and "eval.k=4" in r.overrides
    with pytest.raises(study.StudyError, match="multiple of `train.batch_size`"):
        study.make_runs(_plan(study, tmp_path, arms=["spo"], budget=12))
    with pytest.raises(study.StudyError, match="unknown arm"):
        study.parse(["--arms", "spo", "ppo"])
