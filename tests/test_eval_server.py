"""`spo-agent eval` against a real OpenAI-compatible server (`transformers serve` on the tiny
model, offline), with every metric recomputed here from the saved transcripts.

`transformers serve` takes only text prompts and returns no log-probs, so this also checks the
`openai` backend's text fallback and that the report says the run was evaluation-only.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


def _pass_at_k(outcomes: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


def _maj(answers: list, correct: list[bool]) -> float:
    """Votes per distinct answer; the top answer scores 1 when it is the right one (any sample
    with it was judged correct); ties average."""
    votes: dict[str, int] = {}
    right: dict[str, bool] = {}
    for a, c in zip(answers, correct):
        if a is not None:
            key = str(a).strip()
            votes[key] = votes.get(key, 0) + 1
            right[key] = right.get(key, False) or c
    if not votes:
        return 0.0
    top = max(votes.values())
    tied = [a for a, v in votes.items() if v == top]
    return sum(right[a] for a in tied) / len(tied)


def test_eval_against_transformers_serve_matches_the_transcripts(served_model, tmp_path):
    base_url, model = served_model
    k, problems = 4, 3
    cmd = [
        sys.executable,
        "-m",
        "spo_agents",
        "eval",
        "--env",
        "say_env:SayEnv",
        "--base-url",
        base_url,
        "--model",
        model,
        "-k",
        str(k),
        "--limit",
        str(problems),
        "--max-new-tokens",
        "8",
        "--max-episode-tokens",
        "40",
        "--concurrency",
        "4",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "evaluation only" in run.stderr  # the text-only server is reported as such

    rows = [json.loads(line) for line in (tmp_path / "transcripts.jsonl").read_text().splitlines()]
    assert len(rows) == k * problems and all(r["error"] is None for r in rows)
    by_pid: dict[str, list[dict]] = {}
    for r in rows:
        by_pid.setdefault(r["problem_id"], []).append(r)
    correct = {
        p: [bool(r["info"]["correct"]) for r in sorted(v, key=lambda r: r["sample_index"])] for p, v in by_pid.items()
    }
    answers = {p: [r["info"]["answer"] for r in sorted(v, key=lambda r: r["sample_index"])] for p, v in by_pid.items()}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["avg_at_k"] == pytest.approx(sum(sum(c) / k for c in correct.values()) / problems)
    for j in (1, 2, 4):
        assert saved["pass_at_k"][str(j)] == pytest.approx(sum(_pass_at_k(c, j) for c in correct.values()) / problems)
    assert saved["maj_at_k"] == pytest.approx(sum(_maj(answers[p], correct[p]) for p in correct) / problems)
    assert saved["token_io"] is False
    assert f"{saved['avg_at_k']:.4f}" in run.stdout


WAIT = 900


def test_unreachable_server_gives_a_clear_error_quickly(tmp_path, capsys, monkeypatch, unused_port):
    from spo_agents.cli import main

    monkeypatch.syspath_prepend(str(TESTS))
    port = unused_port  # nothing listens there
    start = time.monotonic()
    code = main(
        [
            "eval",
            "--env",
            "say_env:SayEnv",
            "--base-url",
            f"http://127.0.0.1:{port}/v1",
            "--model",
            "tiny-random",
            "--limit",
            "1",
            "--out",
            str(tmp_path),
            "--no-progress",
            "--server-wait",
            str(WAIT),
        ]
    )
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 1
    assert "cannot reach" in err and f"127.0.0.1:{port}" in err
    # a server that never answered is not waited for: the run ends well inside `--server-wait`
    # (the test's own timeout, 300 s, is shorter still)
    assert elapsed < WAIT
