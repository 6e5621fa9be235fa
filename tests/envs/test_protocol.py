"""The environment boundary: `TextEnv` is what rollouts and evaluation read, `envs.make` records
the registered id the Gymnasium way, and a plugin that breaks the contract gets a clear error."""

from __future__ import annotations

import re
from pathlib import Path

import gymnasium as gym
import pytest

from spo_agents import envs
from spo_agents.envs.base import MultiTurnEnv, StepOutcome
from spo_agents.envs.protocol import TextEnv, protocol_problems
from spo_agents.errors import EnvError
from spo_agents.types import Problem

ROOT = Path(__file__).resolve().parents[2]
READERS = [
    "spo_agents/rollout/collector.py",
    "spo_agents/rollout/episode.py",
    "spo_agents/evaluation/runner.py",
    "spo_agents/evaluation/rescore.py",
]


class PlainEnv(gym.Env):
    """A Gymnasium env that is not a text env: no stop sequences, no problem ids."""

    def reset(self, *, seed=None, options=None):
        return [{"role": "user", "content": "hi"}], {}

    def step(self, action):
        return "", 0.0, True, False, {}


class TextReset(MultiTurnEnv):
    def __init__(self, split="train", **kwargs):
        super().__init__([Problem("p/1", "Say hi.", "hi")], **kwargs)

    def _reset_episode(self, problem):
        return problem.prompt  # a string, not chat messages

    def _step_episode(self, action):
        return StepOutcome("", 1.0, terminated=True)


@pytest.mark.parametrize("path", READERS)
def test_rollout_and_evaluation_do_not_probe_envs(path):
    source = (ROOT / path).read_text(encoding="utf-8")
    assert not re.search(r"\b(getattr|hasattr)\(\s*env\b", source), f"{path} probes the env instead of using TextEnv"


def test_make_sets_the_gymnasium_spec_with_the_registered_id():
    env = envs.make("countdown-python", split="test", num_problems=3)
    try:
        assert isinstance(env.unwrapped.spec, gym.envs.registration.EnvSpec)
        assert env.spec.id == "countdown-python-v0" == env.env_id
        assert env.spec.kwargs["num_problems"] == 3
        assert isinstance(env, TextEnv) and protocol_problems(env) == []
    finally:
        env.close()


def test_an_env_built_directly_names_its_class_as_an_import_path():
    from spo_agents.envs.countdown import CountdownEnv

    env = CountdownEnv("test", num_problems=2)
    try:
        assert env.spec is None and env.env_id == "spo_agents.envs.countdown:CountdownEnv"
    finally:
        env.close()


def test_make_takes_the_import_path_form_and_records_it():
    env = envs.make("spo_agents.envs.countdown:CountdownEnv", split="test", num_problems=2)
    try:
        assert env.env_id == "spo_agents.envs.countdown:CountdownEnv"
        assert envs.spec("spo_agents.envs.countdown:CountdownEnv").source == "an import path"
    finally:
        env.close()


def test_a_plain_gymnasium_env_is_refused_with_what_it_lacks():
    problems = protocol_problems(PlainEnv())
    text = " ".join(problems)
    for member in ("stop_sequences", "reply_role", "env_id", "problem_ids", "answers_equivalent"):
        assert member in text
    with pytest.raises(EnvError, match="does not provide what rollouts need.*stop_sequences"):
        envs.make(f"{__name__}:PlainEnv")


def test_a_reset_that_returns_text_is_a_clear_error():
    env = TextReset()
    with pytest.raises(EnvError, match=r"_reset_episode` must return the first chat messages.*returned 'Say hi.'"):
        env.reset(seed=0)


def test_info_tool_calls_is_the_count_of_the_episode(fake_backend):
    from spo_agents.envs.math_python import MathPythonEnv

    env = MathPythonEnv(problems=[Problem("p", "1+1?", "2")], sandbox=fake_backend, one_shot=False)
    _, info = env.reset(seed=0)
    assert info["tool_calls"] == 0
    _, _, _, _, info = env.step("<code>print(1)</code>")
    assert info["tool_calls"] == 1 and info["tool_call"].output == "1"
    _, _, _, _, info = env.step("<code>print(2)</code>")
    assert info["tool_calls"] == 2 and info["tool_call"].output == "2"
    env.close()


def test_options_passed_on_through_kwargs_are_still_checked():
    from spo_agents.envs.countdown import CountdownEnv
    from spo_agents.envs.options import check_options
    from spo_agents.errors import ConfigError

    check_options("countdown-python-v0", CountdownEnv, {"max_tool_calls": 2, "count": 3, "sandbox": "local"})
    with pytest.raises(ConfigError, match="no option `max_tool_call`.*`max_tool_calls`"):
        check_options("countdown-python-v0", CountdownEnv, {"max_tool_call": 2})
    with pytest.raises(ConfigError, match="`max_tool_calls` must be an integer"):
        check_options("countdown-python-v0", CountdownEnv, {"max_tool_calls": "many"})
