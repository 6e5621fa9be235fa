"""`spo-agent check-env`: the contract every environment must keep, checked without a model.

Each check (`CheckResult`: name, passed, detail) is data, never an exception: `gymnasium-api`
(Gymnasium's own checker), `problem-selection`, `determinism` (same seed, same episode, also on a
reused instance), `garbage-actions` (malformed output is an observation), `stop-sequences`, the
registration checks of `spo_agents.envs.plugin_checks` and `token-contract`
(`spo_agents.envs.token_contract`). Episodes follow a fixed script (`scripted_actions`) that
opens every stop sequence and ends with `\\boxed{0}` / `<answer>0</answer>`. What each check proves:
docs/environments.md.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

#: Actions that a model may produce and an environment must survive.
GARBAGE_ACTIONS: dict[str, str] = {
    "empty": "",
    "whitespace": " \n\t \r\n ",
    "huge": "spam " * 40_000,
    "nul-and-control": "\x00\x01\x02\x1b[31m\x7f",
    "lone-surrogate": "answer \ud800 here",
    "emoji-rtl": "🤖 \u202e\\boxed{٣}\u202c 🧮",
    "unclosed-code": "<code>print(1 +",
    "close-only": "</code></answer>",
    "unclosed-boxed": "The answer is \\boxed{12",
    "nested-boxed": "\\boxed{\\boxed{\\boxed{}}}",
    "unclosed-fence": "```python\ndef f(:\n",
    "raising-code": "<code>raise SystemExit(3)</code>\n```python\nimport os\nos._exit(1)\n```",
    "many-tags": "<code></code>" * 50 + "<answer></answer>" * 50,
    "json": '{"tool": "python", "code": "print(1)"}',
}

#: Steps after which a garbage-only episode must have ended (terminated or truncated).
GARBAGE_STEP_BUDGET = 64


@dataclass
class CheckResult:
    """One row of the report: `passed` is False with `detail` explaining what broke."""

    name: str
    passed: bool
    detail: str = ""


# --- driving episodes --------------------------------------------------------------------------
def _opening_tag(stop: str) -> str:
    """`</code>` -> `<code>`; stop strings that are not closing tags have no opener."""
    if stop.startswith("</") and stop.endswith(">") and len(stop) > 3:
        return "<" + stop[2:]
    return ""


def scripted_actions(stop_sequences: list[str], n: int = 8) -> list[str]:
    """A model-free script: tool calls through every stop sequence, then a non-answer, then
    answers in the formats the suite's envs read. Every action reasons in `<think>` first."""
    actions = []
    for round_ in range(2):
        for i, stop in enumerate(stop_sequences):
            actions.append(
                f"<think>Round {round_}, probe {i}.</think>\n"
                f"Let me check. {_opening_tag(stop)}print({round_} + {i}){stop}"
            )
    actions.append("<think>I am stuck.</think>\nI do not know yet.\n")  # models often end on a newline
    final = (
        "<think>Guessing.</think>\nThe answer is \\boxed{0}. <answer>0</answer>\n"
        "```python\ndef solution(*args):\n    return 0\n```"
    )
    while len(actions) < n:
        actions.append(final)
    return actions[:n]


@dataclass
class Turn:
    action: str
    observation: Any
    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any]


@dataclass
class Episode:
    messages: list[dict[str, Any]]
    reset_info: dict[str, Any]
    turns: list[Turn]


def play_episode(env: Any, seed: int, actions: list[str], options: dict[str, Any] | None = None) -> Episode:
    messages, info = env.reset(seed=seed, options=options)
    episode = Episode(copy.deepcopy(messages), copy.deepcopy(info), [])
    for action in actions:
        obs, reward, terminated, truncated, step_info = env.step(action)
        episode.turns.append(Turn(action, copy.deepcopy(obs), reward, terminated, truncated, copy.deepcopy(step_info)))
        if terminated or truncated:
            break
    return episode


_VOLATILE = ("time", "duration", "latency", "elapsed")


def _stable(x: Any) -> Any:
    """`x` without the values that legitimately vary between identical runs (timings)."""
    if isinstance(x, dict):
        return {
            k: _stable(v)
            for k, v in x.items()
            if not (isinstance(k, str) and (k.endswith("_s") or any(w in k for w in _VOLATILE)))
        }
    if isinstance(x, (list, tuple)):
        return [_stable(v) for v in x]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _stable(dataclasses.asdict(x))
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return x


def _first_difference(a: Episode, b: Episode) -> str | None:
    if _stable(a.messages) != _stable(b.messages):
        return f"reset messages differ: {short(a.messages)} vs {short(b.messages)}"
    if _stable(a.reset_info) != _stable(b.reset_info):
        return f"reset info differs: {short(a.reset_info)} vs {short(b.reset_info)}"
    if len(a.turns) != len(b.turns):
        return f"episode lengths differ: {len(a.turns)} vs {len(b.turns)} steps"
    for k, (s, t) in enumerate(zip(a.turns, b.turns)):
        for field in ("observation", "reward", "terminated", "truncated", "info"):
            x, y = _stable(getattr(s, field)), _stable(getattr(t, field))
            if x != y:
                return f"step {k}: `{field}` differs: {short(x)} vs {short(y)}"
    return None


def short(x: Any, n: int = 160) -> str:
    s = repr(x)
    return s if len(s) <= n else s[: n // 2] + " ... " + s[-n // 2 :]


@contextlib.contextmanager
def closing(env: Any) -> Iterator[Any]:
    try:
        yield env
    finally:
        with contextlib.suppress(Exception):
            env.close()


def failure(name: str, e: BaseException) -> CheckResult:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""
    return CheckResult(name, False, f"raised {type(e).__name__}: {e}{where}")


# --- the checks --------------------------------------------------------------------------------
def check_gymnasium_api(make_env: Callable[[], Any]) -> CheckResult:
    """Gymnasium's checker; its warnings (observation outside the space, NaN reward, ...) fail."""
    from gymnasium.utils.env_checker import check_env as gym_check_env

    name = "gymnasium-api"
    with closing(make_env()) as env:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                gym_check_env(env, skip_render_check=True)
            except Exception as e:  # the checker reports by raising
                return failure(name, e)
    # Gymnasium reports soft failures through `gymnasium.logger.warn` ("WARN: ..." messages).
    messages = sorted(
        {str(w.message).replace("\x1b[33m", "").replace("\x1b[0m", "") for w in caught if "WARN:" in str(w.message)}
    )
    if messages:
        return CheckResult(name, False, "warnings: " + " | ".join(messages))
    return CheckResult(name, True, "reset/step signatures, spaces, seeding and step determinism")


def check_problem_selection(make_env: Callable[[], Any], seed: int) -> CheckResult:
    name = "problem-selection"
    with closing(make_env()) as env:
        try:
            ids = list(getattr(env, "problem_ids", []) or [])
            if not ids:
                return CheckResult(name, True, "the env exposes no `problem_ids`; skipped selection by id")
            if len(set(ids)) != len(ids):
                return CheckResult(
                    name, False, "`problem_ids` contains duplicates; the value tracker needs unique, stable ids"
                )
            picks = [ids[0], ids[-1], ids[len(ids) // 2]]
            for pid in picks:
                env.reset(seed=seed, options={"problem_id": pid})
                chosen = getattr(getattr(env, "problem", None), "id", None)
                if chosen != pid:
                    return CheckResult(
                        name,
                        False,
                        f"`reset(options={{'problem_id': {pid!r}}})` posed problem {chosen!r}; "
                        "it must pose the requested problem",
                    )
        except Exception as e:
            return failure(name, e)
    return CheckResult(name, True, f"{len(ids)} problems, unique ids, selection by id works")


def check_determinism(make_env: Callable[[], Any], seed: int, episodes: int) -> CheckResult:
    """Two fresh instances and one reused instance must replay identically."""
    name = "determinism"
    try:
        with closing(make_env()) as first, closing(make_env()) as second:
            actions = scripted_actions(list(first.stop_sequences))
            for e in range(episodes):
                s = seed + e
                a = play_episode(first, s, actions)
                play_episode(second, s + 1000, actions)  # play something else first ...
                b = play_episode(second, s, actions)  # ... then the same seed on the used instance
                diff = _first_difference(a, b)
                if diff:
                    return CheckResult(
                        name,
                        False,
                        f"seed {s}: {diff}. "
                        "Draw randomness only from `self.np_random` and reset all episode state in `reset`.",
                    )
    except Exception as e:
        return failure(name, e)
    return CheckResult(name, True, f"{episodes} episode(s) replayed identically (fresh and reused instances)")


def _step_problem(result: Any, env: Any) -> str | None:
    """What is wrong with one `step` result, or None."""
    if not isinstance(result, tuple) or len(result) != 5:
        return f"`step` returned {short(result, 80)}, expected a 5-tuple"
    obs, reward, terminated, truncated, info = result
    if not env.observation_space.contains(obs):
        return f"observation {short(obs, 80)} is not in the observation space"
    if not isinstance(reward, (int, float)) or isinstance(reward, bool) or not math.isfinite(float(reward)):
        return f"reward {reward!r} is not a finite number"
    if not isinstance(terminated, bool) or not isinstance(truncated, bool):
        return f"`terminated`/`truncated` must be bools, got {terminated!r}, {truncated!r}"
    if not isinstance(info, dict):
        return f"info must be a dict, got {type(info).__name__}"
    return None


def check_garbage_actions(make_env: Callable[[], Any], seed: int) -> CheckResult:
    name = "garbage-actions"
    problems = []
    with closing(make_env()) as env:
        garbage = dict(GARBAGE_ACTIONS)
        bound = getattr(env.action_space, "max_length", None)
        if isinstance(bound, int) and bound < 10_000_000:
            garbage["over-the-action-bound"] = "a" * (bound + 1)
        for label, action in garbage.items():
            try:
                env.reset(seed=seed)
                bad = _step_problem(env.step(action), env)
            except Exception as e:
                bad = f"raised {type(e).__name__}: {e}"
            if bad:
                problems.append(f"`{label}`: {bad}")
        try:
            env.reset(seed=seed)
            for _ in range(GARBAGE_STEP_BUDGET):
                result = env.step(GARBAGE_ACTIONS["unclosed-code"])
                if result[2] or result[3]:
                    break
            else:
                problems.append(
                    f"an episode of `unclosed-code` actions did not end within {GARBAGE_STEP_BUDGET} steps: "
                    "add a turn budget that sets `truncated`"
                )
        except Exception as e:
            problems.append(f"repeated garbage raised {type(e).__name__}: {e}")
    if problems:
        return CheckResult(
            name,
            False,
            "malformed output must be an observation and a reward, never an exception; " + "; ".join(problems),
        )
    return CheckResult(name, True, f"{len(garbage)} kinds of garbage handled; garbage-only episodes end")


def check_stop_sequences(make_env: Callable[[], Any], seed: int, tokenizer: Any | None) -> CheckResult:
    name = "stop-sequences"
    notes: list[str] = []
    with closing(make_env()) as env:
        stops = getattr(env, "stop_sequences", None)
        role = getattr(env, "reply_role", None)
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
            return CheckResult(name, False, f"`stop_sequences` must be a list of non-empty strings, found {stops!r}")
        if len(set(stops)) != len(stops):
            return CheckResult(name, False, f"`stop_sequences` has duplicates: {list(stops)!r}")
        if role is not None and not isinstance(role, str):
            return CheckResult(
                name, False, f"`reply_role` must be None (continue the assistant turn) or a chat role, found {role!r}"
            )
        if not stops:
            how = "the end-of-turn token" if role else "the end-of-turn token (single assistant turn)"
            return CheckResult(name, True, f"no stop sequences; generation ends at {how}")
        for stop in stops:
            if tokenizer is not None:
                ids = tokenizer.encode(stop, add_special_tokens=False)
                if tokenizer.decode(ids) != stop:
                    return CheckResult(
                        name,
                        False,
                        f"stop string {stop!r} does not survive the tokenizer round trip "
                        f"(decodes to {tokenizer.decode(ids)!r})",
                    )
                merged = tokenizer.encode(stop + "\n", add_special_tokens=False)
                if merged[: len(ids)] != ids:
                    notes.append(f"{stop!r} merges with a following newline into other tokens")
            action = f"Let me check. {_opening_tag(stop)}print(2 + 2){stop}"
            try:
                env.reset(seed=seed)
                result = env.step(action)
                bad = _step_problem(result, env)
                if bad:
                    return CheckResult(name, False, f"after an action ending at {stop!r}: {bad}")
                obs, _, terminated, truncated, _ = result
                if truncated:
                    return CheckResult(
                        name,
                        False,
                        f"one action ending at {stop!r} truncated the episode; "
                        "a stop string must hand control to the env, not exhaust a budget",
                    )
                if not terminated and not (isinstance(obs, str) and obs):
                    return CheckResult(
                        name,
                        False,
                        f"the env stopped at {stop!r} and continued, but replied with an empty observation; "
                        "generation would resume with nothing new",
                    )
                env.reset(seed=seed)
                _, _, t2, u2, _ = env.step(action + "\n ")
                if (t2, u2) != (terminated, truncated):
                    return CheckResult(
                        name,
                        False,
                        f"trailing whitespace after {stop!r} changes the outcome "
                        f"(terminated/truncated {terminated}/{truncated} vs {t2}/{u2}); "
                        "backends that stop on token boundaries can return a few characters past the stop string",
                    )
            except Exception as e:
                return failure(name, e)
    detail = f"{len(stops)} stop sequence(s) {list(stops)!r} hand control to the env"
    if notes:
        detail += (
            "; caveat: "
            + "; ".join(notes)
            + " (backends must cut the text at the stop string or the env must tolerate the overshoot)"
        )
    return CheckResult(name, True, detail)


# --- entry points ------------------------------------------------------------------------------
def load_tokenizer(model: str | None = None, chat_template: str | None = None) -> Any:
    """The tokenizer of `model` (a directory or name; default: the tiny test model, which has the
    SmolLM2 tokenizer and ChatML template), optionally with a Jinja chat template from a file."""
    from transformers import AutoTokenizer

    from spo_agents.models import resolve_model, tiny_model_dir

    path = resolve_model(model) if model else str(tiny_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    if chat_template:
        with open(chat_template, encoding="utf-8") as f:
            tokenizer.chat_template = f.read()
    if not getattr(tokenizer, "chat_template", None):
        from spo_agents.errors import ConfigError

        raise ConfigError(
            f"the tokenizer of `{path}` has no chat template; pass `--chat-template FILE` with a Jinja template"
        )
    return tokenizer


def check_env(
    make_env: Callable[[], Any],
    *,
    tokenizer: Any | None = None,
    episodes: int = 2,
    seed: int = 0,
    env_id: str | None = None,
    entry: Any = None,
) -> list[CheckResult]:
    """Run every check against fresh instances from `make_env`; returns one result per check.
    `env_id` and `entry` (the registered class or factory) add the registration checks
    (`spo_agents.envs.plugin_checks`). Without a tokenizer the token contract is reported as
    failed (it cannot be verified). An env that cannot be built gives a failed `make` result."""
    from spo_agents.envs.plugin_checks import check_constructor, check_env_id, check_text_env

    results = []
    if env_id is not None:
        results.append(check_env_id(env_id))
    if entry is not None:
        results.append(check_constructor(entry))
    try:
        with closing(make_env()):
            pass
    except Exception as e:
        return [*results, failure("make", e)]
    results += [
        check_text_env(make_env),
        check_gymnasium_api(make_env),
        check_problem_selection(make_env, seed),
        check_determinism(make_env, seed, episodes),
        check_garbage_actions(make_env, seed),
        check_stop_sequences(make_env, seed, tokenizer),
    ]
    if tokenizer is None:
        results.append(
            CheckResult("token-contract", False, "no tokenizer given; pass a model whose chat template you train with")
        )
    else:
        from spo_agents.envs.token_contract import check_token_contract

        results.append(check_token_contract(make_env, seed, episodes, tokenizer))
    return results


def format_results(env_id: str, results: list[CheckResult]) -> str:
    """A plain-text table: check, PASS/FAIL, detail."""
    width = max(len(r.name) for r in results)
    lines = [f"check-env {env_id}", ""]
    for r in results:
        lines.append(f"  {r.name:<{width}}  {'PASS' if r.passed else 'FAIL'}  {r.detail}")
    failed = [r.name for r in results if not r.passed]
    lines.append("")
    lines.append(
        f"{len(results) - len(failed)}/{len(results)} checks passed"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return "\n".join(lines)
