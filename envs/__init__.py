"""Environments (installed as `spo_agents.envs`): registry functions and the built-ins.

    from spo_agents import envs
    env = envs.make("math-python", split="train", sandbox="local")   # latest version
    envs.list_envs()            # ["math-python-v0", ...]
    envs.spec("math-python")    # the `Spec` of `math-python-v0`

Ids are versioned (`math-python-v0`); an id without its version means the highest registered
version, and `package.module:EnvClass` names a class directly. Plugins register through the
`spo_agents.envs` entry-point group (docs/environments.md). Importing this package registers the
built-ins and imports nothing heavy; the names below are loaded on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

from spo_agents.envs.options import check_options
from spo_agents.errors import EnvError, SPOError
from spo_agents.registry import ENVS, Spec, describe, env_requirement

__all__ = [
    "register",
    "make",
    "spec",
    "list_envs",
    "describe_env",
    "check_options",
    "MultiTurnEnv",
    "TextEnv",
    "StepOutcome",
    "TextSpace",
    "ChatSpace",
    "Timings",
    "Problem",
    "ProblemSet",
    "load_problems",
]

# Built-in environments: id -> (entry point, one-line description). Other envs add lines here.
BUILTINS: dict[str, tuple[str, str]] = {
    "math-python-v0": (
        "spo_agents.envs.math_python:MathPythonEnv",
        "Math with a Python tool: <code> runs in a sandbox, reward 1 if the last \\boxed{} matches (SPO paper Sec. 5)",
    ),
    "countdown-python-v0": (
        "spo_agents.envs.countdown:CountdownEnv",
        "Countdown numbers game with a Python tool: "
        "reward 1 if the \\boxed{} expression hits the target (exact, ast-parsed)",
    ),
    "code-tests-v0": (
        "spo_agents.envs.code_tests:CodeTestsEnv",
        "Write a Python function; user-turn feedback on examples, reward from hidden unit tests run in the sandbox",
    ),
    "reasoning-gym-v0": (
        "spo_agents.envs.reasoning_gym_env:ReasoningGymEnv",
        "Any reasoning-gym generator (`task=...`) with a Python tool, scored by the generator's own scorer",
    ),
}


def _register_builtins() -> None:
    for env_id, (entry_point, description) in BUILTINS.items():
        try:
            ENVS.register(env_id, entry_point, description=description)
        except SPOError:
            pass  # already registered (the package was imported before)


def register(
    id: str,
    entry_point: Any,
    *,
    description: str = "",
    kwargs: dict[str, Any] | None = None,
    override: bool = False,
) -> Spec:
    """Register an environment under a versioned id (`name-vN`).

    `entry_point` is a `"module:Class"` string (imported lazily), a `gymnasium.Env` subclass or
    a factory; `kwargs` are defaults for `make`."""
    return ENVS.register(
        id, entry_point, description=description, kwargs=kwargs, override=override, source="register()"
    )


def spec(id: str) -> Spec:
    """The registration of `id` (`math-python` resolves to the latest version)."""
    return ENVS.spec(id)


def list_envs() -> list[str]:
    """Every registered id, sorted, built-ins and entry-point plugins alike."""
    return [s.id for s in ENVS.list()]


def describe_env(id: str) -> str:
    """One-line description of `id` (the registered one, else the class docstring's first line)."""
    return describe(ENVS.spec(id))


def make(id: str, **kwargs: Any) -> Any:
    """Build the environment registered as `id` (or given as `package.module:EnvClass`) with the
    spec's default kwargs overridden by `kwargs` (for built-ins: `split`, `sandbox`,
    `sandbox_limits`, env options). The env's `spec` is a Gymnasium `EnvSpec` holding the
    registered id, which trajectories and transcripts record (`env.env_id`).

    Raises `EnvNotFound` ("Did you mean ...?") for unknown ids and `EnvError` when the plugin is
    not a valid environment (not a `gymnasium.Env`, or lacking a member of `TextEnv`)."""
    import gymnasium
    from gymnasium.envs.registration import EnvSpec

    from spo_agents.envs.protocol import protocol_problems

    spec_, obj = ENVS.load(id)  # validates the plugin (`registry.env_requirement`)
    options = {**spec_.kwargs, **kwargs}
    check_options(spec_.id, obj, options)
    env = obj(**options)
    if not isinstance(env, gymnasium.Env):
        _close_quietly(env)
        raise EnvError(f"{env_requirement(spec_)}; calling it returned {type(env).__name__}")
    entry = spec_.entry_point if isinstance(spec_.entry_point, str) else obj
    env.unwrapped.spec = EnvSpec(id=spec_.id, entry_point=entry, kwargs=options)
    missing = protocol_problems(env)
    if missing:
        _close_quietly(env)
        raise EnvError(f"`{spec_.id}` (from {spec_.source}) does not provide what rollouts need: " + "; ".join(missing))
    return env


def _close_quietly(env: Any) -> None:
    close = getattr(env, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # noqa: BLE001 - the error being raised says more
            pass


_LAZY = {
    "MultiTurnEnv": "spo_agents.envs.base",
    "StepOutcome": "spo_agents.envs.base",
    "TextSpace": "spo_agents.envs.spaces",
    "ChatSpace": "spo_agents.envs.spaces",
    "Timings": "spo_agents.envs.spaces",
    "TextEnv": "spo_agents.envs.protocol",
    "ProblemSet": "spo_agents.envs.problems",
    "load_problems": "spo_agents.envs.problems",
    "Problem": "spo_agents.types",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module `spo_agents.envs` has no attribute `{name}`")
    return getattr(importlib.import_module(module), name)


_register_builtins()
