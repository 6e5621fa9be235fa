"""Value rules shared by the config sections: each section checks its own fields on construction."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from spo_agents.errors import ConfigError


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


Rule = tuple[Callable[[Any], bool], str]


def check(where: str, value: Any, rule: Rule) -> None:
    """Raise `ConfigError` when `value` (the setting `where`) breaks `rule`."""
    ok, text = rule
    if not ok(value):
        raise ConfigError(f"`{where}` must be {text}, got {value!r}")


def require(section: str, obj: Any, rules: dict[str, Rule]) -> None:
    """Raise `ConfigError` for the first field of `obj` that breaks its rule (checked in order)."""
    for name, rule in rules.items():
        check(f"{section}.{name}", getattr(obj, name), rule)


POSITIVE = (lambda x: finite(x) and x > 0, "a finite number > 0")
NON_NEGATIVE = (lambda x: finite(x) and x >= 0, "a finite number >= 0")
AT_LEAST_1 = (lambda x: isinstance(x, int) and x >= 1, "an integer >= 1")
INT_NON_NEGATIVE = (lambda x: isinstance(x, int) and x >= 0, "an integer >= 0")
TOP_P = (lambda x: finite(x) and 0 < x <= 1, "in (0, 1]")
TIS_CAP = (lambda x: x is None or (finite(x) and x >= 1), "a number >= 1, or null (off)")
BEHAVIOUR_LOGPROBS = (lambda x: x in ("rollout", "recompute"), "`rollout` or `recompute`")
