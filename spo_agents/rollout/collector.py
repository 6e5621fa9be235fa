"""Single-stream collection: `Collector` keeps episodes in flight and hands out the first that finish.

No group barrier (paper Sec. 3 and 5.4): submitting more problems than a batch needs is
over-sampling; the first `n` finished are returned and the rest stay in flight. Trajectories
more than `max_staleness` policy versions old are dropped and counted. `group_size = G > 1` is
the grouped mode of the GRPO comparison: G episodes per problem under one `group_id`, delivered
together. An env's own exception stops the run (`next_batch` raises it as a `PluginError`).
Episodes are played by an episode runner (`spo_agents.rollout.runner`): by default in this process
(`LocalRunner`, around `run_episode`), or in Ray actors (`RayWorkers`); an episode lost with its
worker is counted as an infrastructure error and run again. The collector's tasks live on the
event loop that calls `next_batch`; keep one loop for its lifetime.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from spo_agents.errors import ConfigError, PluginError, RolloutError, SPOError
from spo_agents.rollout.episode import derive_seed, run_episode
from spo_agents.rollout.policy.base import PolicyBackend, SamplingParams
from spo_agents.rollout.prompt_limit import PromptLimit
from spo_agents.rollout.runner import LOST_WITH_WORKER, EpisodeRunner, Gated, LocalRunner
from spo_agents.types import Trajectory

__all__ = ["Collector", "CollectorStats", "run_episode"]


@dataclass
class CollectorStats:
    """Counters of a `Collector` (cumulative)."""

    submitted: int = 0
    started: int = 0
    finished: int = 0
    delivered: int = 0
    dropped_stale: int = 0
    errors: int = 0
    cancelled: int = 0
    resubmitted: int = 0  # episodes lost with their worker and run again (also counted in `errors`)


@dataclass
class _Job:
    problem_id: str
    group_id: str | None
    sample_index: int
    submitted_at: float


class Collector:
    """Single-stream collection (see the module docstring).

    Args:
        env_factory: returns a fresh environment; the local runner keeps a pool, one env per
            running episode, and reuses them (`None` with a `runner`, which makes its own).
        policy: the policy backend (the learner's client; its `version` is the current one).
        max_in_flight: episodes running at once.
        sampling: sampling settings of every generation call (stops come from the env).
        max_episode_tokens: token budget of one episode after the prompt.
        group_size: 1 for single-stream; G > 1 for grouped delivery (GRPO comparison).
        max_staleness: drop trajectories whose first token is more than this many policy versions
            old at delivery (`None`: keep all).
        include_errors: also return trajectories that failed for infrastructure reasons (they
            carry `error`); by default they are kept out of batches, counted in `stats.errors`
            and kept in `failed`. In grouped mode a group is always delivered whole.
        seed: base of the per-episode seeds.
        prompt_limit: what to do with a prompt over a token limit (`None`: no limit; local runner).
        runner: where episodes run (`None`: a `LocalRunner` in this process). A runner of its own
            (e.g. `RayWorkers`) is gated together with `policy` by `pause` / `resume` and closed
            by `close`.
    """

    def __init__(
        self,
        env_factory: Callable[[], Any] | None,
        policy: PolicyBackend,
        *,
        max_in_flight: int = 32,
        sampling: SamplingParams | None = None,
        max_episode_tokens: int = 1024,
        group_size: int = 1,
        max_staleness: int | None = None,
        include_errors: bool = False,
        seed: int = 0,
        max_consecutive_errors: int = 64,
        prompt_limit: PromptLimit | None = None,
        runner: EpisodeRunner | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ConfigError(f"`max_in_flight` must be >= 1, got {max_in_flight}")
        if group_size < 1:
            raise ConfigError(f"`group_size` must be >= 1, got {group_size}")
        if (runner is None) == (env_factory is None):
            raise ConfigError(
                "a `Collector` needs exactly one of `env_factory` (episodes in this process) and `runner` "
                "(episodes elsewhere, with their own environments)"
            )
        if runner is not None and prompt_limit is not None:
            raise ConfigError("`prompt_limit` applies to the local runner only; pass it without a `runner`")
        self.env_factory = env_factory
        self.policy = policy
        self.max_in_flight = max_in_flight
        self.sampling = sampling or SamplingParams()
        self.max_episode_tokens = max_episode_tokens
        self.group_size = group_size
        self.max_staleness = max_staleness
        self.include_errors = include_errors
        self.seed = seed
        self.max_consecutive_errors = max_consecutive_errors
        self.prompt_limit = prompt_limit
        self.stats = CollectorStats()
        self.failed: list[Trajectory] = []
        self._pending: collections.deque[_Job] = collections.deque()
        self._tasks: set[asyncio.Task] = set()
        self._ready: collections.deque[list[Trajectory]] = collections.deque()  # units: 1 or a whole group
        self._groups: dict[str, list[Trajectory]] = {}
        # submissions (one episode, or one group) not settled yet, per problem id: settled when
        # delivered, dropped as stale, failed (single-stream) or cancelled
        self._unsettled: collections.Counter[str] = collections.Counter()
        self._counter = 0
        self._consecutive_errors = 0
        self._fatal: BaseException | None = None  # a programmer error in an episode: raised by next_batch
        self._wake: asyncio.Event | None = None
        if runner is None:
            runner = LocalRunner(env_factory, policy, threads=max_in_flight, prompt_limit=prompt_limit)
            gates: list[Gated] = [runner]  # it samples from `policy`
        else:
            gates = [policy, runner]  # the learner's client, and the runner's own clients
        self.runner: EpisodeRunner = runner
        self._gates = gates

    # --- submission ---------------------------------------------------------------------------
    def submit(self, problem_ids: Iterable[str]) -> None:
        """Queue episodes: one per problem id (G per problem id in grouped mode)."""
        now = time.perf_counter()
        for pid in problem_ids:
            if self.group_size == 1:
                self._pending.append(_Job(str(pid), None, 0, now))
            else:
                gid = f"{pid}#{self._counter}"
                self._counter += 1
                for i in range(self.group_size):
                    self._pending.append(_Job(str(pid), gid, i, now))
            self.stats.submitted += self.group_size
            self._unsettled[str(pid)] += 1
        self._fill()

    def take_failed(self) -> list[Trajectory]:
        """The failed trajectories kept out of batches since the last call (the list is emptied)."""
        out, self.failed = self.failed, []
        return out

    @property
    def outstanding(self) -> int:
        """Episodes submitted and not settled yet (pending, running, or finished but not delivered)."""
        return sum(self._unsettled.values()) * self.group_size

    @property
    def busy_problems(self) -> list[str]:
        """Problem ids with an episode (or group) submitted and not settled yet."""
        return list(self._unsettled)

    def _settle(self, problem_id: str) -> None:
        self._unsettled[problem_id] -= 1
        if self._unsettled[problem_id] <= 0:
            del self._unsettled[problem_id]

    @property
    def in_flight(self) -> int:
        """Episodes running now."""
        return len(self._tasks)

    @property
    def pending(self) -> int:
        """Episodes submitted but not started yet."""
        return len(self._pending)

    @property
    def ready(self) -> int:
        """Finished trajectories not delivered yet."""
        return sum(len(u) for u in self._ready)

    def state_dict(self) -> dict[str, int]:
        """What a resumed run needs to draw the same episode seeds and group ids as an uninterrupted one."""
        return {"counter": self._counter}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._counter = int(state["counter"])

    # --- running ------------------------------------------------------------------------------
    def _episode_seed(self, job: _Job) -> int:
        self._counter += 1
        return derive_seed(self.seed, job.problem_id, job.group_id, job.sample_index, self._counter)

    def _fill(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # started by the next `next_batch`
        while self._pending and len(self._tasks) < self.max_in_flight:
            job = self._pending.popleft()
            task = asyncio.create_task(self._run(job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            self.stats.started += 1

    async def _run(self, job: _Job) -> None:
        queued = time.perf_counter() - job.submitted_at
        try:
            traj = await self.runner.run_episode(
                job.problem_id,
                sampling=self.sampling,
                max_episode_tokens=self.max_episode_tokens,
                seed=self._episode_seed(job),
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - anything but an infrastructure error stops the collector
            self._fatal = e if isinstance(e, SPOError) else PluginError(f"the episode runner raised {e!r}")
            self._fatal.__cause__ = None if self._fatal is e else e
            self._tasks.discard(asyncio.current_task())
            if self._wake is not None:
                self._wake.set()
            return
        self._tasks.discard(asyncio.current_task())  # no longer in flight (the done-callback comes later)
        traj.timings["queued"] = queued
        traj.group_id = job.group_id
        traj.sample_index = job.sample_index
        if traj.error is not None and LOST_WITH_WORKER in traj.info:
            self._lost(traj, job)
        else:
            self._finished(traj)
        self._fill()
        if self._wake is not None:
            self._wake.set()

    def _lost(self, traj: Trajectory, job: _Job) -> None:
        """An episode lost with its worker: an infrastructure error (kept out of batches, in
        `failed`), and the same job runs again first, so its problem (or group) stays whole."""
        self.stats.finished += 1
        self.stats.errors += 1
        self._consecutive_errors += 1
        self.stats.resubmitted += 1
        self.failed.append(traj)
        self._pending.appendleft(job)

    def _finished(self, traj: Trajectory) -> None:
        self.stats.finished += 1
        if traj.error is not None:
            self.stats.errors += 1
            self._consecutive_errors += 1
        else:
            self._consecutive_errors = 0
        if traj.group_id is None:
            if traj.error is not None and not self.include_errors:
                self.failed.append(traj)
                self._settle(traj.problem_id)
            else:
                self._ready.append([traj])
            return
        members = self._groups.setdefault(traj.group_id, [])
        members.append(traj)
        if len(members) == self.group_size:
            del self._groups[traj.group_id]
            self._ready.append(sorted(members, key=lambda t: t.sample_index))

    def _stale(self, unit: list[Trajectory]) -> bool:
        if self.max_staleness is None:
            return False
        return any(self.policy.version - t.policy_version > self.max_staleness for t in unit if t.policy_versions)

    async def next_batch(self, n: int) -> list[Trajectory]:
        """The first `n` trajectories to finish (grouped mode: `n / G` whole groups).

        Waits as needed; returns fewer only when nothing is pending or running any more.
        Raises `RolloutError` when the last `max_consecutive_errors` episodes all failed.
        """
        if n % self.group_size:
            raise ConfigError(f"in grouped mode `n` must be a multiple of the group size {self.group_size}, got {n}")
        if self._wake is None:
            self._wake = asyncio.Event()
        out: list[Trajectory] = []
        while True:
            if self._fatal is not None:
                raise self._fatal
            self._fill()
            while self._ready and len(out) < n:
                unit = self._ready.popleft()
                if self._stale(unit):
                    self.stats.dropped_stale += len(unit)
                    self._settle(unit[0].problem_id)
                    continue
                out += unit
                self.stats.delivered += len(unit)
                self._settle(unit[0].problem_id)
            if len(out) >= n or (not self._tasks and not self._pending):
                return out
            if self._consecutive_errors >= self.max_consecutive_errors:
                last = self.failed[-1].error if self.failed else "see the log"
                raise RolloutError(
                    f"the last {self._consecutive_errors} episodes all failed for infrastructure reasons "
                    f"(last: {last}); fix the environment, sandbox or policy server"
                )
            self._wake.clear()
            await self._wake.wait()

    async def cancel(self) -> int:
        """Cancel every pending and running episode; returns how many were cancelled."""
        n = len(self._pending) + len(self._tasks)
        self._pending.clear()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._groups.clear()
        self.stats.cancelled += n
        # what is left unsettled is what finished and waits for delivery
        self._unsettled = collections.Counter(unit[0].problem_id for unit in self._ready)
        return n

    # --- weight versions: what `spo_agents.serving.weight_sync.publish` gates ---------------------
    async def pause(self) -> None:
        """Hold new generations of the policy and of the runner's own clients; return once none runs."""
        await asyncio.gather(*(g.pause() for g in self._gates))

    def resume(self, version: int) -> None:
        """Reopen them all at `version` (generations are stamped with it)."""
        for g in self._gates:
            g.resume(version)

    def set_served_model(self, name: str) -> None:
        for g in self._gates:
            g.set_served_model(name)

    async def close(self) -> None:
        """Cancel what runs and close the runner (its pooled environments; safe to call twice)."""
        await self.cancel()
        await self.runner.close()
