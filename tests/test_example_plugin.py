"""The example plugin package (`examples/spo-env-guess`) installs with pip and, without any change
to this repository, appears in `spo-agent envs`, passes `spo-agent check-env` and evaluates.

The package is installed with `pip install --no-deps --target DIR` and the CLI runs in a
subprocess with `PYTHONPATH=DIR`, so its entry point is discovered from its `dist-info` exactly
as after a normal install, and nothing is left in the project's environment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "spo-env-guess"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    source = root / "src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = root / "site"
    install = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-input",
        "--target",
        str(target),
        str(source),
    ]
    # Build with the setuptools of this environment (offline); fall back to pip's isolated build
    # environment (fetches setuptools from PyPI) when this one cannot build the wheel.
    proc = subprocess.run(install + ["--no-build-isolation"], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        shutil.rmtree(target, ignore_errors=True)
        retry = subprocess.run(install, capture_output=True, text=True, timeout=300)
        assert retry.returncode == 0, proc.stderr + retry.stderr
    return target


def spo_agent(plugin_path, *args, timeout=300):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    return subprocess.run(
        [sys.executable, "-m", "spo_agents", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=plugin_path,
    )


def test_plugin_is_not_there_without_the_install():
    proc = subprocess.run(
        [sys.executable, "-m", "spo_agents", "envs", "--json"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "guess-number-v0" not in {row["id"] for row in json.loads(proc.stdout)}


def test_installed_plugin_is_listed(plugin_path):
    listed = spo_agent(plugin_path, "envs", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["id"]: row for row in json.loads(listed.stdout)}
    assert rows["guess-number-v0"]["source"] == "package `spo-env-guess`"
    assert "math-python-v0" in rows  # the built-ins are still there


def test_installed_plugin_env_passes_the_checks(plugin_path, monkeypatch):
    from spo_agents.envs.checker import check_env, format_results, load_tokenizer

    monkeypatch.syspath_prepend(str(plugin_path))
    from spo_env_guess.env import GuessNumberEnv

    results = check_env(GuessNumberEnv, tokenizer=load_tokenizer(), episodes=1)
    assert all(r.passed for r in results), format_results("guess-number-v0", results)


def test_guess_number_rewards_the_right_guess_and_hints_otherwise(plugin_path, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_path))
    from spo_env_guess.env import GuessNumberEnv

    env = GuessNumberEnv("test")
    env.reset(seed=0, options={"problem_id": "guess/100/30"})
    assert env.step("\\boxed{50}")[0].startswith("Lower.")
    assert env.step("maybe 20?")[0].startswith("I found no guess")
    assert env.step("\\boxed{20}")[0].startswith("Higher.")
    obs, reward, terminated, truncated, info = env.step("\\boxed{30}")
    assert (obs, reward, terminated, truncated) == ("", 1.0, True, False) and info["guesses"] == 4


@pytest.mark.slow
def test_installed_plugin_passes_check_env_from_the_command_line(plugin_path):
    checked = spo_agent(plugin_path, "check-env", "guess-number", "--episodes", "1")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "check-env guess-number-v0" in checked.stdout and "9/9 checks passed" in checked.stdout


@pytest.mark.slow
def test_installed_plugin_runs_a_short_evaluation(plugin_path, tmp_path):
    out = tmp_path / "eval"
    proc = spo_agent(
        plugin_path,
        "eval",
        "--env",
        "guess-number",
        "--backend",
        "hf",
        "--model",
        "tiny-random",
        "-k",
        "2",
        "--limit",
        "2",
        "--max-new-tokens",
        "16",
        "--max-episode-tokens",
        "64",
        "--out",
        str(out),
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["num_problems"] == 2 and results["num_samples"] == 4 and results["errors"] == 0
    assert [p["problem_id"] for p in results["problems"]] == ["guess/100/10", "guess/100/20"]  # the test split
    lines = (out / "transcripts.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["problem_id"] for line in lines) == ["guess/100/10"] * 2 + ["guess/100/20"] * 2
