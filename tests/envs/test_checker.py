"""check-env: every check passes on a well-behaved env and fails, with a reason, on a broken one."""

from __future__ import annotations

import random

import pytest

from spo_agents.cli import main
from spo_agents.envs.base import MultiTurnEnv, StepOutcome
from spo_agents.envs.checker import (
    check_determinism,
    check_env,
    check_garbage_actions,
    check_gymnasium_api,
    check_problem_selection,
    check_stop_sequences,
    format_results,
    load_tokenizer,
    scripted_actions,
)
from spo_agents.envs.token_contract import check_token_contract
from spo_agents.types import Problem

# A Qwen3-style template: assistant turns before the last user message lose their <think> block.
QWEN3_LIKE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- set content = m['content'] -%}"
    "{%- if m['role'] == 'assistant' and loop.index0 < ns.last_user and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
# Qwen3's other habit: the last assistant turn is re-rendered as `<think>\n{reasoning}\n</think>\n\n{rest}`
# (an empty block when there is no reasoning), so generated text is not kept verbatim.
QWEN3_LAST_TURN = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' and loop.last -%}"
    "{%- if '</think>' in m['content'] -%}"
    "{%- set reasoning = m['content'].split('</think>')[0].split('<think>')[-1].strip() -%}"
    "{%- set rest = m['content'].split('</think>')[-1].lstrip('\\n') -%}"
    "{%- else -%}{%- set reasoning = '' -%}{%- set rest = m['content'] -%}{%- endif -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + rest + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
# A template that strips whitespace around assistant content (the generated text is not kept verbatim).
TRIMMING = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + (m['content'] | trim) + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

PROBLEMS = [Problem("p0", "Say hi."), Problem("p1", "Say bye."), Problem("p2", "Count to three.")]


class ChatEnv(MultiTurnEnv):
    """Well-behaved: user-turn feedback until the model writes \\boxed{...}."""

    reply_role = "user"

    def __init__(self, **kwargs):
        super().__init__(PROBLEMS, max_turns=4)

    def _reset_episode(self, problem):
        return [{"role": "user", "content": problem.prompt}]

    def _step_episode(self, action):
        if "\\boxed{" in action:
            return StepOutcome("", 1.0, True, False, {"answer": action})
        return StepOutcome(f"You wrote {len(action)} characters; answer in \\boxed{{}}.")


class ToolEnv(MultiTurnEnv):
    """Well-behaved in-turn tool env: `<code>...</code>` gets an interpreter reply."""

    stop_sequences = ["</code>"]

    def __init__(self, **kwargs):
        super().__init__(PROBLEMS, max_turns=6)

    def _reset_episode(self, problem):
        return [{"role": "user", "content": problem.prompt}]

    def _step_episode(self, action):
        if action.rstrip().endswith("</code>"):
            return StepOutcome("\n<interpreter>\nok\n</interpreter>\n")
        return StepOutcome("", 0.0, True, False)


class GlobalRandomEnv(ChatEnv):
    def _step_episode(self, action):
        return StepOutcome(f"noise {random.random()}")


class LeakyEnv(ChatEnv):
    episodes = 0

    def _reset_episode(self, problem):
        self.episodes += 1  # state that survives reset
        return [{"role": "user", "content": f"{problem.prompt} (episode {self.episodes})"}]


class FragileEnv(ChatEnv):
    def _step_episode(self, action):
        action.encode("ascii")  # raises on non-ASCII model output
        return super()._step_episode(action)


class EndlessEnv(ChatEnv):
    def __init__(self, **kwargs):
        MultiTurnEnv.__init__(self, PROBLEMS, max_turns=None)

    def _step_episode(self, action):
        return StepOutcome("go on")


class BadObservationEnv(ChatEnv):
    def _step_episode(self, action):
        return StepOutcome(None)  # type: ignore[arg-type]


class IgnoresProblemIdEnv(ChatEnv):
    def reset(self, *, seed=None, options=None):
        return super().reset(seed=seed)


class MergingReplyEnv(ToolEnv):
    def _step_episode(self, action):
        if action.rstrip().endswith("</code>"):
            return StepOutcome(">> ok\n")  # `>` + `>>` encode as other tokens than `>>>`
        return StepOutcome("", 0.0, True, False)


class StrictStopEnv(ToolEnv):
    def _step_episode(self, action):
        if action.endswith("</code>"):  # trailing whitespace after the stop string ends the episode
            return StepOutcome("\n<interpreter>\nok\n</interpreter>\n")
        return StepOutcome("", 0.0, True, False)


class SilentToolEnv(ToolEnv):
    def _step_episode(self, action):
        if action.rstrip().endswith("</code>"):
            return StepOutcome("")
        return StepOutcome("", 0.0, True, False)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def qwen3_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tpl") / "qwen3-like.jinja"
    path.write_text(QWEN3_LIKE)
    return load_tokenizer(chat_template=str(path))


@pytest.mark.parametrize("env_cls", [ChatEnv, ToolEnv])
def test_well_behaved_envs_pass_every_check(env_cls, tokenizer):
    results = check_env(env_cls, tokenizer=tokenizer, episodes=2)
    assert [r.name for r in results] == [
        "text-env",
        "gymnasium-api",
        "problem-selection",
        "determinism",
        "garbage-actions",
        "stop-sequences",
        "token-contract",
    ]
    assert all(r.passed for r in results), format_results(env_cls.__name__, results)


def test_global_randomness_fails_determinism():
    r = check_determinism(GlobalRandomEnv, seed=0, episodes=1)
    assert not r.passed and "`observation` differs" in r.detail and "np_random" in r.detail


def test_state_leaking_across_resets_fails_determinism():
    r = check_determinism(LeakyEnv, seed=0, episodes=1)
    assert not r.passed and "reset messages differ" in r.detail


def test_raising_on_odd_text_fails_garbage_actions():
    r = check_garbage_actions(FragileEnv, seed=0)
    assert not r.passed and "UnicodeEncodeError" in r.detail and "`emoji-rtl`" in r.detail


def test_an_episode_without_a_budget_fails_garbage_actions():
    r = check_garbage_actions(EndlessEnv, seed=0)
    assert not r.passed and "did not end within 64 steps" in r.detail


def test_an_observation_outside_the_space_fails_the_gymnasium_checker():
    r = check_gymnasium_api(BadObservationEnv)
    assert not r.passed and "observation" in r.detail.lower()


def test_ignoring_the_requested_problem_fails_problem_selection():
    r = check_problem_selection(IgnoresProblemIdEnv, seed=0)
    assert not r.passed and "must pose the requested problem" in r.detail


def test_trailing_text_after_a_stop_string_must_not_change_the_outcome(tokenizer):
    r = check_stop_sequences(StrictStopEnv, seed=0, tokenizer=tokenizer)
    assert not r.passed and "trailing whitespace after '</code>'" in r.detail


def test_an_empty_reply_after_a_stop_string_fails(tokenizer):
    r = check_stop_sequences(SilentToolEnv, seed=0, tokenizer=tokenizer)
    assert not r.passed and "empty observation" in r.detail


def test_qwen3_style_template_breaks_the_token_prefix_and_says_why(qwen3_tokenizer):
    r = check_token_contract(ChatEnv, seed=0, episodes=1, tokenizer=qwen3_tokenizer)
    assert not r.passed
    assert "not a prefix" in r.detail and "drops the `<think>` content" in r.detail


def test_qwen3_style_template_is_harmless_for_in_turn_replies(qwen3_tokenizer):
    # One assistant message holds the whole episode, so no earlier turn can be re-rendered.
    assert check_token_contract(ToolEnv, seed=0, episodes=1, tokenizer=qwen3_tokenizer).passed


def test_in_turn_tokenisation_boundaries_are_reported_as_a_caveat(tokenizer):
    r = check_token_contract(MergingReplyEnv, seed=0, episodes=1, tokenizer=tokenizer)
    assert r.passed and "caveat: encoding each piece separately gives other tokens" in r.detail


def test_a_template_that_rewrites_generated_text_fails(tokenizer, tmp_path):
    path = tmp_path / "trim.jinja"
    path.write_text(TRIMMING)
    r = check_token_contract(ChatEnv, seed=0, episodes=1, tokenizer=load_tokenizer(chat_template=str(path)))
    assert not r.passed and "verbatim" in r.detail


def test_an_env_that_cannot_be_built_is_one_failed_row():
    def broken():
        raise ValueError("`num_problems` must be positive")

    results = check_env(broken, tokenizer=None)
    assert [(r.name, r.passed) for r in results] == [("make", False)]
    assert "ValueError: `num_problems` must be positive" in results[0].detail


def test_missing_tokenizer_is_reported_not_skipped():
    results = check_env(ChatEnv, tokenizer=None, episodes=1)
    token = [r for r in results if r.name == "token-contract"][0]
    assert not token.passed and "no tokenizer" in token.detail


def test_scripted_actions_open_every_stop_sequence_and_reason_in_think():
    actions = scripted_actions(["</code>", "</search>"], n=8)
    assert len(actions) == 8 and all(a.startswith("<think>") for a in actions)
    assert actions[0].endswith("<code>print(0 + 0)</code>") and actions[1].endswith("<search>print(0 + 1)</search>")
    assert "\\boxed{0}" in actions[-1]


def test_cli_exits_1_and_explains_a_failing_template(tmp_path, capsys):
    path = tmp_path / "qwen3-like.jinja"
    path.write_text(QWEN3_LIKE)
    code = main(["check-env", "code-tests", "--chat-template", str(path), "--episodes", "1"])
    out = capsys.readouterr().out
    assert code == 1
    assert "check-env code-tests-v0" in out and "token-contract     FAIL" in out and "<think>" in out
    assert "determinism        PASS" in out and "8/9 checks passed; failed: token-contract" in out


def test_cli_unknown_id_suggests_the_closest(capsys):
    assert main(["check-env", "countdown-pyton"]) == 1
    assert "Did you mean `countdown-python`" in capsys.readouterr().err


def test_a_template_that_inserts_think_blocks_is_reported_with_the_reason(tmp_path):
    path = tmp_path / "qwen3-last-turn.jinja"
    path.write_text(QWEN3_LAST_TURN)
    tok = load_tokenizer(chat_template=str(path))
    for env in (ToolEnv, ChatEnv):  # in-turn replies and chat-message replies
        r = check_token_contract(env, seed=0, episodes=1, tokenizer=tok)
        assert not r.passed and "rewrites `<think>` blocks" in r.detail, r.detail
