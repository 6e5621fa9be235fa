"""Checkpoints: atomic writes, the `latest` pointer, pruning, crash leftovers, corrupt files;
and the metrics log's crash handling."""

from __future__ import annotations

import json

import pytest
import torch

from spo_agents.errors import CheckpointError
from spo_agents.files import write_text_atomic
from spo_agents.training.checkpoint import CheckpointManager, rng_state, set_rng_state
from spo_agents.training.metrics import (
    METRICS,
    MetricsWriter,
    markdown_table,
    read_metrics,
    truncate_after,
    undocumented,
)


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3)


def test_save_then_load_round_trips_state_and_weights(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    m = small_model(0)
    mgr.save(3, model=m, state={"tracker": {"C": 1.5}, "x": torch.arange(3)})
    ck = mgr.load()
    assert ck.step == 3 and ck.state["tracker"] == {"C": 1.5}
    assert torch.equal(ck.state["x"], torch.arange(3))
    other = small_model(1)
    mgr.load_model_weights(other, ck)
    assert torch.equal(other.weight, m.weight)


def test_latest_points_at_the_newest_and_only_keep_newest_are_kept(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    for s in (1, 2, 3, 4):
        mgr.save(s, model=small_model(), state={})
    assert mgr.steps() == [3, 4]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000004"
    assert mgr.load().step == 4


def test_a_crash_while_writing_leaves_the_previous_checkpoint_as_latest(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save(1, model=small_model(), state={"v": 1})
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        if str(f).endswith("trainer_state.pt"):
            real_save(obj, f, *a, **k)
            with open(f, "r+b") as fh:  # torn file, then the "crash"
                fh.truncate(10)
            raise KeyboardInterrupt("killed mid-write")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(2, model=small_model(), state={"v": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert mgr.steps() == [1]
    assert mgr.load().state["v"] == 1
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_leftover_temporaries_from_a_killed_process_are_ignored_then_removed(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    mgr.save(1, model=small_model(), state={})
    junk = tmp_path / "checkpoints" / ".tmp-step-000002-abc"
    junk.mkdir()
    (junk / "trainer_state.pt").write_bytes(b"torn")
    assert mgr.latest().name == "step-000001"
    mgr.save(2, model=small_model(), state={})
    assert not junk.exists()


def test_a_missing_pointer_or_incomplete_directory_falls_back_to_the_newest_complete(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=5)
    mgr.save(1, model=small_model(), state={})
    mgr.save(2, model=small_model(), state={})
    (tmp_path / "checkpoints" / "latest").unlink()
    (tmp_path / "checkpoints" / "step-000009").mkdir()  # no meta.json: not complete
    assert mgr.latest().name == "step-000002"


def test_corrupt_state_file_says_which_and_what_to_do(tmp_path):
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(1, model=small_model(), state={})
    (path / "trainer_state.pt").write_bytes(b"\x00garbage")
    with pytest.raises(
        CheckpointError, match="no intact checkpoint.*step-000001.*trainer_state.pt.*checksum.*without `--resume`"
    ):
        mgr.load()


def test_flipped_weight_bytes_are_caught_and_the_older_checkpoint_is_used(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save(1, model=small_model(1), state={"v": 1})
    path = mgr.save(2, model=small_model(2), state={"v": 2})
    weights = path / "model" / "model.pt"
    data = bytearray(weights.read_bytes())
    for i in range(len(data) - 40, len(data) - 20):  # flip bytes inside the stored tensors
        data[i] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert mgr.load().state["v"] == 1


def test_a_checkpoint_completed_before_latest_was_updated_is_used(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save(1, model=small_model(), state={"v": 1})
    mgr.save(2, model=small_model(), state={"v": 2})
    (tmp_path / "checkpoints" / "latest").write_text("step-000001\n")  # the crash came before the pointer
    assert mgr.load().step == 2


def test_a_full_disk_names_the_checkpoint_and_the_room_it_needs(tmp_path, monkeypatch):
    import errno

    mgr = CheckpointManager(tmp_path, keep=2)
    mgr.save(1, model=small_model(), state={})
    real_save = torch.save

    def full(obj, f, *a, **k):
        if str(f).endswith("trainer_state.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match="disk filled up.*step-000002.*GB free.*N \\+ 1"):
        mgr.save(2, model=small_model(), state={})
    assert mgr.steps() == [1] and not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_a_fixed_run_name_restarts_cleanly_after_a_kill_before_the_first_checkpoint(tmp_path, capsys):
    from spo_agents.config import load_config
    from spo_agents.training.loop import new_run_dir

    cfg = load_config(None, [f"train.output_dir={tmp_path}", "train.run_name=fixed"])
    run = new_run_dir(cfg)
    MetricsWriter(run).log({"step": 0, "eval/avg_at_k": 0.5})
    (run / "checkpoints" / ".tmp-step-000001-x").mkdir(parents=True)  # killed during the first write
    again = new_run_dir(cfg)
    assert again == run and not (run / "metrics.jsonl").exists()  # no duplicate rows in the new run
    assert len(list(run.glob("metrics.jsonl.stopped-*"))) == 1 and "starting it over" in capsys.readouterr().err
    CheckpointManager(run).save(1, model=small_model(), state={})
    with pytest.raises(Exception, match="--resume"):
        new_run_dir(cfg)


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        CheckpointManager(tmp_path).load()
    with pytest.raises(CheckpointError, match="keep_checkpoints"):
        CheckpointManager(tmp_path, keep=0)


def test_hf_model_round_trip_with_tied_embeddings(tmp_path):
    from transformers import AutoModelForCausalLM

    from spo_agents.models import tiny_model_dir

    a = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.01)
    mgr = CheckpointManager(tmp_path)
    mgr.save(5, model=a, state={})
    b = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    mgr.load_model_weights(b, mgr.load())
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n


def test_rng_state_round_trip():
    import random

    import numpy as np

    st = rng_state()
    x = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(st)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == x


def test_write_text_atomic_replaces_whole_content(tmp_path):
    p = tmp_path / "f"
    write_text_atomic(p, "one\n")
    write_text_atomic(p, "two\n")
    assert p.read_text() == "two\n"
    assert [q.name for q in tmp_path.iterdir()] == ["f"]


# --- metrics log -----------------------------------------------------------------------------
def test_metrics_rows_are_appended_and_non_finite_values_become_null(tmp_path):
    w = MetricsWriter(tmp_path)
    w.log({"step": 1, "train/reward_mean": 0.5})
    w.log({"step": 2, "train/reward_mean": float("nan")})
    w.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [
        {"step": 1, "train/reward_mean": 0.5},
        {"step": 2, "train/reward_mean": None},
    ]
    with pytest.raises(ValueError, match="step"):
        MetricsWriter(tmp_path).log({"x": 1})


def test_torn_last_line_is_skipped_and_truncate_drops_lost_steps(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "tr')
    assert [r["step"] for r in read_metrics(p)] == [1, 2, 3]
    truncate_after(p, 2)
    assert [r["step"] for r in read_metrics(p)] == [1, 2]
    assert p.read_text().endswith("\n")


def test_tensorboard_sink_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    w = MetricsWriter(tmp_path, tensorboard=True)
    w.log({"step": 1, "train/reward_mean": 0.25})
    w.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_metric_docs_are_complete_sentences_and_render_as_a_table():
    assert undocumented(["step", "train/reward_mean", "made/up"]) == ["made/up"]
    assert all(doc.strip().endswith((".", ")")) for doc in METRICS.values())
    table = markdown_table()
    assert table.count("\n") == len(METRICS) + 1 and "`tracker/rho_mean`" in table


@pytest.mark.slow  # starts the wandb service process (several seconds)
def test_wandb_sink_logs_offline_without_an_account(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    w = MetricsWriter(tmp_path, wandb=True, run_name="t", config={"a": 1})
    w.log({"step": 1, "train/reward_mean": 0.25})
    w.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "train/reward_mean": 0.25}]
