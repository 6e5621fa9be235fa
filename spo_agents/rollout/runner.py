"""Where a collector's episodes run: an `EpisodeRunner` plays one episode when asked.

`Collector` decides what runs and when (staleness, in-flight accounting, grouped delivery, error
counts); the runner only plays episodes. Two runners exist:

- `LocalRunner`: this process. A pool of environments (one per running episode, reused) and a
  thread pool for their blocking steps, around `spo_agents.rollout.episode.run_episode`.
- `spo_agents.rollout.workers.RayWorkers`: Ray actors, each with its own environments, sandbox and
  policy client (`rollout.workers: ray`).

A runner is gated like a policy (`pause()` / `resume(version)` / `set_served_model(name)`) for the
policy its episodes use, so publishing new weights reaches it. An episode lost with the worker that
ran it comes back as a trajectory with `error` set and `info[LOST_WITH_WORKER]` holding the worker's
index: the collector counts it as an infrastructure error and runs the episode again.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable
from typing import Any, Protocol

from spo_agents.errors import PluginError, SPOError
from spo_agents.rollout.episode import run_episode
from spo_agents.rollout.policy.base import PolicyBackend, SamplingParams
from spo_agents.rollout.prompt_limit import PromptLimit
from spo_agents.types import Trajectory

__all__ = ["LOST_WITH_WORKER", "EpisodeRunner", "Gated", "LocalRunner"]

log = logging.getLogger(__name__)

# `Trajectory.info` key of an episode lost with its worker (the value: the worker's index)
LOST_WITH_WORKER = "lost_with_worker"


class Gated(Protocol):
    """What `spo_agents.serving.weight_sync.publish` drains and reopens around a weight push: a
    policy, a runner, or a collector (which gates both)."""

    async def pause(self) -> None: ...

    def resume(self, version: int) -> None: ...

    def set_served_model(self, name: str) -> None: ...


class EpisodeRunner(Gated, Protocol):
    """Plays episodes for a `Collector` (see the module docstring)."""

    async def run_episode(
        self, problem_id: str, *, sampling: SamplingParams, max_episode_tokens: int, seed: int | None
    ) -> Trajectory:
        """One episode of `problem_id`. Infrastructure failures come back as `Trajectory.error`;
        anything raised (an environment's bug as `PluginError`, no worker left as `RolloutError`)
        stops the collection."""
        ...

    async def close(self) -> None:
        """Release what the runner holds (safe to call twice)."""
        ...


class LocalRunner:
    """Episodes in this process (see the module docstring).

    Args:
        env_factory: returns a fresh environment; one per running episode, reused afterwards.
        policy: the policy the episodes sample from.
        threads: threads for the environments' blocking steps (one per episode in flight).
        prompt_limit: what to do with a prompt over a token limit (`None`: no limit).
    """

    def __init__(
        self,
        env_factory: Callable[[], Any],
        policy: PolicyBackend,
        *,
        threads: int,
        prompt_limit: PromptLimit | None = None,
    ) -> None:
        self.env_factory = env_factory
        self.policy = policy
        self.prompt_limit = prompt_limit
        self._envs: list[Any] = []
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="env")

    async def run_episode(
        self, problem_id: str, *, sampling: SamplingParams, max_episode_tokens: int, seed: int | None
    ) -> Trajectory:
        try:
            env = self._envs.pop() if self._envs else self.env_factory()
        except SPOError:
            raise
        except Exception as e:  # noqa: BLE001 - the factory is the environment's code too
            raise PluginError(f"creating an environment failed: {type(e).__name__}: {e}") from e
        try:
            traj = await run_episode(
                env,
                self.policy,
                problem_id,
                sampling=sampling,
                max_episode_tokens=max_episode_tokens,
                seed=seed,
                executor=self._executor,
                prompt_limit=self.prompt_limit,
            )
        except SPOError:
            env.close()
            raise
        except Exception as e:  # noqa: BLE001 - an environment's own exception is a bug in it
            env.close()
            raise PluginError.from_exception(env, e) from e
        except BaseException:  # cancelled: the env may be mid-step, so it is not reused
            env.close()
            raise
        self._envs.append(env)
        return traj

    async def pause(self) -> None:
        await self.policy.pause()

    def resume(self, version: int) -> None:
        self.policy.resume(version)

    def set_served_model(self, name: str) -> None:
        self.policy.set_served_model(name)

    async def close(self) -> None:
        """Stop the thread pool and close the pooled environments (safe to call twice)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        envs, self._envs = self._envs, []
        for env in envs:
            try:
                env.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                log.warning("closing an environment failed", exc_info=True)
