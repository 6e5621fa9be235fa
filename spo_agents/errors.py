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


class InfraError(SPOError):
    """Infrastructure failed (sandbox, policy server): the episode it hit is not evidence about
    the policy. Rollouts catch exactly this family and record it in the trajectory; every other
    exception (a bad config, a bug in a plugin) stops the run."""


class SandboxError(InfraError):
    """The sandbox infrastructure failed (not the user's code: that is data in the result)."""


class SandboxNotFound(SPOError, KeyError):
    """No sandbox backend is registered under the requested name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RolloutError(InfraError):
    """Generating trajectories failed for a reason that is not the model's fault."""


class PolicyError(InfraError):
    """A policy backend cannot serve the request (unreachable server, missing feature, ...)."""


class ServerUnavailable(PolicyError):
    """A policy server stopped answering: refused connections, timeouts, dropped connections or
    HTTP 5xx beyond the retries. A multi-server policy takes such a server out of rotation."""


class ServerLost(PolicyError):
    """The server an episode's turns went to left rotation mid-episode: its turns cannot continue
    on another server, so the episode is played again from its start (`run_episode`)."""


class NoServerLeft(SPOError):
    """Every server of a multi-server policy is out of rotation: nothing can generate, so this
    stops a run instead of being recorded as one episode's failure."""


class DatasetError(SPOError, ValueError):
    """A problem file or source is malformed."""


class TrajectoryError(SPOError, ValueError):
    """A trajectory is malformed (fields of unequal length) or written by a newer schema."""


class CheckpointError(SPOError):
    """A checkpoint is missing, corrupt or incompatible with the requested run."""


class PluginError(EnvError):
    """An environment raised while it ran: a bug in the plugin, never data and never retried."""

    @classmethod
    def from_exception(cls, env: object, exc: BaseException) -> PluginError:
        """Name the environment, the exception and the innermost frame of the plugin's code."""
        import inspect
        import traceback

        env_file = inspect.getsourcefile(type(env)) if hasattr(type(env), "__module__") else None
        frames = traceback.extract_tb(exc.__traceback__)
        own = [f for f in frames if env_file and f.filename == env_file] or frames
        where = f" at {own[-1].filename}:{own[-1].lineno} (in `{own[-1].name}`)" if own else ""
        return cls(
            f"the environment `{type(env).__name__}` raised {type(exc).__name__}: {exc}{where}. "
            "An environment must turn bad model output into an observation and a reward; an exception "
            "is a bug in the environment: fix it and run again"
        )


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Return ` Did you mean `x`?` for the closest candidate, or an empty string."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" Did you mean `{close[0]}`?" if close else ""
