"""Evaluation metrics and `evaluate`: pass@k against brute force, maj@k clustering, resume."""

from __future__ import annotations

import asyncio
import itertools
import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from say_env import SayEnv
from spo_agents.algorithm.passk import ks_up_to, majority_correct, pass_at_k
from spo_agents.evaluation.runner import TRANSCRIPTS, evaluate
from spo_agents.rollout.policy import make_policy
from spo_agents.rollout.policy.base import SamplingParams
from spo_agents.types import read_jsonl


def _brute_pass_at_k(outcomes: list[bool], k: int) -> float:
    """Share of all k-subsets of the samples that contain a correct one."""
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


@given(st.lists(st.booleans(), min_size=1, max_size=10), st.data())
def test_pass_at_k_equals_the_subset_average(outcomes, data):
    k = data.draw(st.integers(1, len(outcomes)))
    assert math.isclose(pass_at_k(len(outcomes), sum(outcomes), k), _brute_pass_at_k(outcomes, k), abs_tol=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    assert pass_at_k(1000, 0, 500) == 0.0
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)
    assert pass_at_k(1000, 501, 500) == 1.0
    assert 0.0 < pass_at_k(10_000, 3, 64) < 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_ks_are_powers_of_two_up_to_k():
    assert ks_up_to(1) == [1]
    assert ks_up_to(8) == [1, 2, 4, 8]
    assert ks_up_to(6) == [1, 2, 4, 6]


def test_majority_counts_equivalent_answers_together():
    def eq(a, b):
        return float(a) == float(b)

    # "2", "2.0" and "2.00" are one answer (3 votes) against "3" (2 votes)
    assert majority_correct(["2", "3", "2.0", "3", "2.00"], [True, False, True, False, True], eq) == 1.0
    assert (
        majority_correct(["2", "3", "2.0", "3", "2.00"], [True, False, True, False, True], lambda a, b: a == b) == 0.0
    )
    assert majority_correct(["1", "2"], [True, False], eq) == 0.5  # a tie scores its expected value
    assert majority_correct([None, None], [False, False], eq) == 0.0


def test_majority_judges_a_cluster_by_its_answer_not_by_its_first_sample():
    # "42" is the reference; the first "42" was cut off by a budget (answer kept, reward 0)
    eq = str.__eq__
    assert majority_correct(["42", "42", "7"], [False, True, False], eq) == 1.0
    assert majority_correct(["42", "42", "7"], [True, False, False], eq) == 1.0
    assert majority_correct(["7", "7", "42"], [False, False, True], eq) == 0.0


def _maj_from_votes(answers: list, correct: list[bool]) -> float:
    """maj@k written from its definition: count votes per distinct answer; the answer with the most
    votes scores 1 when it is correct (some sample with it was judged correct); ties average."""
    votes: dict = {}
    right: dict = {}
    for a, c in zip(answers, correct):
        if a is None:
            continue
        votes[a] = votes.get(a, 0) + 1
        right[a] = right.get(a, False) or c
    if not votes:
        return 0.0
    top = max(votes.values())
    tied = [a for a, v in votes.items() if v == top]
    return sum(right[a] for a in tied) / len(tied)


@given(st.lists(st.tuples(st.sampled_from([None, "1", "2", "3"]), st.booleans()), min_size=1, max_size=9), st.randoms())
def test_majority_is_invariant_under_any_permutation_of_the_samples(samples, rng):
    answers, correct = [a for a, _ in samples], [c for _, c in samples]
    reference = majority_correct(answers, correct, str.__eq__)
    assert reference == pytest.approx(_maj_from_votes(answers, correct))
    order = list(range(len(samples)))
    rng.shuffle(order)
    assert majority_correct([answers[i] for i in order], [correct[i] for i in order], str.__eq__) == pytest.approx(
        reference
    )


def test_a_truncated_episode_does_not_vote():
    from spo_agents.evaluation.runner import compute_report
    from spo_agents.types import Trajectory

    def sample(answer: str, correct: bool, truncated: bool = False) -> Trajectory:
        return Trajectory(
            "p",
            "e",
            [1],
            [2],
            [1],
            [0.0],
            float(correct),
            terminated=not truncated,
            truncated=truncated,
            info={"answer": answer, "correct": correct},
        )

    # two cut-off "9" answers would outvote the finished "5" if they voted
    samples = {("p", 0): sample("9", False, True), ("p", 1): sample("9", False, True), ("p", 2): sample("5", True)}
    report = compute_report(samples, ["p"], 3, str.__eq__)
    assert report.maj_at_k == 1.0 and report.problems[0].answers == [None, None, "5"]


@pytest.fixture(scope="module")
def policy():
    p = make_policy("hf", "tiny-random", torch_threads=1)
    yield p
    asyncio.run(p.close())


async def test_evaluate_reports_match_the_transcripts(policy, tmp_path):
    ids = [f"test-{i}" for i in range(3)]
    report = await evaluate(
        lambda: SayEnv(),
        policy,
        ids,
        k=4,
        sampling=SamplingParams(max_new_tokens=8),
        concurrency=6,
        out_dir=tmp_path,
        progress=False,
        max_episode_tokens=40,
    )
    rows = list(read_jsonl(tmp_path / TRANSCRIPTS))
    assert len(rows) == 12 and {(t.problem_id, t.sample_index) for t in rows} == {(p, i) for p in ids for i in range(4)}
    by_pid = {p: [t for t in rows if t.problem_id == p] for p in ids}
    assert report.avg_at_k == pytest.approx(sum(sum(t.correct for t in v) / 4 for v in by_pid.values()) / 3)
    for j in (1, 2, 4):
        assert report.pass_at_k[j] == pytest.approx(
            sum(_brute_pass_at_k([t.correct for t in v], j) for v in by_pid.values()) / 3
        )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["avg_at_k"] == pytest.approx(report.avg_at_k) and saved["pass_at_k"]["4"] == pytest.approx(
        report.pass_at_k[4]
    )
    assert len(saved["problems"]) == 3 and saved["token_io"] is True


async def test_resume_runs_only_the_missing_samples(policy, tmp_path):
    ids = [f"test-{i}" for i in range(2)]
    params = SamplingParams(max_new_tokens=6)
    await evaluate(
        lambda: SayEnv(), policy, ids, k=3, sampling=params, out_dir=tmp_path, progress=False, max_episode_tokens=30
    )
    path = tmp_path / TRANSCRIPTS
    lines = path.read_text().splitlines(keepends=True)
    kept = lines[:4]
    path.write_text("".join(kept) + lines[4][: len(lines[4]) // 2])  # interrupted mid-write
    before = policy.stats["rows"]
    report = await evaluate(
        lambda: SayEnv(),
        policy,
        ids,
        k=3,
        sampling=params,
        out_dir=tmp_path,
        resume=True,
        progress=False,
        max_episode_tokens=30,
    )
    rows = path.read_text().splitlines(keepends=True)
    assert rows[:4] == kept  # finished samples are not redone or rewritten
    assert len(rows) == 6 and report.num_samples == 6
    assert policy.stats["rows"] - before == 2 * 2  # two samples redone, two turns each


async def test_infrastructure_errors_are_counted_not_scored(policy, tmp_path):
    from say_env import FailingSandboxEnv

    report = await evaluate(
        lambda: FailingSandboxEnv(),
        policy,
        ["test-0"],
        k=2,
        sampling=SamplingParams(max_new_tokens=4),
        out_dir=tmp_path,
        progress=False,
    )
    assert report.errors == 2 and report.num_samples == 0 and report.incomplete[1] == 1


def test_eval_cli_with_the_hf_backend(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from spo_agents.cli import main

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    args = ["eval", "--env", "say_env:SayEnv", "--backend", "hf", "--model", "tiny-random", "-k", "2", "--limit", "2"]
    args += ["--max-new-tokens", "6", "--max-episode-tokens", "30", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert any(line.split() == ["avg@2", f"{saved['avg_at_k']:.4f}"] for line in out.splitlines())
    assert any(line.split()[:1] == ["maj@2"] for line in out.splitlines())
    assert saved["num_problems"] == 2 and saved["settings"]["sampling"]["temperature"] == 0.6
    assert saved["settings"]["sampling"]["top_k"] == 20 and saved["settings"]["sampling"]["top_p"] == 0.95
    before = (tmp_path / "transcripts.jsonl").read_text()
    assert main(args) == 1  # the same --out without --resume: refused, nothing lost
    assert "--resume" in capsys.readouterr().err and (tmp_path / "transcripts.jsonl").read_text() == before
    assert main([*args, "--resume", "--temperature", "1.0"]) == 1  # resuming with other sampling settings
    assert "temperature" in capsys.readouterr().err and (tmp_path / "transcripts.jsonl").read_text() == before


async def test_an_env_that_raises_stops_the_evaluation_as_a_plugin_bug_and_keeps_the_finished_samples(policy, tmp_path):
    from spo_agents.errors import PluginError

    class BuggyEnv(SayEnv):
        def _step_episode(self, action):
            if self.problem.id == "test-1":
                raise ValueError("a bug in a plugin env")
            return super()._step_episode(action)

    ids = ["test-0", "test-1"]
    with pytest.raises(
        PluginError, match=r"`BuggyEnv` raised ValueError: a bug in a plugin env at .*test_evaluation.py:\d+"
    ):
        await evaluate(
            lambda: BuggyEnv(),
            policy,
            ids,
            k=2,
            sampling=SamplingParams(max_new_tokens=4),
            out_dir=tmp_path,
            progress=False,
            max_episode_tokens=30,
            concurrency=1,
        )
    rows = list(read_jsonl(tmp_path / TRANSCRIPTS))
    assert all(t.error is None and t.problem_id == "test-0" for t in rows)  # nothing recorded as data


def test_resume_refuses_another_problem_set_and_allows_a_moved_server(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from spo_agents.cli import main

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    base = [
        "eval",
        "--env",
        "say_env:SayEnv",
        "--backend",
        "hf",
        "--model",
        "tiny-random",
        "-k",
        "1",
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
        "--max-episode-tokens",
        "20",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    assert main(base) == 0
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["k"] == 1 and settings["env_kwargs"] == {} and len(settings["problems"]) == 64
    capsys.readouterr()
    assert main([*base, "--resume", "--limit", "3"]) == 1  # other problems: refused
    assert "`problems`" in capsys.readouterr().err
    assert main([*base, "--resume", "-k", "2"]) == 1
    assert "`k`" in capsys.readouterr().err
    saved = json.loads((tmp_path / "settings.json").read_text())
    saved["base_url"] = "http://elsewhere:8000/v1"  # the run's server has moved since
    (tmp_path / "settings.json").write_text(json.dumps(saved))
    assert main([*base, "--resume"]) == 0
    assert "notice: resuming with `base_url`" in capsys.readouterr().err


def test_a_complete_last_line_without_its_newline_is_kept(tmp_path):
    from spo_agents.files import repair_torn_tail

    path = tmp_path / "t.jsonl"
    path.write_text('{"a": 1}\n{"b": 2}')  # the newline of a complete record was not written
    repair_torn_tail(path)
    assert path.read_text() == '{"a": 1}\n{"b": 2}\n'
    path.write_text('{"a": 1}\n{"b": 2')  # cut mid-record
    repair_torn_tail(path)
    assert path.read_text() == '{"a": 1}\n'


async def test_transcripts_record_the_registered_env_id(policy, tmp_path):
    from spo_agents import envs
    from spo_agents.registry import ENVS

    envs.register("say-v0", "say_env:SayEnv", override=True)
    try:
        for name, factory in (("made", lambda: envs.make("say")), ("direct", lambda: SayEnv())):
            await evaluate(
                factory,
                policy,
                ["test-0"],
                k=1,
                sampling=SamplingParams(max_new_tokens=4),
                out_dir=tmp_path / name,
                progress=False,
                max_episode_tokens=20,
            )
    finally:
        ENVS._specs.pop("say-v0")
    assert {t.env_id for t in read_jsonl(tmp_path / "made" / TRANSCRIPTS)} == {"say-v0"}
    # a class built without the registry is recorded as the `package.module:Class` that `--env` takes
    assert {t.env_id for t in read_jsonl(tmp_path / "direct" / TRANSCRIPTS)} == {"say_env:SayEnv"}
