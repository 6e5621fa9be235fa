"""`spo-agent check-env` catches what `train` would later fail on: an unversioned id, a constructor
without `split` / `**kwargs`, a `reset` of the wrong type; and it takes the `package.module:Class`
form that `eval` takes."""

from __future__ import annotations

from spo_agents.cli import main
from spo_agents.envs.base import MultiTurnEnv, StepOutcome
from spo_agents.envs.checker import check_env
from spo_agents.envs.plugin_checks import check_constructor, check_env_id
from spo_agents.types import Problem

PROBLEMS = [Problem("echo/1", "Say 'please'.", "please"), Problem("echo/2", "Say 'thanks'.", "thanks")]


class EchoEnv(MultiTurnEnv):
    """Say the word: reward 1 when the reply contains it."""

    def __init__(self, split="train", **kwargs):
        super().__init__(PROBLEMS, max_turns=3, **kwargs)

    def _reset_episode(self, problem):
        return [{"role": "user", "content": problem.prompt}]

    def _step_episode(self, action):
        if self.problem.answer in action.lower():
            return StepOutcome("", 1.0, terminated=True, info={"answer": self.problem.answer, "correct": True})
        return StepOutcome("Not quite. Try again.")


class NoSplitEnv(EchoEnv):
    def __init__(self):
        super().__init__()


class TextResetEnv(EchoEnv):
    def _reset_episode(self, problem):
        return problem.prompt


def test_unversioned_ids_fail_with_the_versioned_name_to_use():
    bad = check_env_id("echo")
    assert not bad.passed and "`echo-v0`" in bad.detail
    assert check_env_id("echo-v0").passed and check_env_id("my.pkg.env:EchoEnv").passed


def test_a_constructor_without_split_or_kwargs_fails():
    bad = check_constructor(NoSplitEnv)
    assert not bad.passed and "`split`" in bad.detail and "**kwargs" in bad.detail
    assert check_constructor(EchoEnv).passed


def test_a_reset_that_returns_text_fails_with_what_reset_must_return():
    results = {r.name: r for r in check_env(TextResetEnv, env_id="echo-v0", entry=TextResetEnv)}
    assert not results["gymnasium-api"].passed
    assert "must return the first chat messages" in results["gymnasium-api"].detail


def test_a_good_env_passes_every_check_but_the_token_contract():
    results = check_env(EchoEnv, env_id="echo-v0", entry=EchoEnv)
    failed = {r.name: r.detail for r in results if not r.passed}
    assert set(failed) == {"token-contract"}, failed  # no tokenizer given


def test_cli_takes_the_import_path_form_and_reports_the_constructor(capsys):
    code = main(["check-env", f"{__name__}:NoSplitEnv"])
    out = capsys.readouterr().out
    assert code == 1
    row = next(line for line in out.splitlines() if line.strip().startswith("constructor"))
    assert "FAIL" in row and "does not take `split`" in row
