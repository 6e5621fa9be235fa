"""`check_options`: refuse environment options the constructor does not take, before it is built.

A constructor that takes `**kwargs` and passes them on (`def __init__(self, split="train",
**kwargs)` over `ToolEnv` / `MultiTurnEnv`) is followed up its base classes, so a typo in an
option of a built-in env is still caught with the nearest valid name."""

from __future__ import annotations

import inspect
import typing
from typing import Any

from spo_agents.errors import ConfigError, did_you_mean

_SIMPLE = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def constructor_params(cls: Any) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """(named parameters, type hints, whether any keyword is accepted) of `cls(...)`.

    For a class, `__init__`s that take `**kwargs` are followed up the MRO to the first one that
    does not; only when none of them closes the chain is any keyword accepted."""
    if not inspect.isclass(cls):
        params = dict(inspect.signature(cls).parameters)
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        return params, typing.get_type_hints(cls), takes_any
    params: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is object:
            return params, hints, True
        own = dict(inspect.signature(init).parameters)
        own.pop("self", None)
        for name, p in own.items():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                params.setdefault(name, p)
        for name, hint in typing.get_type_hints(init).items():
            hints.setdefault(name, hint)
        if not any(p.kind is p.VAR_KEYWORD for p in own.values()):
            return params, hints, False
    return params, hints, True


def check_options(env_id: str, cls: Any, options: dict[str, Any]) -> None:
    """Refuse options the environment's constructor does not take (with a suggestion) and values
    of the wrong simple type (int, float, bool, str, optionally None), before it is built."""
    try:
        params, hints, takes_any = constructor_params(cls)
    except (TypeError, ValueError, NameError):
        return  # not introspectable: the constructor reports for itself
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key, value in options.items():
        if key not in params:
            if takes_any:
                continue
            raise ConfigError(
                f"environment `{env_id}` has no option `{key}`.{did_you_mean(key, named)} "
                f"Its options: {', '.join(f'`{n}`' for n in named)} (`spo-agent envs` describes each env)"
            )
        hint = hints.get(key)
        allowed = [t for t in typing.get_args(hint) if t is not type(None)] if typing.get_args(hint) else [hint]
        if len(allowed) != 1 or allowed[0] not in _SIMPLE or (value is None and type(None) in typing.get_args(hint)):
            continue
        want = allowed[0]
        ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
        ok = ok or (want is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise ConfigError(f"environment `{env_id}` option `{key}` must be {_SIMPLE[want]}, got {value!r}")
