"""Code-execution sandboxes (installed as `spo_agents.sandboxes`).

Backends register in `spo_agents.registry.SANDBOXES` by name with lazy `"module:Class"` strings,
exactly like environments; third-party packages add theirs through the `spo_agents.sandboxes`
entry-point group. Built-ins: `local` (the embedded default), `docker`, `e2b`.

    from spo_agents.sandboxes import make_backend, open_session_sync
    backend = make_backend("local", timeout_s=5)
    with open_session_sync(backend) as s:
        print(s.run("x = 6 * 7\\nprint(x)").stdout)

A backend class may define a classmethod `available() -> (bool, reason)`; `available_backends()`
and `spo-agent sandbox list` use it. The protocol itself is in `sandboxes/base.py`.
"""

from __future__ import annotations

from typing import Any

from spo_agents.registry import SANDBOXES

from .base import SandboxBackend, SandboxLimits, SandboxResult, SandboxSession, SyncSession, run_sync, split_limits

BUILTIN_BACKENDS = {
    "local": (
        "spo_agents.sandboxes.local:LocalBackend",
        "persistent Python sessions forked from a pre-warmed worker, bubblewrap / namespaces",
    ),
    "docker": (
        "spo_agents.sandboxes.docker.backend:DockerBackend",
        "one container per session (needs a Docker engine)",
    ),
    "e2b": ("spo_agents.sandboxes.e2b:E2BBackend", "E2B cloud sandboxes (needs E2B_API_KEY)"),
}

for _name, (_entry, _description) in BUILTIN_BACKENDS.items():
    if _name not in SANDBOXES._specs:
        SANDBOXES.register(_name, _entry, description=_description)


def make_backend(name: str = "local", **options: Any) -> SandboxBackend:
    """Build the backend registered as `name` with `options` (e.g. `SandboxConfig.options`)."""
    return SANDBOXES.make(name, **options)


def backend_from_config(config: Any) -> SandboxBackend:
    """Build the backend a `SandboxConfig` describes (`spo_agents.config`).

    `timeout_s` and `memory_mb`, and any `SandboxLimits` field in `options`, become the backend's
    `limits` (`split_limits`, as backends do with their keyword arguments); the other `options` go
    to the backend as keyword arguments.
    """
    base = SandboxLimits(timeout_s=config.timeout_s, memory_mb=config.memory_mb)
    limits, options = split_limits(dict(getattr(config, "options", None) or {}), base)
    return make_backend(config.backend, limits=limits, **options)


def backend_availability(name: str) -> tuple[bool, str]:
    """(available, reason) for a registered backend, without starting it."""
    try:
        _, cls = SANDBOXES.load(name)
    except Exception as e:  # noqa: BLE001 - an unimportable plugin is unavailable, with the reason
        return False, f"cannot load: {e}"
    check = getattr(cls, "available", None)
    if check is None:
        return True, "no availability check (assumed available)"
    try:
        ok, reason = check()
    except Exception as e:  # noqa: BLE001
        return False, f"availability check failed: {type(e).__name__}: {e}"
    return bool(ok), str(reason)


def available_backends() -> dict[str, tuple[bool, str]]:
    """Every registered backend name -> (available, reason)."""
    return {spec.id: backend_availability(spec.id) for spec in SANDBOXES.list()}


def open_session_sync(
    backend: SandboxBackend | str = "local",
    *,
    stateless: bool | None = None,
    limits: SandboxLimits | None = None,
    **options: Any,
) -> SyncSession:
    """Open a session for synchronous callers (environments' `step`); runs on a shared loop.
    `stateless=None` keeps the backend's own default (e.g. `make_backend("local", stateless=True)`)."""
    if isinstance(backend, str):
        backend = make_backend(backend, **options)
    elif options:
        raise TypeError(f"backend options {sorted(options)} need a backend name, not a backend object")
    return SyncSession(run_sync(backend.open_session(stateless=stateless, limits=limits)))


__all__ = [
    "BUILTIN_BACKENDS",
    "SandboxBackend",
    "SandboxLimits",
    "SandboxResult",
    "SandboxSession",
    "SyncSession",
    "available_backends",
    "backend_availability",
    "backend_from_config",
    "make_backend",
    "open_session_sync",
    "run_sync",
    "split_limits",
]
