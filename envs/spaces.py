"""The spaces and measurements of multi-turn text environments: `TextSpace` (actions),
`ChatSpace` (observations), `Timings` (seconds per step), and the text helpers `clean_text` and
`head_tail`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import gymnasium as gym

Message = dict[str, str]


# --------------------------------------------------------------------------------------------
# Spaces
# --------------------------------------------------------------------------------------------
class TextSpace(gym.spaces.Space[str]):
    """Any Python string of at most `max_length` characters (LLM output is arbitrary text,
    which Gymnasium's `Text` space rejects)."""

    def __init__(self, max_length: int = 1_000_000, seed: int | None = None) -> None:
        super().__init__(shape=None, dtype=None, seed=seed)
        self.max_length = max_length

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and len(x) <= self.max_length

    def sample(self, mask: Any = None, probability: Any = None) -> str:
        n = int(self.np_random.integers(0, min(self.max_length, 64) + 1))
        chars = self.np_random.integers(32, 127, size=n)
        return "".join(map(chr, chars))

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"TextSpace(max_length={self.max_length})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TextSpace) and other.max_length == self.max_length


class ChatSpace(gym.spaces.Space[Any]):
    """Observations of a multi-turn text env: the chat messages `reset` returns (a list of
    `{"role": str, "content": str}` dicts) or the reply text `step` returns (a string).
    Both are bounded by `max_length` characters."""

    def __init__(self, max_length: int = 10_000_000, seed: int | None = None) -> None:
        super().__init__(shape=None, dtype=None, seed=seed)
        self.max_length = max_length

    def contains(self, x: Any) -> bool:
        if isinstance(x, str):
            return len(x) <= self.max_length
        if not isinstance(x, list):
            return False
        total = 0
        for m in x:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                return False
            total += len(m["content"])
        return total <= self.max_length

    def sample(self, mask: Any = None, probability: Any = None) -> list[Message]:
        text = TextSpace(min(self.max_length, 64), seed=int(self.np_random.integers(2**31))).sample()
        return [{"role": "user", "content": text}]

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"ChatSpace(max_length={self.max_length})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ChatSpace) and other.max_length == self.max_length


class Timings(Mapping[str, float]):
    """Seconds spent in one `reset` / `step`, by key (`step_s`, `sandbox_s`, `check_s`, ...).

    A read-only mapping. Timings are measurements, not part of the environment's state, so two
    `Timings` compare equal when they hold the same keys, whatever the values (this keeps
    Gymnasium's determinism checks meaningful: they compare `info` dicts with `==`). Compare
    values explicitly when you need to. `to_dict()` gives a plain, JSON-ready dict.
    """

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, float] | None = None) -> None:
        self._values = {k: float(v) for k, v in (values or {}).items()}

    def __getitem__(self, key: str) -> float:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Timings):
            return set(self._values) == set(other._values)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, float]:
        return dict(self._values)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v:.4f}" for k, v in self._values.items())
        return f"Timings({inner})"


def head_tail(text: str, max_chars: int, marker: str = "\n... [{n} characters cut] ...\n") -> tuple[str, bool]:
    """Shorten `text` to about `max_chars` characters keeping its head and tail (the middle is
    replaced by `marker`, where `{n}` is the number of characters cut). Returns (text, cut)."""
    if max_chars <= 0 or len(text) <= max_chars:
        return text, False
    keep = max(max_chars, 2)
    head = keep // 2
    tail = keep - head
    n = len(text) - head - tail
    return text[:head] + marker.format(n=n) + text[len(text) - tail :], True


def clean_text(action: Any) -> str | None:
    """Turn whatever a policy produced into valid UTF-8 text, or `None` if it is not text at all.

    Bytes are decoded as UTF-8 with replacement characters; lone surrogates (which cannot be
    encoded, e.g. from `surrogateescape` decoding) are replaced by `?`."""
    if isinstance(action, (bytes, bytearray, memoryview)):
        return bytes(action).decode("utf-8", errors="replace")
    if not isinstance(action, str):
        return None
    try:
        action.encode("utf-8")
        return action
    except UnicodeEncodeError:
        return action.encode("utf-8", errors="replace").decode("utf-8")
