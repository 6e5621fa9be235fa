"""The `local` sandbox backend: a persistent Python session per episode, forked from a
pre-warmed worker (numpy and sympy imported once), isolated with bubblewrap or namespaces.

`backend.isolation` is `bubblewrap` (the default when `bwrap` works), `unshare` (the same
namespaces without bubblewrap) or `none` (rlimits only, when asked for). What each covers, what a
result means and what is not guaranteed: sandboxes/README.md; the processes and protocols inside:
docs/sandbox.md.

Modules: `backend` (`LocalBackend`), `session` (`LocalSession`), `channel` (the host's end of a
session), `cgroups` (the process cap for root), `zygote` (starts and drives the worker) and
`worker` (the program that runs inside the sandbox; standard library only).
"""

from __future__ import annotations

from .backend import ISOLATION_LEVELS, LocalBackend
from .cgroups import pids_root
from .session import LocalSession
from .zygote import bwrap_works, python_default

__all__ = ["ISOLATION_LEVELS", "LocalBackend", "LocalSession", "bwrap_works", "pids_root", "python_default"]
