"""`spo-agent eval` on a held-out file: what the problems are out of, `--split all`, and the
per-turn token budget when the model runs in-process on CPU."""

from __future__ import annotations

import json

import pytest

from spo_agents.cli import main
from spo_agents.cli.eval import CPU_MAX_NEW_TOKENS, MAX_NEW_TOKENS, default_max_new_tokens
from spo_agents.envs.problems import clear_cache, content_split

ROWS = [{"id": i, "prompt": f"What is {i} + {i + 7}?", "answer": str(2 * i + 7)} for i in range(50)]
IN_TEST = sum(content_split(r["prompt"], r["answer"], 0.1) == "test" for r in ROWS)


@pytest.fixture()
def held_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    clear_cache()
    (tmp_path / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    yield tmp_path
    clear_cache()


def run_eval(*extra):
    base = ["eval", "--env", "math-python", "--model", "tiny-random", "--no-progress", "-k", "1"]
    budget = ["--max-episode-tokens", "1", "--env-arg", "dataset_path=held.jsonl"]
    return main([*base, *budget, *extra])


@pytest.mark.parametrize(
    "backend, cuda, expected",
    [("hf", False, CPU_MAX_NEW_TOKENS), ("hf", True, MAX_NEW_TOKENS), ("openai", False, MAX_NEW_TOKENS)],
)
def test_the_token_default_is_cpu_sized_only_for_an_in_process_model_on_cpu(backend, cuda, expected):
    assert default_max_new_tokens(backend, cuda) == expected
    assert CPU_MAX_NEW_TOKENS < MAX_NEW_TOKENS


def test_eval_of_one_file_says_what_the_test_split_is_out_of(held_out, capsys):
    assert 0 < IN_TEST < len(ROWS)
    assert run_eval("--max-new-tokens", "1", "--out", "o1") == 0
    out = capsys.readouterr().out
    assert f"{IN_TEST} problems (split `test` of 50 rows read" in out
    assert f"{50 - IN_TEST} hash into the other split" in out and "`--split all` evaluates every row" in out


def test_split_all_evaluates_every_row_and_the_cpu_default_is_recorded(held_out, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU default applies without a GPU")
    assert run_eval("--split", "all", "--limit", "2", "--out", "o2") == 0
    captured = capsys.readouterr()
    assert "2 problems (split `all` of 50 rows read)" in captured.out
    assert f"--max-new-tokens {CPU_MAX_NEW_TOKENS}" in captured.err
    settings = json.loads((held_out / "o2" / "settings.json").read_text(encoding="utf-8"))
    assert settings["sampling"]["max_new_tokens"] == CPU_MAX_NEW_TOKENS


def test_transcripts_record_the_registered_env_id(held_out):
    assert run_eval("--max-new-tokens", "1", "--limit", "1", "--out", "o3") == 0
    rows = [json.loads(line) for line in (held_out / "o3" / "transcripts.jsonl").read_text().splitlines()]
    assert rows and {r["env_id"] for r in rows} == {"math-python-v0"}


def test_a_prompt_over_the_limit_is_a_failed_sample_or_is_truncated(held_out, capsys):
    # every math-python prompt (system prompt, one-shot example, question) is far over 16 tokens
    assert run_eval("--max-new-tokens", "1", "--limit", "1", "--out", "o4", "--max-prompt-tokens", "16") == 1
    failed = [json.loads(line) for line in (held_out / "o4" / "transcripts.jsonl").read_text().splitlines()]
    assert failed and all("more than the limit of 16" in (r.get("error") or "") for r in failed)
    args = ["--max-new-tokens", "1", "--limit", "1", "--out", "o5", "--max-prompt-tokens", "16"]
    assert run_eval(*args, "--prompt-overflow", "truncate") == 0
    kept = [json.loads(line) for line in (held_out / "o5" / "transcripts.jsonl").read_text().splitlines()]
    assert kept and all(r.get("error") is None and r["info"]["prompt_cut_tokens"] > 0 for r in kept)
