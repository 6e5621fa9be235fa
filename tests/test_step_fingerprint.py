"""bench/step_fingerprint.py's comparison: what counts as the same learning step."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "step_fingerprint.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_step_fingerprint", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


FP = {
    "submitted": [["p1", "p2"]],
    "batches": [[{"problem_id": "p1", "token_ids": [1, 2], "reward": 1.0}]],
    "metrics": [{"step": 1, "learner/loss": 0.5, "learner/grad_norm": 2.0, "adv/mean": 0.1, "time/step_s": 3.0}],
}


def _with(**metric):
    fp = copy.deepcopy(FP)
    fp["metrics"][0].update(metric)
    return fp


def test_equal_fingerprints_agree_and_timings_are_not_compared():
    fp = _module()
    assert fp.compare(FP, _with(**{"time/step_s": 9.0}), 1e-5) == []


def test_loss_and_grad_norm_are_held_to_atol_other_numbers_to_1e_9():
    fp = _module()
    assert fp.compare(FP, _with(**{"learner/loss": 0.5 + 4e-6}), 1e-5) == []
    assert len(fp.compare(FP, _with(**{"learner/loss": 0.5 + 2e-5}), 1e-5)) == 1
    assert len(fp.compare(FP, _with(**{"learner/grad_norm": 2.0 - 2e-5}), 1e-5)) == 1
    assert len(fp.compare(FP, _with(**{"adv/mean": 0.1 + 1e-8}), 1e-5)) == 1


def test_other_problems_other_tokens_and_a_new_key_are_differences_unless_ignored():
    fp = _module()
    drawn = copy.deepcopy(FP)
    drawn["submitted"] = [["p2", "p1"]]
    assert fp.compare(FP, drawn, 1e-5) == ["the sampler submitted other problems"]
    tokens = copy.deepcopy(FP)
    tokens["batches"][0][0]["token_ids"] = [1, 3]
    assert fp.compare(FP, tokens, 1e-5) == ["step 1: the trajectories differ"]
    added = _with(**{"learner/logprob_diff_max": 1e-5})
    assert len(fp.compare(FP, added, 1e-5)) == 1
    assert fp.compare(FP, added, 1e-5, ignore=("learner/logprob_diff",)) == []
