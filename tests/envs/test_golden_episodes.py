"""The built-in tool environments keep their episodes: the same reset prompts and the same step
outcomes (observation, reward, flags, answer, check) as recorded in `golden_episodes.json`.

The recorded episodes were reviewed against each env's documented format: a system message
with the tool format, a one-shot exchange (`<code>`, an `<interpreter>` reply, a `\\boxed{}` or
`<answer>` final answer) and the problem; interpreter replies `\\n<interpreter>\\n...\\n</interpreter>\\n`;
reward 1 only for a right final answer (17 * 23 = 391, (25 - 3) * 5 = 110, -425 * 236 / 2 = -50150).
A change to a prompt, parser or reward shows up here and needs a new env version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spo_agents.envs.countdown import CountdownEnv
from spo_agents.envs.math_python import MathPythonEnv
from spo_agents.envs.reasoning_gym_env import ReasoningGymEnv
from spo_agents.types import Problem

GOLDEN = json.loads((Path(__file__).parent / "golden_episodes.json").read_text(encoding="utf-8"))
KEPT = ("answer", "correct", "check", "value", "score", "tool_calls", "turn", "check_detail", "check_error")
KEPT += ("tool_limit_reached",)
ARITH = Problem("golden/1", "What is 17 * 23?", "391")
NUMBERS = {"numbers": [3, 5, 25, 50], "target": 110}
COUNTDOWN = Problem("countdown/3-5-25-50/110", "Numbers: [3, 5, 25, 50]. Target: 110.", "110", NUMBERS)


def play(env, pid, actions):
    messages, _ = env.reset(seed=0, options={"problem_id": pid})
    steps = []
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        keep = {k: v for k, v in info.items() if k in KEPT}
        if "tool_call" in info:
            call = info["tool_call"]
            keep["tool_call"] = {"code": call.code, "output": call.output, "ok": call.ok}
        steps.append(
            {
                "action": action,
                "observation": obs,
                "reward": reward,
                "terminated": terminated,
                "truncated": truncated,
                "info": keep,
            }
        )
        if terminated or truncated:
            break
    return {"problem_id": pid, "messages": messages, "steps": steps}


def scenarios(name, fake_backend, checker):
    """(env, [(problem id, actions), ...]) of one recorded scenario."""
    fb = fake_backend
    if name == "math-python":
        env = MathPythonEnv(problems=[ARITH], sandbox=fb, checker=checker)
        return env, [
            (ARITH.id, ["Let me compute. <code>print(17 * 23)</code>", "So the answer is \\boxed{391}."]),
            (ARITH.id, ["<code>x = 17</code>", "<code>\nprint(x * 23)\n</code>\n", "I think \\boxed{390}"]),
            (ARITH.id, ["The answer is 391, no box."]),
        ]
    if name == "math-python-tool-limit":
        env = MathPythonEnv(problems=[ARITH], sandbox=fb, checker=checker, max_tool_calls=1)
        actions = ["<code>print(1)</code>", "<code>print(2)</code>", "<code>print(3)</code>", "more"]
        return env, [(ARITH.id, actions)]
    if name == "math-python-no-one-shot":
        env = MathPythonEnv(problems=[ARITH], sandbox=fb, checker=checker, one_shot=False, system_prompt="")
        return env, [(ARITH.id, ["\\boxed{391}"])]
    if name == "countdown-python":
        env = CountdownEnv(problems=[COUNTDOWN], sandbox=fb)
        return env, [
            (COUNTDOWN.id, ["<code>print((25 - 3) * 5)</code>", "\\boxed{(25 - 3) * 5}"]),
            (COUNTDOWN.id, ["\\boxed{(25 - 3) * 5 * 1}"]),
            (COUNTDOWN.id, ["\\boxed{50 + 50 + 5 + 5}"]),
        ]
    if name == "countdown-python-generated":
        env = CountdownEnv("test", num_problems=3, sandbox=fb)
        return env, [(env.problem_ids[0], ["no answer"])]
    if name == "reasoning-gym":
        env = ReasoningGymEnv(
            "train", task="basic_arithmetic", num_problems=5, seed=3, sandbox=fb, score_timeout_s=120.0
        )
        first = env.get_problem(env.problem_ids[0])
        return env, [
            (first.id, ["<code>print(1 + 1)</code>", f"<answer>{first.answer}</answer>"]),
            (env.problem_ids[1], ["The answer is \\boxed{-99999}"]),
            (env.problem_ids[2], ["nothing"]),
        ]
    raise KeyError(name)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_episodes_match_the_recorded_ones(name, fake_backend, checker):
    env, plays = scenarios(name, fake_backend, checker)
    try:
        got = [play(env, pid, actions) for pid, actions in plays]
    finally:
        env.close()
    want = GOLDEN[name]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g["problem_id"] == w["problem_id"]
        assert g["messages"] == w["messages"]
        assert g["steps"] == w["steps"]
