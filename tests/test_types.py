"""Trajectory and Problem: validation and the JSONL round trip."""

import json
import math

import pytest

from spo_agents.errors import TrajectoryError
from spo_agents.types import SCHEMA_VERSION, Problem, ToolCall, Trajectory, read_jsonl, write_jsonl


def _traj(**kw):
    base = dict(
        problem_id="p1",
        env_id="math-python-v0",
        prompt_ids=[1, 2, 3],
        token_ids=[10, 11, 12, 13],
        loss_mask=[1, 1, 0, 1],
        logprobs=[-0.5, -1.25, 0.0, -float("inf")],
        reward=1.0,
        terminated=True,
        policy_version=3,
        policy_versions=[3, 4],
        turn_starts=[0, 3],
        tool_calls=[ToolCall(code="print(1)", output="1\n", ok=True, duration_s=0.01)],
        timings={"generate": 0.5, "env": 0.1},
        info={"answer": "42", "correct": True},
    )
    base.update(kw)
    return Trajectory(**base)


def test_jsonl_round_trip_is_exact(tmp_path):
    ts = [_traj(), _traj(problem_id="p2", reward=0.0, info={"correct": False}, error="sandbox down")]
    path = tmp_path / "t.jsonl"
    assert write_jsonl(path, ts) == 2
    back = list(read_jsonl(path))
    assert back[0] == ts[0]
    assert back[1] == ts[1]
    assert math.isinf(back[0].logprobs[3])
    assert back[0].schema_version == SCHEMA_VERSION


def test_lengths_must_agree():
    with pytest.raises(TrajectoryError, match="equal lengths"):
        _traj(loss_mask=[1, 1])


def test_num_generated_counts_masked_tokens():
    assert _traj().num_generated == 3


def test_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [_traj()])
    with open(path, "a") as f:
        f.write('{"problem_id": "p3", "tok')  # crash mid-write
    assert [t.problem_id for t in read_jsonl(path)] == ["p1"]


def test_corrupt_middle_line_names_the_line(tmp_path):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [_traj()])
    with open(path, "a") as f:
        f.write("not json\n")
    write_jsonl(path, [_traj()], append=True)
    with pytest.raises(TrajectoryError, match=r"t\.jsonl:2"):
        list(read_jsonl(path))


def test_newer_schema_is_refused():
    d = _traj().to_dict()
    d["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(TrajectoryError, match="upgrade spo-agents"):
        Trajectory.from_dict(json.loads(json.dumps(d)))


def test_problem_round_trip():
    p = Problem(id="arith/1", prompt="1+1?", answer="2", metadata={"tier": "easy"})
    assert Problem.from_dict(p.to_dict()) == p
