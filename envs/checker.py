"""`spo-agent check-env`: the contract every environment of the suite must keep.

Gymnasium's own `check_env` proves the `reset` / `step` API; an LLM environment also has to be
safe to train on token-in, token-out. The checks, and what each proves:

- `make`: (reported only when it fails) the env can be built with the given arguments.
- `gymnasium-api`: `gymnasium.utils.env_checker.check_env` passes without errors or warnings.
- `problem-selection`: `reset(options={"problem_id": ...})` poses exactly that problem.
- `determinism`: the same seed and the same actions give the same messages, observations,
  rewards and flags, also on an env instance that already played another episode.
- `garbage-actions`: empty, huge, binary, unicode, unclosed-tag and half-formatted actions are
  observations and rewards, never exceptions, and a garbage-only episode ends within a step budget.
- `stop-sequences`: `stop_sequences` are distinct non-empty strings that survive a tokenizer round
  trip; an action ending at a stop string hands control to the env (non-empty reply, no
  truncation), and trailing whitespace after the stop string (a backend that stops on a token
  boundary) does not change the outcome.
- `token-contract`: with a real chat template: chat replies (`reply_role` set) keep the tokens of
  turn k a prefix of the tokens of turn k+1 (templates that drop earlier `<think>` blocks, as
  Qwen3's does, break this and are reported); in-turn replies (`reply_role = None`) decode back to
  exactly the text the env produced, with tokenisation-boundary caveats listed.

The episodes are driven by a fixed script of actions (`scripted_actions`) that open every stop
sequence (as a tool call would), reason inside `<think>`, answer nothing, and finally answer
`\\boxed{0}` / `<answer>0</answer>`, so multi-turn paths are exercised without a model.

Results are data (`CheckResult`), not exceptions: one row per check with an explanation when it
fails. An exception raised by the environment during a check is reported as that check's failure.
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


# --------------------------------------------------------------------------------------------
# Driving episodes
# --------------------------------------------------------------------------------------------
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
class _Turn:
    action: str
    observation: Any
    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any]


@dataclass
class _Episode:
    messages: list[dict[str, Any]]
    reset_info: dict[str, Any]
    turns: list[_Turn]


def _play(env: Any, seed: int, actions: list[str], options: dict[str, Any] | None = None) -> _Episode:
    messages, info = env.reset(seed=seed, options=options)
    episode = _Episode(copy.deepcopy(messages), copy.deepcopy(info), [])
    for action in actions:
        obs, reward, terminated, truncated, step_info = env.step(action)
        episode.turns.append(_Turn(action, copy.deepcopy(obs), reward, terminated, truncated, copy.deepcopy(step_info)))
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


def _first_difference(a: _Episode, b: _Episode) -> str | None:
    if _stable(a.messages) != _stable(b.messages):
        return f"reset messages differ: {_short(a.messages)} vs {_short(b.messages)}"
    if _stable(a.reset_info) != _stable(b.reset_info):
        return f"reset info differs: {_short(a.reset_info)} vs {_short(b.reset_info)}"
    if len(a.turns) != len(b.turns):
        return f"episode lengths differ: {len(a.turns)} vs {len(b.turns)} steps"
    for k, (s, t) in enumerate(zip(a.turns, b.turns)):
        for field in ("observation", "reward", "terminated", "truncated", "info"):
            x, y = _stable(getattr(s, field)), _stable(getattr(t, field))
            if x != y:
                return f"step {k}: `{field}` differs: {_short(x)} vs {_short(y)}"
    return None


def _short(x: Any, n: int = 160) -> str:
    s = repr(x)
    return s if len(s) <= n else s[: n // 2] + " ... " + s[-n // 2 :]


@contextlib.contextmanager
def _closing(env: Any) -> Iterator[Any]:
    try:
        yield env
    finally:
        with contextlib.suppress(Exception):
            env.close()


def _failure(name: str, e: BaseException) -> CheckResult:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""
    return CheckResult(name, False, f"raised {type(e).__name__}: {e}{where}")


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------
def check_gymnasium_api(make_env: Callable[[], Any]) -> CheckResult:
    """Gymnasium's checker; its warnings (observation outside the space, NaN reward, ...) fail."""
    from gymnasium.utils.env_checker import check_env as gym_check_env

    name = "gymnasium-api"
    with _closing(make_env()) as env:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                gym_check_env(env, skip_render_check=True)
            except Exception as e:  # the checker reports by raising
                return _failure(name, e)
    # Gymnasium reports soft failures through `gymnasium.logger.warn` ("WARN: ..." messages).
    messages = sorted(
        {str(w.message).replace("\x1b[33m", "").replace("\x1b[0m", "") for w in caught if "WARN:" in str(w.message)}
    )
    if messages:
        return CheckResult(name, False, "warnings: " + " | ".join(messages))
    return CheckResult(name, True, "reset/step signatures, spaces, seeding and step determinism")


def check_problem_selection(make_env: Callable[[], Any], seed: int) -> CheckResult:
    name = "problem-selection"
    with _closing(make_env()) as env:
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
            return _failure(name, e)
    return CheckResult(name, True, f"{len(ids)} problems, unique ids, selection by id works")


def check_determinism(make_env: Callable[[], Any], seed: int, episodes: int) -> CheckResult:
    """Two fresh instances and one reused instance must replay identically."""
    name = "determinism"
    try:
        with _closing(make_env()) as first, _closing(make_env()) as second:
            actions = scripted_actions(list(first.stop_sequences))
            for e in range(episodes):
                s = seed + e
                a = _play(first, s, actions)
                _play(second, s + 1000, actions)  # play something else first ...
                b = _play(second, s, actions)  # ... then the same seed on the used instance
                diff = _first_difference(a, b)
                if diff:
                    return CheckResult(
                        name,
                        False,
                        f"seed {s}: {diff}. "
                        "Draw randomness only from `self.np_random` and reset all episode state in `reset`.",
                    )
    except Exception as e:
        return _failure(name, e)
    return CheckResult(name, True, f"{episodes} episode(s) replayed identically (fresh and reused instances)")


def _step_problem(result: Any, env: Any) -> str | None:
    """What is wrong with one `step` result, or None."""
    if not isinstance(result, tuple) or len(result) != 5:
        return f"`step` returned {_short(result, 80)}, expected a 5-tuple"
    obs, reward, terminated, truncated, info = result
    if not env.observation_space.contains(obs):
        return f"observation {_short(obs, 80)} is not in the observation space"
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
    with _closing(make_env()) as env:
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
    with _closing(make_env()) as env:
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
                return _failure(name, e)
    detail = f"{len(stops)} stop sequence(s) {list(stops)!r} hand control to the env"
    if notes:
        detail += (
            "; caveat: "
            + "; ".join(notes)
            + " (backends must cut the text at the stop string or the env must tolerate the overshoot)"
        )
    return CheckResult(name, True, detail)


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _mismatch(a: str, b: str) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"at character {i}: turn k has {a[max(0, i - 30) : i + 40]!r}, turn k+1 has {b[max(0, i - 30) : i + 40]!r}"


def _think_note(tokenizer: Any, expected: str, rendered: str) -> str:
    """A pointer to `<think>` handling when the template rewrites reasoning blocks (Qwen3-style
    templates reformat, insert or drop them), else ''."""
    template = str(getattr(tokenizer, "chat_template", None) or "")
    if "</think>" not in template or ("<think>" not in expected and "<think>" not in rendered):
        return ""
    return (
        "; the chat template rewrites `<think>` blocks of assistant turns (Qwen3's inserts an empty one into the "
        "last assistant turn, reformats the block and drops it from earlier turns), so the text it renders is not "
        "what the policy generated. Use a template that renders assistant text verbatim, or evaluate token-in/token-out"
    )


def _think_dropped(messages: list[dict[str, Any]], rendered: str) -> bool:
    for m in messages:
        content = m.get("content") or ""
        if m.get("role") == "assistant" and "<think>" in content and "</think>" in content:
            inner = content.split("<think>", 1)[1].split("</think>", 1)[0].strip()
            if inner and inner not in rendered:
                return True
    return False


def check_token_contract(make_env: Callable[[], Any], seed: int, episodes: int, tokenizer: Any) -> CheckResult:
    name = "token-contract"
    caveats: list[str] = []
    try:
        with _closing(make_env()) as env:
            role = env.reply_role
            actions = scripted_actions(list(env.stop_sequences))
            for e in range(episodes):
                ep = _play(env, seed + e, actions)
                messages = [dict(m) for m in ep.messages]
                if role is None:
                    bad = _check_in_turn(tokenizer, messages, ep, caveats)
                else:
                    bad = _check_chat_turns(tokenizer, messages, ep, role)
                if bad:
                    return CheckResult(name, False, f"seed {seed + e}: {bad}")
    except Exception as e:
        return _failure(name, e)
    if role is None:
        detail = "in-turn replies: every piece decodes back exactly"
        if caveats:
            detail += (
                f"; caveat: {sorted(set(caveats))[0]} "
                "(harmless token-in/token-out, wrong if anything re-tokenises the transcript)"
            )
    else:
        detail = f"`{role}` replies: each turn's tokens are a prefix of the next turn's"
    return CheckResult(name, True, detail)


def _check_in_turn(tokenizer: Any, messages: list[dict[str, Any]], ep: _Episode, caveats: list[str]) -> str | None:
    """`reply_role = None`: the assistant turn is generated text and env text, appended as tokens."""
    prompt = _render(tokenizer, messages, True)
    pieces = []
    for turn in ep.turns:
        pieces.append(turn.action)
        if not (turn.terminated or turn.truncated) and isinstance(turn.observation, str):
            pieces.append(turn.observation)
    for piece in pieces:
        ids = _ids(tokenizer, piece)
        back = tokenizer.decode(ids)
        if back != piece:
            return (
                f"the text {_short(piece, 80)} decodes back as {_short(back, 80)}; "
                "the token stream would not say what the env said"
            )
    joined = "".join(pieces)
    separately = sum((_ids(tokenizer, p) for p in pieces), [])
    if separately != _ids(tokenizer, joined):
        caveats.append("encoding each piece separately gives other tokens than encoding the joined text")
    full = _render(tokenizer, messages + [{"role": "assistant", "content": joined}], False)
    if not full.startswith(prompt + joined):
        return (
            "the chat template does not render the finished assistant turn as the prompt followed by "
            "the generated and inserted text "
            f"({_mismatch(prompt + joined, full)}); evaluation through a chat API would not see what training saw"
            + _think_note(tokenizer, prompt + joined, full)
        )
    return None


def _check_chat_turns(tokenizer: Any, messages: list[dict[str, Any]], ep: _Episode, role: str) -> str | None:
    """Chat-message replies: the rendered chat of turn k must be a token prefix of turn k+1."""
    before = _render(tokenizer, messages, True)
    for k, turn in enumerate(ep.turns):
        closed_msgs = messages + [{"role": "assistant", "content": turn.action}]
        closed = _render(tokenizer, closed_msgs, False)
        if not closed.startswith(before + turn.action):
            return (
                f"turn {k}: the template does not render the generated text verbatim after the generation prompt "
                f"({_mismatch(before + turn.action, closed)})" + _think_note(tokenizer, before + turn.action, closed)
            )
        if turn.terminated or turn.truncated:
            break
        messages = closed_msgs + [{"role": role, "content": turn.observation}]
        after = _render(tokenizer, messages, True)
        ids_before, ids_after = _ids(tokenizer, closed), _ids(tokenizer, after)
        if not after.startswith(closed) or ids_after[: len(ids_before)] != ids_before:
            why = _mismatch(closed, after)
            if _think_dropped(closed_msgs, after):
                why += (
                    "; the template drops the `<think>` content of earlier assistant turns "
                    "(as Qwen3's template does), so the tokens the policy generated are not in the next prompt. "
                    "Use a template that keeps reasoning, or train on single-turn episodes"
                )
            return f"turn {k} -> {k + 1}: the tokens of turn {k} are not a prefix of the tokens of turn {k + 1} ({why})"
        before = after
    return None


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
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
) -> list[CheckResult]:
    """Run every check against fresh instances from `make_env`; returns one result per check.
    Without a tokenizer the token contract is reported as failed (it cannot be verified).
    An env that cannot be built gives a single failed `make` result."""
    try:
        with _closing(make_env()):
            pass
    except Exception as e:
        return [_failure("make", e)]
    results = [
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
