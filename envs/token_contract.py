"""The `token-contract` check of `spo-agent check-env`: with a real chat template, what the env
inserts stays token-in, token-out.

Chat replies (`reply_role` set) must keep the tokens of turn k a prefix of the tokens of turn k+1
(templates that drop earlier `<think>` blocks, as Qwen3's does, break this and are reported);
in-turn replies (`reply_role = None`) must decode back to exactly the text the env produced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from spo_agents.envs.checker import CheckResult, Episode, closing, failure, play_episode, scripted_actions, short


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
        with closing(make_env()) as env:
            role = env.reply_role
            actions = scripted_actions(list(env.stop_sequences))
            for e in range(episodes):
                ep = play_episode(env, seed + e, actions)
                messages = [dict(m) for m in ep.messages]
                if role is None:
                    bad = _check_in_turn(tokenizer, messages, ep, caveats)
                else:
                    bad = _check_chat_turns(tokenizer, messages, ep, role)
                if bad:
                    return CheckResult(name, False, f"seed {seed + e}: {bad}")
    except Exception as e:
        return failure(name, e)
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


def _check_in_turn(tokenizer: Any, messages: list[dict[str, Any]], ep: Episode, caveats: list[str]) -> str | None:
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
                f"the text {short(piece, 80)} decodes back as {short(back, 80)}; "
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


def _check_chat_turns(tokenizer: Any, messages: list[dict[str, Any]], ep: Episode, role: str) -> str | None:
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
