"""Bad input on the command line: one `error:` line that names the input and the fix, exit 1,
no traceback, nothing loaded and no stray run or output directory. One row per case."""

from __future__ import annotations

from pathlib import Path

import pytest

from spo_agents.cli import main

EVAL = ["eval", "--env", "math-python", "--model", "tiny-random", "--no-progress"]
TRAIN = ["train", "--env", "math-python"]
BAD_PROBLEMS = Path(__file__).parent / "envs" / "bad_problems"

CASES = [
    # (id, argv, words the message must contain)
    ("eval-unknown-env-option", [*EVAL, "--env-arg", "bogus=1"], ["`bogus`", "Its options"]),
    ("eval-env-option-typo", [*EVAL, "--env-arg", "num_problem=4"], ["Did you mean `num_problems`"]),
    ("eval-env-option-type", [*EVAL, "--env-arg", "num_problems=abc"], ["`num_problems`", "an integer", "'abc'"]),
    ("eval-temperature", [*EVAL, "--temperature", "-1"], ["`--temperature`", ">= 0"]),
    ("eval-top-p", [*EVAL, "--top-p", "2"], ["`--top-p`", "(0, 1]"]),
    ("eval-limit-negative", [*EVAL, "--limit", "-1"], ["`--limit`", ">= 1"]),
    ("eval-limit-zero", [*EVAL, "--limit", "0"], ["`--limit`", ">= 1"]),
    ("eval-max-new-tokens", [*EVAL, "--max-new-tokens", "0"], ["`--max-new-tokens`", ">= 1"]),
    ("eval-k", [*EVAL, "-k", "0"], ["`-k`", ">= 1"]),
    ("eval-out-is-a-file", [*EVAL, "--out", str(Path(__file__))], ["`--out`", "it is a file"]),
    ("eval-max-prompt-tokens", [*EVAL, "--max-prompt-tokens", "0"], ["`--max-prompt-tokens`", ">= 8"]),
    ("eval-missing-model-dir", ["eval", "--env", "math-python", "--model", "/nonexistent/model"], ["does not exist"]),
    ("train-unknown-env-option", [*TRAIN, "--env-arg", "bogus=1"], ["`bogus`"]),
    ("train-sandbox-typo", [*TRAIN, "sandbox.backend=lokal"], ["Did you mean `local`"]),
    ("train-d-half-nan", [*TRAIN, "tracker.d_half=.nan"], ["`tracker.d_half`", "finite"]),
    ("train-top-p", [*TRAIN, "rollout.top_p=0.5"], ["`rollout.top_p`", "full softmax"]),
    ("train-missing-model-dir", [*TRAIN, "--model", "./no-such-model"], ["does not exist"]),
    ("train-resume-missing-dir", ["train", "--resume", "/nonexistent/run"], ["not a run directory"]),
    ("train-config-not-utf8", [*TRAIN, "--config", str(Path(__file__).parent / "not_utf8_config.yaml")], ["not UTF-8"]),
    ("sandbox-timeout-zero", ["sandbox", "run", "-", "--timeout", "0"], ["`--timeout`", "> 0", "got 0"]),
    ("sandbox-timeout-negative", ["sandbox", "run", "-", "--timeout", "-1"], ["`--timeout`", "> 0", "got -1"]),
    (
        "sandbox-code-not-utf8",
        ["sandbox", "run", str(Path(__file__).parent / "sandboxes" / "not_utf8_code.txt")],
        ["not_utf8_code.txt", "not UTF-8", "save it as UTF-8"],
    ),
    ("eval-json-not-utf8", [*EVAL, "--env-arg", f"dataset_path={BAD_PROBLEMS}/latin1.json"], ["latin1.json", "UTF-8"]),
    (
        "eval-parquet-corrupt",
        [*EVAL, "--env-arg", f"dataset_path={BAD_PROBLEMS}/truncated.parquet"],
        ["truncated.parquet", "not a readable Parquet file", "write it again"],
    ),
    (
        "eval-jsonl-row-not-utf8",
        [*EVAL, "--env-arg", f"dataset_path={BAD_PROBLEMS}/latin1_row.jsonl"],
        ["latin1_row.jsonl:2", "not UTF-8", "skip_bad"],
    ),
    (
        "eval-reused-problem-id",
        [*EVAL, "--env-arg", f"dataset_path={BAD_PROBLEMS}/reused_id.jsonl"],
        ["reused_id.jsonl:2", "id `1` is already used by line 1", "skip_bad"],
    ),
    ("eval-split-unknown", [*EVAL, "--split", "every"], ["`split`", "`all` (every row"]),
]


@pytest.mark.parametrize("argv, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error_line_and_leaves_nothing_behind(argv, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if argv[0] == "train":
        if "--resume" not in argv:  # options first, then the dotted overrides (`section.key=value`)
            dotted = [a for a in argv if "=" in a and "." in a.split("=", 1)[0] and not a.startswith("-")]
            opts = [a for a in argv if a not in dotted]
            argv = [*opts, *dotted, "logging.progress=false", f"train.output_dir={tmp_path / 'runs'}"]
    elif argv[0] == "eval" and "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "out")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()  # nothing half-written
    assert not Path(tmp_path / "runs" / "eval").exists()


def test_resume_over_damaged_transcripts_is_one_error_line_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import spo_agents.rollout.policy as policies

    out = tmp_path / "out"
    out.mkdir()
    row = b'{"problem_id": "caf\xe9", "sample_index": 0}\n'  # Latin-1, not UTF-8
    (out / "transcripts.jsonl").write_bytes(b"\n" + row + b"\n")
    loaded = []
    monkeypatch.setattr(policies, "make_policy", lambda *a, **k: loaded.append(a) or pytest.fail("model loaded"))
    assert main([*EVAL, "--out", str(out), "--resume"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "transcripts.jsonl:2" in lines[0] and "utf-8" in lines[0].lower(), lines[0]
    assert not loaded
    assert (out / "transcripts.jsonl").read_bytes() == b"\n" + row + b"\n"  # nothing lost
