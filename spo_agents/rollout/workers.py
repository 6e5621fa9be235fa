"""Rollout workers on Ray: episodes (env + sandbox + policy client) run in Ray actors.

`RayWorkers` starts N actors (on a local Ray cluster, or on the cluster at `address`), each with
its own environments, sandbox and `openai` policy client pointed at the rollout server(s), and
runs each episode on the actor with the fewest episodes in flight. Trajectories come back one by
one as they finish: nothing waits for a batch.

It is an episode runner (`spo_agents.rollout.runner`): `Collector(None, policy, runner=workers)`
keeps the staleness bound, in-flight accounting and grouped delivery of the in-process collector.

- Weight versions: `pause()` drains every actor's policy and `resume(version)` reopens them at the
  new version, so each generation is stamped with the version of the weights that served it, as
  with the in-process collector (`set_served_model` reaches them too, for LoRA pushes).
- An actor that dies (killed, its node lost) is taken out of rotation with one log line; the
  episodes it had in flight come back as trajectories with `error` set and
  `info["lost_with_worker"]` (infrastructure errors: the collector counts them, keeps them out of
  training and runs them again); the others go on. When no actor is left, `run_episode` raises
  `RolloutError`. An environment's own exception in an actor comes back as a `PluginError`.

Ray is the optional `ray` extra; it is imported only when `RayWorkers` is built. The policy must
be an OpenAI-compatible server: an in-process model lives in the learner's process.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from spo_agents.errors import ConfigError, RolloutError
from spo_agents.rollout.policy.base import SamplingParams
from spo_agents.rollout.runner import LOST_WITH_WORKER, LocalRunner
from spo_agents.types import Trajectory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """What each rollout actor builds: environments of one registered id and split, with their
    sandbox, and an `openai` policy client (`make_policy("openai", model, **policy_kwargs)`).
    `tokenizer_model`, when set, is a `model.name` resolved on the actor's own node
    (`spo_agents.models.resolve_model`) to the client's tokenizer, so nodes need not share paths.

    Plain data, so it travels to actors on other machines."""

    env_id: str
    model: str
    policy_kwargs: dict[str, Any]
    split: str = "train"
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    sandbox: str | None = None
    sandbox_limits: Any = None  # a `SandboxLimits`
    sandbox_options: dict[str, Any] = field(default_factory=dict)
    tokenizer_model: str | None = None


class RolloutActor:
    """The body of one Ray actor: an env pool, a thread pool for blocking env steps, a policy client."""

    def __init__(self, spec: WorkerSpec, index: int) -> None:
        from spo_agents.rollout.policy import make_policy

        self.spec = spec
        self.index = index
        kwargs = dict(spec.policy_kwargs)
        if spec.tokenizer_model is not None:
            from spo_agents.models import resolve_model

            kwargs["tokenizer"] = str(resolve_model(spec.tokenizer_model))
        self.policy = make_policy("openai", spec.model, **kwargs)
        self.runner = LocalRunner(self._make_env, self.policy, threads=64)
        self._backend: Any = None

    def _make_env(self) -> Any:
        from spo_agents import envs

        sandbox: Any = self.spec.sandbox
        limits = self.spec.sandbox_limits
        if sandbox is not None and self.spec.sandbox_options:
            if self._backend is None:
                from spo_agents.sandboxes import make_backend, split_limits

                # limits named in the options join the spec's limits, as `backend_from_config` does
                limits, options = split_limits(dict(self.spec.sandbox_options), limits)
                self._backend = make_backend(sandbox, limits=limits, **options)
            sandbox, limits = self._backend, None
        extra = {} if sandbox is None else {"sandbox": sandbox, "sandbox_limits": limits}
        return envs.make(self.spec.env_id, split=self.spec.split, **extra, **self.spec.env_kwargs)

    async def connect(self) -> int:
        """Probe the server once; returns this actor's index."""
        await self.policy.connect()
        return self.index

    async def run(
        self, problem_id: str, sampling: SamplingParams, max_episode_tokens: int, seed: int | None
    ) -> Trajectory:
        traj = await self.runner.run_episode(
            problem_id, sampling=sampling, max_episode_tokens=max_episode_tokens, seed=seed
        )
        traj.info["rollout_worker"] = self.index
        return traj

    async def pause(self) -> None:
        await self.runner.pause()

    def resume(self, version: int) -> None:
        self.runner.resume(version)

    def set_served_model(self, name: str) -> None:
        self.runner.set_served_model(name)

    async def close(self) -> None:
        await self.runner.close()
        await self.policy.close()


@dataclass
class _Worker:
    index: int
    handle: Any
    in_flight: int = 0
    alive: bool = True


class RayWorkers:
    """A pool of `n` rollout actors on Ray (see the module docstring).

    Args:
        spec: what each actor builds.
        n: number of actors.
        address: a running cluster's address (`ray start --head` prints it); `None` starts a local
            one, bound to loopback, that `close()` stops.
        num_cpus: CPUs each actor reserves (its env steps and sandbox calls run there).
        version: the weight version the actors start at.
    """

    def __init__(
        self, spec: WorkerSpec, n: int = 2, *, address: str | None = None, num_cpus: float = 1.0, version: int = 0
    ) -> None:
        if n < 1:
            raise ConfigError(f"`ray.num_workers` must be >= 1, got {n}")
        try:
            import ray
        except ImportError as e:
            raise ConfigError(
                "`rollout.workers: ray` needs Ray: `pip install 'spo-agents[ray]'` (or `pip install ray`)"
            ) from e
        self._ray = ray
        self._started_ray = False
        if not ray.is_initialized():
            if address is None:
                ray.init(
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                    _node_ip_address="127.0.0.1",
                )
                self._started_ray = True
            else:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
        self.spec = spec
        self.version = version
        actor = ray.remote(num_cpus=num_cpus, max_restarts=0, max_concurrency=1000)(RolloutActor)
        self._workers = [_Worker(i, actor.remote(spec, i)) for i in range(n)]
        if version:
            for w in self._workers:
                w.handle.resume.remote(version)

    @property
    def alive(self) -> int:
        """Actors still in rotation."""
        return sum(w.alive for w in self._workers)

    @property
    def handles(self) -> list[Any]:
        """The live actors' Ray handles (for operators and tests)."""
        return [w.handle for w in self._workers if w.alive]

    async def connect(self) -> None:
        """Wait until every actor is up and has reached the server (its first probe)."""
        await asyncio.gather(*(self._call(w, w.handle.connect.remote()) for w in self._workers))

    async def run_episode(
        self, problem_id: str, *, sampling: SamplingParams, max_episode_tokens: int, seed: int | None
    ) -> Trajectory:
        """Run one episode on the least busy actor; an actor's death comes back as a trajectory
        with `error` set (or `RolloutError` when no actor is left)."""
        live = [w for w in self._workers if w.alive]
        if not live:
            raise RolloutError(
                f"every rollout worker ({len(self._workers)}) has died; see the Ray logs "
                "(`ray logs` or /tmp/ray/session_latest/logs) for why"
            )
        worker = min(live, key=lambda w: w.in_flight)
        worker.in_flight += 1
        try:
            ref = worker.handle.run.remote(problem_id, sampling, max_episode_tokens, seed)
            traj = await self._call(worker, ref)
        except RolloutError as e:
            return _failed(problem_id, self.spec.env_id, self.version, str(e), worker.index)
        finally:
            worker.in_flight -= 1
        return traj

    async def _call(self, worker: _Worker, ref: Any) -> Any:
        try:
            return await ref
        except self._ray.exceptions.RayActorError as e:
            if worker.alive:
                worker.alive = False
                log.warning(
                    "rollout worker %d died (%s); %d of %d left; its episodes in flight are counted as "
                    "infrastructure errors and their problems drawn again",
                    worker.index,
                    type(e).__name__,
                    self.alive,
                    len(self._workers),
                )
            raise RolloutError(f"rollout worker {worker.index} died: {type(e).__name__}") from None

    async def pause(self) -> None:
        """Drain every live actor's policy (no request straddles a weight push)."""
        await asyncio.gather(
            *(self._call(w, w.handle.pause.remote()) for w in self._workers if w.alive), return_exceptions=True
        )

    def resume(self, version: int) -> None:
        """Reopen every live actor's policy at `version`."""
        self.version = version
        for w in self._workers:
            if w.alive:
                w.handle.resume.remote(version)

    def set_served_model(self, name: str) -> None:
        """Name the served weights in every live actor's later requests (a pushed LoRA adapter)."""
        for w in self._workers:
            if w.alive:
                w.handle.set_served_model.remote(name)

    async def close(self) -> None:
        """Close the actors' envs and clients, end the actors, and stop Ray if it was started here."""
        live = [w for w in self._workers if w.alive]
        await asyncio.gather(*(self._call(w, w.handle.close.remote()) for w in live), return_exceptions=True)
        for w in live:
            self._ray.kill(w.handle)
            w.alive = False
        if self._started_ray:
            self._ray.shutdown()
            self._started_ray = False


def _failed(problem_id: str, env_id: str, version: int, why: str, worker: int) -> Trajectory:
    """The trajectory of an episode lost with its worker: no tokens, `error` set."""
    return Trajectory(
        problem_id=problem_id,
        env_id=env_id,
        prompt_ids=[],
        token_ids=[],
        loss_mask=[],
        logprobs=[],
        reward=0.0,
        policy_version=version,
        info={LOST_WITH_WORKER: worker, "rollout_worker": worker},
        error=f"RolloutError: {why}",
    )


__all__ = ["RayWorkers", "RolloutActor", "WorkerSpec"]
