"""The project's exception hierarchy.

Every error raised on purpose by spo-agents derives from `SPOError`, so callers can catch the
whole family at one boundary. Messages say what was expected, what was found and what to do;
identifiers are written in backticks.

A bad rollout is data, not a crash: wrong answers, malformed model output and user-code failures
in the sandbox are recorded in trajectories and results. These exceptions are for programmer
errors, bad configuration and broken infrastructure.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SPOError(Exception):
    """Base class of every error spo-agents raises on purpose."""


class ConfigError(SPOError, ValueError):
    """A configuration file, override or argument is invalid."""


class EnvNotFound(SPOError, KeyError):
    """No environment is registered under the requested id."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class EnvError(SPOError):
    """An environment plugin is malformed (not a valid env, wrong signature, ...)."""


class SandboxError(SPOError):
    """The sandbox infrastructure failed (not the user's code: that is data in the result)."""


class SandboxNotFound(SPOError, KeyError):
    """No sandbox backend is registered under the requested name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RolloutError(SPOError):
    """Generating trajectories failed for a reason that is not the model's fault."""


class PolicyError(SPOError):
    """A policy backend cannot serve the request (unreachable server, missing feature, ...)."""


class DatasetError(SPOError, ValueError):
    """A problem file or source is malformed."""


class TrajectoryError(SPOError, ValueError):
    """A trajectory is malformed (fields of unequal length) or written by a newer schema."""


class CheckpointError(SPOError):
    """A checkpoint is missing, corrupt or incompatible with the requested run."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Return ` Did you mean `x`?` for the closest candidate, or an empty string."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" Did you mean `{close[0]}`?" if close else ""
