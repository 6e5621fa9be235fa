"""`--env-arg KEY=VALUE`, parsed one way for `train`, `eval` and `estimate-values`.

KEY is an option name, or a dotted path into a nested option (`fields.prompt=question`); VALUE
is read as YAML (`4` is an integer, `[a, b]` a list, `source=jsonl:x.jsonl` a string)."""

from __future__ import annotations

import re
from typing import Any

from spo_agents.errors import ConfigError

HELP = "environment option as YAML, repeatable, e.g. --env-arg source=procedural:arith-mul"
_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def checked(items: list[str]) -> list[str]:
    """The items, each stripped, or `ConfigError` for one that is not `KEY=VALUE`."""
    out = []
    for item in items:
        key, sep, value = item.strip().partition("=")
        if not sep or not _KEY.fullmatch(key.strip()):
            raise ConfigError(
                f"`--env-arg {item}` must look like KEY=VALUE with KEY an option name (or a dotted path into a "
                "nested option), e.g. `--env-arg source=procedural:arith` or `--env-arg fields.prompt=question`"
            )
        out.append(f"{key.strip()}={value}")
    return out


def parse_env_args(items: list[str]) -> dict[str, Any]:
    """The environment's keyword arguments, nested where keys are dotted."""
    from spo_agents.config import apply_overrides

    return apply_overrides({}, checked(items))


def env_arg_overrides(items: list[str]) -> list[str]:
    """The items as config overrides of the environment's options (`env.kwargs.KEY=VALUE`)."""
    return [f"env.kwargs.{item}" for item in checked(items)]
