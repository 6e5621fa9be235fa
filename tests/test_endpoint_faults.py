"""`spo-agent eval` against a real OpenAI-compatible server (`transformers serve` on the tiny model)
behind a fault-injecting proxy (`fault_proxy.FaultProxy`): HTTP 500, 429 with `Retry-After`,
connections dropped before the reply or mid-body, slow replies, and a server that goes away and
comes back. Every sample must finish without `--resume`, once, with the metrics of the saved
transcripts; at temperature 0 the results equal those of a run without faults.

Also here: the errors that must come before any sample (a wrong `--model`, a base URL without
`/v1`), the exit status when samples fail for good, and the lock on `--out`.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fault_proxy import FaultProxy
from test_eval_server import _maj

from spo_agents.cli import main

# `served_model` (tests/conftest.py): `transformers serve` on the tiny model, once for this module

PROBLEMS, K = 4, 2
# greedy, short turns without stop strings (`transformers serve` spends about a second per request
# preparing them), quick retries (the defaults are 0.5 s / 10 s): the module runs in well under a minute
FAST = [
    "--env-arg",
    "stop=[]",
    "--temperature",
    "0",
    "--max-new-tokens",
    "6",
    "--max-episode-tokens",
    "40",
    "--concurrency",
    "4",
    "--backoff",
    "0.05",
    "--max-backoff",
    "0.5",
    "--no-progress",
]


@pytest.fixture(autouse=True)
def _say_env_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def _eval(url: str, model: str, out: Path, *extra: str, problems: int = PROBLEMS, k: int = K) -> int:
    return main(
        [
            "eval",
            "--env",
            "say_env:SayEnv",
            "--base-url",
            url,
            "--model",
            model,
            "-k",
            str(k),
            "--limit",
            str(problems),
            "--out",
            str(out),
            *FAST,
            *extra,
        ]
    )


def _rows(out: Path) -> list[dict]:
    path = out / "transcripts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _recompute(rows: list[dict]) -> dict:
    """avg@k, pass@k and maj@k from the transcripts alone (docs/algorithm.md section 6, paper App. D):
    pass@j is the share of j-subsets of a problem's valid samples with a correct one; an episode
    cut off by a budget does not vote in maj@k; failed samples are left out."""
    by_pid: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["sample_index"]):
        if r["error"] is None:
            by_pid.setdefault(r["problem_id"], []).append(r)
    scored = list(by_pid.values())
    correct = [[bool(r["info"]["correct"]) for r in v] for v in scored]
    answers = [[None if r["truncated"] else r["info"]["answer"] for r in v] for v in scored]

    def pass_at(c: list[bool], j: int) -> float:
        subsets = list(itertools.combinations(c, j))
        return sum(any(s) for s in subsets) / len(subsets)

    out = {
        "avg_at_k": sum(sum(c) / len(c) for c in correct) / len(correct),
        "maj_at_k": sum(_maj(a, c) for a, c in zip(answers, correct)) / len(correct),
        "num_samples": sum(len(c) for c in correct),
    }
    for j in (1, 2):  # a mean over no problem is reported as 0
        complete = [c for c in correct if len(c) >= j]
        out[f"pass@{j}"] = sum(pass_at(c, j) for c in complete) / max(1, len(complete))
    return out


def _metrics(results: dict) -> dict:
    """The overall metrics of a `results.json`, flat."""
    flat = {k: results[k] for k in ("avg_at_k", "maj_at_k", "num_samples")}
    flat.update({f"pass@{j}": v for j, v in results["pass_at_k"].items()})
    return flat


def _completions(rows: list[dict]) -> dict:
    return {(r["problem_id"], r["sample_index"]): r["info"]["completion"] for r in rows}


@pytest.fixture(scope="module")
def clean_run(served_model, tmp_path_factory):
    """The reference: the same evaluation straight against the server, no proxy."""
    url, model = served_model
    out = tmp_path_factory.mktemp("clean")
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        assert _eval(url, model, out) == 0
    finally:
        sys.path.remove(str(Path(__file__).parent))
    return json.loads((out / "results.json").read_text()), _rows(out)


@pytest.fixture
def proxy_for(served_model):
    proxies: list[FaultProxy] = []

    def make(**kw) -> FaultProxy:
        upstream = int(served_model[0].rsplit(":", 1)[1].split("/")[0])
        proxies.append(FaultProxy(upstream, **kw).start())
        return proxies[-1]

    yield make
    for p in proxies:
        p.stop()


def _assert_complete_and_consistent(out: Path, clean_run) -> dict:
    rows = _rows(out)
    keys = [(r["problem_id"], r["sample_index"]) for r in rows]
    assert len(keys) == len(set(keys)) == PROBLEMS * K  # every sample once: no duplicate records
    assert all(r["error"] is None for r in rows)
    saved = json.loads((out / "results.json").read_text())
    assert _metrics(saved) == pytest.approx(_recompute(rows))
    assert saved["failed_samples"] == [] and saved["errors"] == 0
    clean, clean_rows = clean_run
    assert _metrics(saved) == pytest.approx(_metrics(clean))  # greedy: faults change nothing
    assert _completions(rows) == _completions(clean_rows)
    return saved


def test_eval_through_30_percent_faults_finishes_every_sample(served_model, clean_run, proxy_for, tmp_path, capsys):
    proxy = proxy_for(rate=0.3, seed=1)  # seed 1 faults 6 of the first 18 POSTs (2 probes + 16 turns): every kind
    _, model = served_model
    start = time.monotonic()
    code = _eval(proxy.base_url, model, tmp_path, "--max-retries", "8")
    elapsed = time.monotonic() - start
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert set(proxy.faults) == {"500", "429", "drop", "cut", "delay"}  # each kind was met at least once
    assert proxy.posts >= 2 * PROBLEMS * K  # two turns per sample, plus the probes and the retries
    assert 0.25 <= sum(proxy.faults.values()) / proxy.posts <= 0.4  # the rate actually met
    _assert_complete_and_consistent(tmp_path, clean_run)
    failures = sum(n for kind, n in proxy.faults.items() if kind != "delay")
    assert f", {failures} retries" in captured.out  # the summary counts the retries
    print(f"\n30% faults: {proxy.posts} POSTs, faults {dict(proxy.faults)}, {elapsed:.1f} s", file=sys.stderr)


def test_eval_survives_a_server_restart_within_the_wait(served_model, clean_run, proxy_for, tmp_path, capsys, caplog):
    proxy = proxy_for(rate=0.0, outage_after=6, outage_s=3.0)
    _, model = served_model
    code = _eval(proxy.base_url, model, tmp_path, "--server-wait", "30")
    assert code == 0, capsys.readouterr().err[-3000:]
    assert proxy.outages == 1
    _assert_complete_and_consistent(tmp_path, clean_run)
    assert "refuses connections" in caplog.text and "answers again after" in caplog.text


def test_a_server_gone_for_longer_than_the_wait_fails_the_rest_and_the_exit_status(
    served_model, proxy_for, tmp_path, capsys
):
    """Samples that still fail after the retries are reported: non-zero exit, `failed_samples`,
    and metrics over the samples that finished."""
    outage_s = 900.0  # never back within the test (whose own timeout is 300 s)
    proxy = proxy_for(rate=0.0, outage_after=12, outage_s=outage_s)
    _, model = served_model
    start = time.monotonic()
    code = _eval(proxy.base_url, model, tmp_path, "--server-wait", "1")
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 1
    assert elapsed < outage_s  # bounded by --server-wait, not by the server's return
    rows = _rows(tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    failed = [r for r in rows if r["error"] is not None]
    assert 0 < len(failed) < PROBLEMS * K and len(rows) == PROBLEMS * K
    listed = {(f["problem_id"], f["sample_index"]) for f in saved["failed_samples"]}
    assert listed == {(r["problem_id"], r["sample_index"]) for r in failed}
    assert all("--server-wait" in f["error"] for f in saved["failed_samples"])
    assert _metrics(saved) == pytest.approx(_recompute(rows))  # over the survivors
    assert f"{len(failed)} of {PROBLEMS * K} samples failed for infrastructure reasons after retries" in err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_wrong_model_is_one_clear_error_before_any_sample(served_model, tmp_path, capsys):
    url, model = served_model
    code = _eval(url, "no-such-model", tmp_path, "--tokenizer", model)
    line = _one_error_line(capsys.readouterr().err)
    assert code == 1
    assert "does not serve a model named `no-such-model`" in line and f"`{model}`" in line
    assert "Server is pinned to" in line  # the server's own words are kept
    assert _rows(tmp_path) == []


def test_a_base_url_without_v1_is_one_clear_error_before_any_sample(served_model, tmp_path, capsys):
    url, model = served_model
    root = url.removesuffix("/v1")
    code = _eval(root, model, tmp_path)
    line = _one_error_line(capsys.readouterr().err)
    assert code == 1
    assert f"pass `--base-url {root}/v1`" in line and "text" not in line
    assert _rows(tmp_path) == []


def test_a_second_eval_into_the_same_out_is_refused(served_model, proxy_for, tmp_path, capsys):
    """While one eval runs, the lock on `--out` is held: another process cannot take it, and a
    second eval into the same directory is refused with a clear error."""
    from spo_agents.cli.eval import LOCK

    url, model = served_model
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "f.write('pid 424242'); f.flush(); print('locked', flush=True); time.sleep(60)",
            str(tmp_path / LOCK),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = _eval(url, model, tmp_path)
        line = _one_error_line(capsys.readouterr().err)
        assert code == 1 and "another `spo-agent eval` (pid 424242) is writing into" in line
        assert _rows(tmp_path) == []
    finally:
        holder.kill()
        holder.wait()

    seen: list[int] = []

    def try_the_lock(n: int) -> None:  # runs while the eval below is in progress
        if n == 1:
            probe = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "import fcntl, sys; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)",
                    str(tmp_path / LOCK),
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            seen.append(probe.returncode)

    proxy = proxy_for(rate=0.0, on_post=try_the_lock)
    assert _eval(proxy.base_url, model, tmp_path, problems=1, k=1) == 0
    assert seen and seen[0] != 0  # the running eval held the lock
