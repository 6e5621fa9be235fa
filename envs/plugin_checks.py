"""The registration checks of `spo-agent check-env`: what `train` relies on before an episode runs.

- `env-id`: the id has the `name-vN` form (`train`, `rescore` and the run names read the version);
  `package.module:EnvClass` passes as an unregistered class.
- `constructor`: the class or factory takes `split` and `**kwargs`, since `train` and `eval`
  build it with `split=`, `sandbox=` and `sandbox_limits=` (and `--env-arg` options).
- `text-env`: the built env has every member of `spo_agents.envs.protocol.TextEnv`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

from spo_agents.envs.checker import CheckResult, closing, failure
from spo_agents.envs.protocol import protocol_problems

VERSIONED = re.compile(r"^[A-Za-z0-9][\w.-]*-v\d+$")
#: the keyword arguments `train` passes to every environment
TRAIN_KWARGS = ("split", "sandbox", "sandbox_limits")


def check_env_id(env_id: str) -> CheckResult:
    """`name-vN`, or an import path."""
    name = "env-id"
    if ":" in env_id:
        return CheckResult(name, True, f"`{env_id}` is an import path (unregistered); register it as `name-v0`")
    if VERSIONED.match(env_id):
        return CheckResult(name, True, f"`{env_id}` is versioned")
    base = re.sub(r"[^\w.-]+", "-", env_id).strip("-") or "my-env"
    return CheckResult(
        name,
        False,
        f"`{env_id}` has no version; register it as `{base}-v0` (bump to `-v1` when the prompt, parser or reward "
        "changes), since runs, transcripts and `spo-agent rescore` tell versions of an environment apart by it",
    )


def check_constructor(entry: Any) -> CheckResult:
    """The constructor takes `split` and passes other keyword arguments on (`**kwargs`)."""
    name = "constructor"
    try:
        params = inspect.signature(entry).parameters
    except (TypeError, ValueError):
        return CheckResult(name, True, "not introspectable; `make` below shows whether it can be built")
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    missing = [k for k in TRAIN_KWARGS if k not in params and not takes_any]
    if "split" not in params and not takes_any:
        missing = ["split", *[k for k in missing if k != "split"]]
    if not missing and takes_any:
        return CheckResult(name, True, "takes `split` and `**kwargs`")
    if not missing:
        return CheckResult(name, True, f"takes {', '.join(f'`{k}`' for k in TRAIN_KWARGS)}")
    what = getattr(entry, "__qualname__", repr(entry))
    return CheckResult(
        name,
        False,
        f"`{what}` does not take {', '.join(f'`{k}`' for k in missing)}, which `spo-agent train` passes to every "
        'environment; write `def __init__(self, split="train", **kwargs)` and pass `**kwargs` on to '
        "`MultiTurnEnv.__init__` (it takes `sandbox` and `sandbox_limits`)",
    )


def check_text_env(make_env: Callable[[], Any]) -> CheckResult:
    """Every member of `TextEnv` is there and well-formed."""
    name = "text-env"
    try:
        with closing(make_env()) as env:
            problems = protocol_problems(env)
    except Exception as e:
        return failure(name, e)
    if problems:
        return CheckResult(name, False, "; ".join(problems))
    return CheckResult(name, True, "env_id, problem_ids, stop_sequences, reply_role, answers_equivalent, reset/step")
