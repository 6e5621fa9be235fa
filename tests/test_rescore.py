"""`spo-agent rescore`: saved episodes re-scored with the env's current checker."""

from __future__ import annotations

import json

import pytest
import yaml

from spo_agents import envs
from spo_agents.cli import main
from spo_agents.envs.answers import AnswerChecker, CheckResult
from spo_agents.errors import ConfigError
from spo_agents.evaluation.rescore import completion_segments, rescore_eval_dir, rescore_path
from spo_agents.evaluation.runner import RESULTS, SETTINGS, TRANSCRIPTS, compute_report
from spo_agents.trajectories import TrajectoryLog
from spo_agents.types import ToolCall, Trajectory, write_jsonl


def _reply(output: str) -> str:
    return f"\n<interpreter>\n{output}\n</interpreter>\n"


def _sample(pid, i, completion, reward, answer, check="string", calls=(), env_id="math-python-v0", error=None):
    info = {"completion": completion, "answer": answer, "correct": reward == 1.0, "check": check}
    tool_calls = [ToolCall(code=c, output=o, ok=True) for c, o in calls]
    t = Trajectory(pid, env_id, [], [], [], [], reward, terminated=True, tool_calls=tool_calls, info=info, error=error)
    t.group_id, t.sample_index = pid, i
    return t


@pytest.fixture(scope="module")
def problems():
    env = envs.make("math-python", split="test")
    try:
        return [env.get_problem(pid) for pid in env.problem_ids[:3]]
    finally:
        env.close()


def _eval_dir(path, problems, env_id="math-python-v0"):
    p0, p1, p2 = problems
    boxed2 = "\\boxed{" + p2.answer + "}"
    samples = [
        _sample(
            p0.id,
            0,
            f"<code>print(1)</code>{_reply(p0.answer)}So \\boxed{{{p0.answer}}}.",
            1.0,
            p0.answer,
            calls=[("print(1)", p0.answer)],
            env_id=env_id,
        ),
        _sample(p0.id, 1, f"It is \\boxed{{{p0.answer}.0}}", 1.0, f"{p0.answer}.0", "number", env_id=env_id),
        _sample(p1.id, 0, "\\boxed{1}", 0.0, "1", "number", env_id=env_id),
        # saved as wrong by an older checker that timed out; the answer is the reference itself
        _sample(p1.id, 1, f"\\boxed{{{p1.answer}}}", 0.0, p1.answer, "timeout", env_id=env_id),
        # the reference appears only inside the interpreter's reply, which is not the model's answer
        _sample(
            p2.id,
            0,
            f"<code>print(x)</code>{_reply(boxed2)}I do not know.",
            0.0,
            None,
            "empty",
            calls=[("print(x)", boxed2)],
            env_id=env_id,
        ),
        _sample(p2.id, 1, "", 0.0, None, env_id=env_id, error="sandbox failure: gone"),
    ]
    path.mkdir(parents=True, exist_ok=True)
    write_jsonl(path / TRANSCRIPTS, samples)
    by_key = {(t.problem_id, t.sample_index): t for t in samples}
    report = compute_report(by_key, [p.id for p in problems], 2, lambda a, b: a == b)
    (path / RESULTS).write_text(json.dumps(report.to_dict()), encoding="utf-8")
    (path / SETTINGS).write_text(json.dumps({"env": env_id, "split": "test"}), encoding="utf-8")
    return path


def _string_only(self, pred, ref, timeout_s=None):
    """A stricter checker: only the exact reference text counts."""
    ok = pred is not None and str(pred).strip() == str(ref).strip()
    return CheckResult(ok, "string-only")


def test_rescore_reports_exactly_the_flipped_samples(tmp_path, problems, monkeypatch):
    d = _eval_dir(tmp_path / "ev", problems)
    old_results = (d / RESULTS).read_text()
    monkeypatch.setattr(AnswerChecker, "check", _string_only)
    report = rescore_eval_dir(d)
    p0, p1, _ = problems
    flips = {(f.problem_id, f.sample): (f.old_reward, f.new_reward, f.old_answer, f.new_answer) for f in report.flips}
    assert flips == {
        (p0.id, "1"): (1.0, 0.0, f"{p0.answer}.0", f"{p0.answer}.0"),
        (p1.id, "1"): (0.0, 1.0, p1.answer, p1.answer),
    }
    assert all("verdict changed" in f.reason for f in report.flips)
    assert report.scored == 5 and sum(report.skipped.values()) == 1
    assert (d / RESULTS).read_text() == old_results  # never overwritten
    new = json.loads((d / "results.rescored.json").read_text())
    # per problem: p0 1 of 2, p1 1 of 2, p2 0 of 1 valid sample
    assert new["avg_at_k"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert [f["sample"] for f in new["rescore"]["flips"]] == ["1", "1"]
    again = rescore_eval_dir(d)
    assert again.written.endswith("results.rescored-2.json")


def test_an_unchanged_checker_flips_nothing_but_the_saved_mistake(tmp_path, problems):
    d = _eval_dir(tmp_path / "ev", problems)
    report = rescore_eval_dir(d, write=False)
    # only the sample an older checker got wrong flips back; the boxed text in the reply stays out
    assert [(f.problem_id, f.sample, f.new_reward) for f in report.flips] == [(problems[1].id, "1", 1.0)]


def test_another_env_is_refused_and_another_version_is_a_notice(tmp_path, problems, monkeypatch):
    monkeypatch.setattr(AnswerChecker, "check", _string_only)
    d = _eval_dir(tmp_path / "ev", problems)
    with pytest.raises(ConfigError, match="another environment"):
        rescore_eval_dir(d, env_id="countdown-python")
    d9 = _eval_dir(tmp_path / "ev9", problems, env_id="math-python-v9")
    report = rescore_eval_dir(d9, write=False)
    assert report.notices == ["notice: episodes saved with `math-python-v9` are re-scored with `math-python-v0`"]
    assert len(report.flips) == 2


def test_cli_prints_both_answers_of_each_flip(tmp_path, problems, monkeypatch, capsys):
    monkeypatch.setattr(AnswerChecker, "check", _string_only)
    d = _eval_dir(tmp_path / "ev", problems)
    assert main(["rescore", str(d)]) == 0
    out = capsys.readouterr().out
    assert "5 re-scored, 2 flipped (1 now correct, 1 now wrong)" in out
    assert f"{problems[0].id} [1]: 1 -> 0  answer '{problems[0].answer}.0' -> '{problems[0].answer}.0'" in out


class CharTokenizer:
    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)


def test_training_trajectories_are_rescored_from_their_model_segments(tmp_path, monkeypatch):
    env = envs.make("math-python", split="train")
    p = env.get_problem(env.problem_ids[0])
    env.close()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"env": {"id": "math-python", "split": "train", "kwargs": {}}}))
    texts = [f"\\boxed{{{p.answer}}}", f"\\boxed{{{p.answer}.0}}"]
    trajs = []
    for text in texts:
        ids = [ord(c) for c in text]
        info = {"answer": text[7:-1], "correct": True, "check": "number"}
        trajs.append(Trajectory(p.id, "math-python-v0", [1], ids, [1] * len(ids), [-0.1] * len(ids), 1.0, info=info))
    with TrajectoryLog(run) as log:
        log.record(1, trajs, [0.0, 0.0], [0.5, 0.5], [0.9, 0.9], CharTokenizer())
    monkeypatch.setattr(AnswerChecker, "check", _string_only)
    (report,) = rescore_path(run)
    assert report.kind == "train"
    assert [(f.sample, f.new_reward) for f in report.flips] == [("step 1 #1", 0.0)]
    assert report.before["accuracy"] == 1.0 and report.after["accuracy"] == 0.5
    assert (run / "trajectories" / "rescored.json").is_file()


def test_completion_segments_cut_out_env_replies():
    text = f"a <code>print(1)</code>{_reply('1')}b <code>x</code>{_reply('</code> tricky')}c"
    segs = completion_segments(text, ["1", "</code> tricky"])
    assert segs == [
        ("model", "a <code>print(1)</code>"),
        ("env", _reply("1")),
        ("model", "b <code>x</code>"),
        ("env", _reply("</code> tricky")),
        ("model", "c"),
    ]
    chat = "first<|im_end|>\n<|im_start|>user\nTry again.<|im_end|>\n<|im_start|>assistant\nsecond"
    assert [k for k, _ in completion_segments(chat)] == ["model", "env", "model"]
    assert completion_segments("") == [("model", "")]


def test_a_tool_env_rescores_with_the_verdict_of_its_episodes():
    from spo_agents.envs.countdown import CountdownEnv
    from spo_agents.evaluation.rescore import scorer_for
    from spo_agents.types import Problem

    numbers = {"numbers": [3, 5, 25, 50]}
    problem = Problem("countdown/3-5-25-50/110", "Numbers: [3, 5, 25, 50]. Target: 110.", "110", numbers)
    env = CountdownEnv(problems=[problem], sandbox=None)
    score = scorer_for(env)
    right = score(problem, ["Let me see.", "\\boxed{(25 - 3) * 5}"])
    assert (right.reward, right.correct, right.answer, right.check) == (1.0, True, "(25 - 3) * 5", "ok")
    reused = score(problem, ["\\boxed{50 + 50 + 5 + 5}"])
    assert (reused.reward, reused.check) == (0.0, "number_reused") and "50 is used 2 times" in reused.detail


def test_an_env_whose_scoring_runs_code_is_refused():
    from spo_agents.envs.reasoning_gym_env import ReasoningGymEnv
    from spo_agents.evaluation.rescore import scorer_for

    env = ReasoningGymEnv("test", num_problems=2, sandbox=None)
    with pytest.raises(ConfigError, match="cannot be re-scored from saved text"):
        scorer_for(env)
