"""Where a sampled continuation ends: stop strings and end-of-turn tokens, decided per token.

Token-in, token-out (`spo_agents.rollout.policy.base`): a continuation is cut at a token boundary, never inside a
token. When a stop string is completed by a token that also carries text past it (for example
`</code>` followed by a newline in one token), the continuation ends at *that* token, so the
returned text may extend a few characters beyond the stop string. The token that completes the
stop string is part of the sample and is trained on; nothing after it is kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class StopMatch:
    """The end of a continuation: `length` tokens are kept; `reason` as in `Generation`."""

    length: int
    reason: Literal["stop", "eos", "length"]
    stop_string: str | None = None


class StopScanner:
    """Incremental stop detection for one continuation.

    Feed tokens one at a time with `push`; it returns a `StopMatch` as soon as the token just
    pushed is an end-of-turn token or completes one of the stop strings. Each check decodes only a
    short window of trailing tokens (enough to hold the longest stop string), so a scan costs
    O(tokens x window) regardless of the continuation's length.
    """

    def __init__(self, tokenizer: Any, stop: Iterable[str], eos_ids: Iterable[int]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.eos_ids = frozenset(int(t) for t in eos_ids)
        # a token decodes to at least one character except for partial UTF-8 bytes; a margin of
        # four covers multi-byte characters split over tokens
        self.window = max((len(s) for s in self.stop), default=0) + 4
        self.tokens: list[int] = []

    def push(self, token_id: int) -> StopMatch | None:
        self.tokens.append(int(token_id))
        n = len(self.tokens)
        if int(token_id) in self.eos_ids:
            return StopMatch(n, "eos")
        if self.stop:
            tail = self.tokenizer.decode(self.tokens[-self.window :], skip_special_tokens=False)
            for s in self.stop:
                if s in tail:
                    return StopMatch(n, "stop", s)
        return None


def find_stop(
    tokenizer: Any, token_ids: Sequence[int], stop: Iterable[str], eos_ids: Iterable[int]
) -> StopMatch | None:
    """The first stop in `token_ids` (see `StopScanner`), or `None` when there is none."""
    scanner = StopScanner(tokenizer, stop, eos_ids)
    for t in token_ids:
        match = scanner.push(t)
        if match is not None:
            return match
    return None


def eos_token_ids(tokenizer: Any, model_config: Any = None) -> list[int]:
    """End-of-turn ids: the tokenizer's eos, `<|im_end|>` / `<|endoftext|>` when the vocabulary has
    them, and the model's generation-config eos ids."""
    ids: list[int] = []
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for name in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        if name in vocab:
            ids.append(int(vocab[name]))
    extra = getattr(model_config, "eos_token_id", None) if model_config is not None else None
    if isinstance(extra, int):
        ids.append(extra)
    elif isinstance(extra, (list, tuple)):
        ids.extend(int(x) for x in extra)
    return sorted(set(ids))
