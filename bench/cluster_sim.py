"""Cluster-scale throughput model: single-stream vs grouped vs asynchronous collection.

A discrete-event simulation (pure Python + numpy, deterministic by seed) of three ways to collect
the trajectories of an RL step, driven by per-component costs:

- `single` (SPO, paper Sec. 3 and 5.4): N episodes in flight, a finished one is replaced at once,
  a step takes the first B that finish; the rest stay in flight into the next step (they finish
  under newer weights: `staleness` counts the versions).
- `grouped` (GRPO): G samples per prompt, a step needs B / G whole groups; no episode of the next
  step starts before the step is complete (the barrier of a synchronous group trainer).
- `async`: generation never waits for the learner; the learner takes B finished trajectories
  whenever it is free, trajectories more than `max_staleness` policy versions old are dropped, and
  no episode starts more than `max_staleness + 1` batches ahead of the learner (a throttle).

Costs (`Engine`, `Workload`, `Cluster`):
- **decode**: each inference replica (one server) advances every sequence it is decoding by one
  token per decode step; a step takes `base(c) + kv_s_per_token * S` seconds for `c` sequences
  holding `S` tokens of context. `base(c)` is a batching curve: interpolated from measured points
  (CPU) or a bandwidth/compute roofline (GPU), so a server's throughput saturates.
- **KV cache**: a replica admits a request while the context fits below a 5% watermark and, when
  the growing context fills the cache, preempts the sequence admitted last (it recomputes its
  context when readmitted), as vLLM does. Episodes stay on the replica they started on.
- **prefill**: engine time per new token of a request (the prompt, then each tool output; the
  rest of the context is a prefix-cache hit); decoding on that replica waits for it.
- **tools**: a tool call waits a drawn latency without holding a decode slot.
- **requests**: a fixed latency before each generation request, and optionally one serial
  handler every request passes through in turn (the CPU benchmark's client and API server).
- **learner**: synchronous policies (`single`, `grouped`) share the GPUs with the learner: decoding
  pauses for the learner step and the weight push. `async` gives the learner its own GPUs and
  pauses decoding only for the push. The learner step's time follows the batch's token count.

Departure from the paper's Sec. 5.4 simulation: there a sample's time does not depend on how
many others run; here the engine couples them (stragglers decode faster once the others are
done, and a saturated server gains little from more sequences in flight). `paper_check`
reproduces the paper's own setting for comparison.

`bench/gpu_figures.json` holds the GPU inputs, each with its source or marked as an assumption;
the CPU inputs are transcribed below from `bench/RESULTS.md`, section "Rollout throughput
(bench/rollout_throughput.py)", rerun on an idle machine (2026-11-27).

Usage:

    .venv/bin/python bench/cluster_sim.py --quick      # seconds: validation and one cluster size
    .venv/bin/python bench/cluster_sim.py              # every table (10-20 minutes on 2 cores)
    .venv/bin/python bench/cluster_sim.py --json out.json
"""

from __future__ import annotations

import argparse
import bisect
import collections
import dataclasses
import heapq
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spo_agents.errors import ConfigError

HERE = Path(__file__).resolve().parent
FIGURES = HERE / "gpu_figures.json"
POLICIES = ("single", "grouped", "async")
KV_WATERMARK = 0.05  # share of a replica's KV cache kept free at admission


# --- inputs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Engine:
    """Cost model of one inference replica.

    Attributes:
        points: (concurrent sequences, decode step seconds) of the batching curve, sorted by
            concurrency; linear in between, extended linearly beyond the ends (one point: flat).
        kv_s_per_token: extra step time per token of context held by the decoding sequences.
        max_seqs: sequences decoded at once; further requests wait in the replica's queue.
        kv_tokens: tokens of context the replica can hold; a request is admitted only if its
            context fits next to the others' current context.
        prefill_s_per_token: engine time per new token of a request (the prompt, then each tool
            output; earlier context is a prefix-cache hit); decoding on the replica waits for it.
    """

    points: tuple[tuple[float, float], ...]
    kv_s_per_token: float = 0.0
    max_seqs: int = 1 << 30
    kv_tokens: float = math.inf
    prefill_s_per_token: float = 0.0

    def __post_init__(self) -> None:
        if not self.points or any(s <= 0 or c < 0 for c, s in self.points):
            raise ConfigError(
                f"`Engine.points` must be (concurrency, positive step seconds) pairs, got {self.points!r}"
            )
        if list(self.points) != sorted(self.points):
            raise ConfigError(f"`Engine.points` must be sorted by concurrency, got {self.points!r}")
        if self.kv_s_per_token < 0 or self.max_seqs < 1:
            raise ConfigError(
                f"`kv_s_per_token` must be >= 0 and `max_seqs` >= 1, got {self.kv_s_per_token}, {self.max_seqs}"
            )
        object.__setattr__(self, "_cache", {})

    def base(self, c: int) -> float:
        """Decode step seconds at `c` sequences, context cost aside."""
        cache: dict[int, float] = self._cache  # type: ignore[attr-defined]
        if c in cache:
            return cache[c]
        pts = self.points
        if len(pts) == 1:
            out = pts[0][1]
        else:
            i = min(max(bisect.bisect_right([p[0] for p in pts], c) - 1, 0), len(pts) - 2)
            (c0, s0), (c1, s1) = pts[i], pts[i + 1]
            out = max(s0 + (s1 - s0) * (c - c0) / (c1 - c0), 1e-9)
        cache[c] = out
        return out


@dataclass(frozen=True)
class Workload:
    """How episodes are drawn.

    Generated tokens of an episode: `clip(round(gen_median * exp(gen_sigma * Z)), gen_min,
    gen_max)`, split evenly over its generation turns. Tool calls: `calls_max` trials of
    probability `calls_mean / calls_max` (a fixed count when they are equal); each call waits
    `clip(tool_median_s * exp(tool_sigma * Z), 0, tool_max_s)` seconds and appends
    `tool_output_tokens` of context. `trailing_tool`: the episode ends with its last tool call
    (the CPU benchmark's env step) instead of a final generation turn.
    """

    gen_median: float
    gen_sigma: float
    gen_max: float
    gen_min: float = 1.0
    prompt_tokens: int = 0
    calls_mean: float = 0.0
    calls_max: int = 0
    tool_median_s: float = 0.0
    tool_sigma: float = 0.0
    tool_max_s: float = math.inf
    tool_output_tokens: int = 0
    trailing_tool: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.calls_mean <= self.calls_max:
            raise ConfigError(f"`calls_mean` must lie in [0, calls_max = {self.calls_max}], got {self.calls_mean}")
        if self.gen_median <= 0 or self.gen_sigma < 0 or self.tool_sigma < 0 or self.tool_median_s < 0:
            raise ConfigError(
                "`gen_median` must be > 0 and `gen_sigma`, `tool_sigma`, `tool_median_s` >= 0, "
                f"got {self.gen_median}, {self.gen_sigma}, {self.tool_sigma}, {self.tool_median_s}"
            )
        if self.trailing_tool and self.calls_max == 0:
            raise ConfigError("`trailing_tool` needs at least one tool call (`calls_max` >= 1)")

    def draw(self, rng: Draws) -> Episode:
        """One episode's turns."""
        total = min(max(round(self.gen_median * math.exp(self.gen_sigma * rng.normal())), self.gen_min), self.gen_max)
        if self.calls_max == 0:
            calls = 0
        elif self.calls_mean == self.calls_max:
            calls = self.calls_max
        else:
            p = self.calls_mean / self.calls_max
            calls = sum(rng.uniform() < p for _ in range(self.calls_max))
        turns = calls if self.trailing_tool else calls + 1
        tools = [
            min(self.tool_median_s * math.exp(self.tool_sigma * rng.normal()), self.tool_max_s) for _ in range(calls)
        ]
        per = max(total / turns, 1.0)
        return Episode(tokens=[per] * turns, tools=tools, prompt=self.prompt_tokens, tool_out=self.tool_output_tokens)


class Draws:
    """Seeded standard normal and uniform draws, generated by numpy in blocks (scalar calls into
    numpy are slow)."""

    def __init__(self, seed: int, block: int = 4096) -> None:
        self.rng = np.random.default_rng(seed)
        self.block = block
        self._n: list[float] = []
        self._u: list[float] = []

    def normal(self) -> float:
        if not self._n:
            self._n = self.rng.standard_normal(self.block).tolist()[::-1]
        return self._n.pop()

    def uniform(self) -> float:
        if not self._u:
            self._u = self.rng.random(self.block).tolist()[::-1]
        return self._u.pop()


@dataclass
class Episode:
    """One episode: generated tokens of each turn; `tools[i]` is the latency of the tool call after
    turn i (as many calls as turns when the episode ends with a tool call, else one fewer)."""

    tokens: list[float]
    tools: list[float]
    prompt: int = 0
    tool_out: int = 0


@dataclass(frozen=True)
class Cluster:
    """Where episodes run and what a step costs besides generation.

    - `replicas`: inference servers (episodes go to the least loaded one).
    - `request_latency_s`: delay before each generation request reaches its server.
    - `frontend_s`: time each request holds one serial handler shared by all requests (0: none).
    - `learner_fixed_s`, `learner_s_per_token`, `learner_s_per_token2`: the learner step takes
      `fixed + sum over the batch's trajectories of (a L + b L^2)` for L tokens each (the
      quadratic term is attention).
    - `push_s`: decoding pauses this long after each learner step (weight push).
    - `startup_s_per_slot`: a serial delay per in-flight slot before the first episode starts
      (the CPU benchmark builds one environment per slot when a run starts).
    """

    replicas: int
    engine: Engine
    request_latency_s: float = 0.0
    frontend_s: float = 0.0
    learner_fixed_s: float = 0.0
    learner_s_per_token: float = 0.0
    learner_s_per_token2: float = 0.0
    push_s: float = 0.0
    startup_s_per_slot: float = 0.0

    def learner_s(self, lengths: Iterable[float]) -> float:
        """The learner step's seconds for trajectories of these token counts."""
        if not (self.learner_fixed_s or self.learner_s_per_token or self.learner_s_per_token2):
            return 0.0
        a, b = self.learner_s_per_token, self.learner_s_per_token2
        return self.learner_fixed_s + sum(a * n + b * n * n for n in lengths)


@dataclass(frozen=True)
class Policy:
    """A collection policy: `name` in `single`, `grouped`, `async`; B accepted trajectories per
    step, N in flight, group size G (`grouped`), staleness bound (`async`)."""

    name: str
    batch: int
    in_flight: int
    group: int = 1
    max_staleness: int = 1

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ConfigError(f"unknown policy `{self.name}`; expected one of {', '.join(POLICIES)}")
        if self.batch < 1 or self.in_flight < 1:
            raise ConfigError(f"`batch` and `in_flight` must be >= 1, got {self.batch}, {self.in_flight}")
        if self.name == "grouped":
            if self.batch % self.group or self.in_flight % self.group:
                raise ConfigError(
                    f"grouped: `batch` ({self.batch}) and `in_flight` ({self.in_flight}) must be "
                    f"multiples of the group size {self.group}"
                )
            if self.in_flight < self.batch:
                raise ConfigError(
                    f"grouped: `in_flight` ({self.in_flight}) must be >= `batch` ({self.batch}): "
                    f"a step needs B / G whole groups"
                )
        if self.max_staleness < 0:
            raise ConfigError(f"`max_staleness` must be >= 0, got {self.max_staleness}")


@dataclass
class Result:
    """What a run measured. `traj_per_s` counts accepted trajectories per second over the
    measured steps; `staleness` is the mean number of policy versions between an accepted
    trajectory's first token and the learner step that uses it."""

    policy: str
    traj_per_s: float
    step_s: float
    staleness: float
    dropped: int
    accepted: int
    decode_busy: float  # share of replica-seconds with at least one sequence decoding
    step_times: list[float] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "step_times"}


# --- the simulation -----------------------------------------------------------------------------
class _Ep:
    __slots__ = (
        "ctx",
        "ep",
        "group",
        "id",
        "join_v",
        "left",
        "new_tokens",
        "offset",
        "replica",
        "serial",
        "start",
        "target",
        "tokens",
        "turn",
        "version",
    )

    def __init__(self, eid: int, ep: Episode, group: int) -> None:
        self.id, self.ep, self.group = eid, ep, group
        self.turn = 0
        self.ctx = float(ep.prompt)  # context held when decoding resumes
        self.replica = -1
        self.start = 0.0
        self.version = 0
        self.left = 0.0  # tokens of the current turn still to decode
        self.join_v = self.target = self.offset = 0.0
        self.tokens = float(ep.prompt)  # trained sequence length so far
        self.new_tokens = float(ep.prompt)  # context not in the replica's cache (to prefill)
        self.serial = 0


class _Replica:
    """Processor sharing in decode steps: `V` counts the steps done; a sequence joining at V0 for
    L tokens finishes when V reaches V0 + L. Context of the decoding sequences: `const + c * V`.
    When that context outgrows `kv_tokens`, the sequence admitted last is preempted: it goes back
    to the front of the queue and recomputes (prefills) its whole context when readmitted."""

    __slots__ = (
        "V",
        "busy_s",
        "const",
        "engine",
        "heap",
        "members",
        "paused",
        "preempted",
        "queue",
        "serial",
        "stamp",
        "t",
    )

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.V = 0.0
        self.t = 0.0
        self.const = 0.0
        self.members: dict[int, _Ep] = {}  # in admission order
        self.heap: list[tuple[float, int, int]] = []  # (target V, episode id, admission serial)
        self.queue: collections.deque[_Ep] = collections.deque()
        self.paused = False
        self.stamp = 0
        self.busy_s = 0.0
        self.serial = 0
        self.preempted = 0

    @property
    def c(self) -> int:
        return len(self.members)

    def _rate(self) -> tuple[float, float]:
        """Step time at the current V and its growth per step: (A, k c)."""
        e, c = self.engine, len(self.members)
        return e.base(c) + e.kv_s_per_token * (self.const + c * self.V), e.kv_s_per_token * c

    def advance(self, now: float) -> None:
        if now <= self.t:
            return
        if not self.paused and self.members:
            a, g = self._rate()
            dt = now - self.t
            self.V += 2 * dt / (a + math.sqrt(a * a + 2 * g * dt))  # root of a dV + g dV^2 / 2 = dt
            self.busy_s += dt
        self.t = now

    def _top(self) -> float:
        while self.heap:
            target, eid, serial = self.heap[0]
            e = self.members.get(eid)
            if e is not None and e.serial == serial:
                return target
            heapq.heappop(self.heap)
        return math.inf

    def next_time(self) -> float:
        """When the next sequence finishes its turn or the context outgrows the cache."""
        if self.paused or not self.members:
            return math.inf
        dv = self._top() - self.V
        room = self.engine.kv_tokens - self.context()
        if len(self.members) > 1 and 0 < room < math.inf:
            dv = min(dv, room / len(self.members))
        dv = max(dv, 0.0)
        a, g = self._rate()
        return self.t + a * dv + g * dv * dv / 2

    def context(self) -> float:
        return self.const + len(self.members) * self.V

    def fits(self, e: _Ep) -> bool:
        """Admission: a free sequence slot, and the context fits below the watermark (headroom
        for the admitted sequences to grow before one must be preempted)."""
        eng = self.engine
        return not self.members or (
            len(self.members) < eng.max_seqs and self.context() + e.ctx <= eng.kv_tokens * (1 - KV_WATERMARK)
        )

    def join(self, e: _Ep, now: float) -> None:
        """Admit `e` for its remaining `left` tokens; its prefill holds up the replica's decoding."""
        if e.new_tokens and self.engine.prefill_s_per_token:
            self.advance(now)
            self.t = max(self.t, now) + e.new_tokens * self.engine.prefill_s_per_token
        e.new_tokens = 0.0
        self.serial += 1
        e.serial = self.serial
        e.join_v = self.V
        e.target = self.V + e.left
        e.offset = e.ctx - self.V
        self.const += e.offset
        self.members[e.id] = e
        heapq.heappush(self.heap, (e.target, e.id, e.serial))

    def _remove(self, e: _Ep) -> float:
        """Take `e` out; returns the tokens it decoded since it was admitted."""
        del self.members[e.id]
        self.const -= e.offset
        if not self.members:
            self.const = 0.0
        done = min(self.V, e.target) - e.join_v
        e.ctx += done
        e.tokens += done
        e.left = max(e.target - self.V, 0.0)
        return done

    def leave_due(self) -> list[_Ep]:
        """Sequences whose turn is decoded; then preemption while the context overflows."""
        out = []
        while self._top() <= self.V + 1e-6:
            _, eid, _ = heapq.heappop(self.heap)
            e = self.members[eid]
            self._remove(e)
            e.left = 0.0
            out.append(e)
        while len(self.members) > 1 and self.context() >= self.engine.kv_tokens - 1e-3:
            e = self.members[next(reversed(self.members))]
            self._remove(e)
            e.new_tokens = e.ctx  # recomputed on readmission
            self.queue.appendleft(e)
            self.preempted += 1
        return out


class Simulation:
    """One run of a policy on a cluster. `episodes` (optional) replaces the workload's draws by
    a fixed sequence (tests); otherwise episodes are drawn in start order from one seeded
    generator, so two policies with the same seed see the same episodes in the same order."""

    def __init__(
        self,
        policy: Policy,
        cluster: Cluster,
        workload: Workload | None,
        *,
        seed: int = 0,
        episodes: Iterable[Episode] | None = None,
    ) -> None:
        if workload is None and episodes is None:
            raise ConfigError("a simulation needs a `workload` or a sequence of `episodes`")
        self.policy, self.cluster = policy, cluster
        self.rng = Draws(seed)
        self._fixed: Iterator[Episode] | None = iter(episodes) if episodes is not None else None
        self.workload = workload
        self.replicas = [_Replica(cluster.engine) for _ in range(cluster.replicas)]
        self.events: list[tuple[float, int, str, int, int]] = []
        self.counter = 0
        self.eps: dict[int, _Ep] = {}
        self.next_id = 0
        self.now = 0.0
        self.version = 0
        self.in_flight = 0
        self.started = 0
        self.ready: collections.deque[_Ep] = collections.deque()
        self.step_ends: list[float] = []
        self.staleness: list[int] = []
        self.dropped = 0
        self.accepted = 0
        self.learning = False  # a learner step (and, when synchronous, its pause) is under way
        self.pushing = False  # asynchronous: decoding paused for a weight push
        self.load = [0] * cluster.replicas  # episodes assigned per replica
        self.load_heap = [(0, i) for i in range(cluster.replicas)]
        self.frontend_free = 0.0
        self.exhausted = False
        # grouped
        self.group_done: dict[int, int] = {}
        self.groups_ready = 0
        self.next_group = 0

    # --- events ---------------------------------------------------------------------------------
    def _push(self, t: float, kind: str, a: int = 0, b: int = 0) -> None:
        self.counter += 1
        heapq.heappush(self.events, (t, self.counter, kind, a, b))

    def _schedule(self, r: int) -> None:
        rep = self.replicas[r]
        rep.stamp += 1
        t = rep.next_time()
        if t < math.inf:
            self._push(t, "replica", r, rep.stamp)

    def _draw(self) -> Episode | None:
        if self._fixed is not None:
            return next(self._fixed, None)
        assert self.workload is not None
        return self.workload.draw(self.rng)

    # --- episodes -------------------------------------------------------------------------------
    def _start(self, group: int = -1) -> bool:
        """Start the next episode; False when a fixed episode list has run out."""
        drawn = self._draw()
        if drawn is None:
            self.exhausted = True
            return False
        e = _Ep(self.next_id, drawn, group)
        self.next_id += 1
        # a pause ends with the new weights: episodes started in it decode with them
        e.start = self.now
        paused = self.pushing if self.policy.name == "async" else self.learning
        e.version = self.version + (1 if paused else 0)
        self.eps[e.id] = e
        self.in_flight += 1
        self.started += 1
        self._request(e)
        return True

    def _request(self, e: _Ep) -> None:
        c = self.cluster
        t = self.now + c.request_latency_s
        if c.frontend_s > 0:  # one serial handler: requests queue for it in arrival order
            t = self.frontend_free = max(t, self.frontend_free) + c.frontend_s
        if t > self.now:
            self._push(t, "request", e.id)
        else:
            self._submit(e)

    def _pick(self) -> int:
        """The replica with the fewest episodes (lowest index on ties); a lazy heap of loads."""
        while True:
            load, i = self.load_heap[0]
            if load == self.load[i]:
                return i
            heapq.heappop(self.load_heap)

    def _add_load(self, i: int, d: int) -> None:
        self.load[i] += d
        heapq.heappush(self.load_heap, (self.load[i], i))

    def _submit(self, e: _Ep) -> None:
        if e.replica < 0:
            e.replica = self._pick()
            self._add_load(e.replica, 1)
        rep = self.replicas[e.replica]
        rep.advance(self.now)
        e.left = e.ep.tokens[e.turn]
        if not rep.queue and rep.fits(e):
            rep.join(e, self.now)
            self._schedule(e.replica)
        else:
            rep.queue.append(e)

    def _replica_event(self, r: int, stamp: int) -> None:
        rep = self.replicas[r]
        if stamp != rep.stamp:
            return
        rep.advance(self.now)
        done = rep.leave_due()
        while rep.queue and rep.fits(rep.queue[0]):
            rep.join(rep.queue.popleft(), self.now)
        self._schedule(r)
        for e in done:
            if e.turn < len(e.ep.tools):
                self._push(self.now + e.ep.tools[e.turn], "tool", e.id)
            else:
                self._next_turn(e)

    def _tool_done(self, e: _Ep) -> None:
        e.ctx += e.ep.tool_out
        e.tokens += e.ep.tool_out
        e.new_tokens += e.ep.tool_out
        self._next_turn(e)

    def _next_turn(self, e: _Ep) -> None:
        e.turn += 1
        if e.turn < len(e.ep.tokens):
            self._request(e)
            return
        self.in_flight -= 1
        self._add_load(e.replica, -1)
        del self.eps[e.id]
        self._finished(e)

    # --- policies -------------------------------------------------------------------------------
    def _fill(self) -> None:
        p = self.policy
        if p.name == "single":
            while self.in_flight < p.in_flight and self._start():
                pass
        elif p.name == "async":
            # throttle: nothing starts more than max_staleness + 1 batches ahead of the learner
            cap = (self.version + p.max_staleness + 1) * p.batch + self.dropped
            while self.in_flight < p.in_flight and self.started < cap and self._start():
                pass
        else:  # grouped: whole groups, only between steps
            while self.in_flight + p.group <= p.in_flight and not self.exhausted:
                g = self.next_group
                self.next_group += 1
                self.group_done[g] = 0
                for _ in range(p.group):
                    self._start(g)

    def _finished(self, e: _Ep) -> None:
        p = self.policy
        if p.name == "grouped":
            self.group_done[e.group] += 1
            self.ready.append(e)
            if self.group_done[e.group] == p.group:
                self.groups_ready += 1
            if self.groups_ready * p.group >= p.batch and not self.learning:
                self._take_groups()
            return
        self.ready.append(e)
        if p.name == "single":
            self._fill()
            if len(self.ready) >= p.batch and not self.learning:
                self._take([self.ready.popleft() for _ in range(p.batch)])
        else:
            self._fill()
            self._async_learn()

    def _take_groups(self) -> None:
        p = self.policy
        complete = {g for g, n in self.group_done.items() if n == p.group}
        keep = sorted(complete)[: p.batch // p.group]
        chosen = [e for e in self.ready if e.group in keep]
        self.ready = collections.deque(e for e in self.ready if e.group not in keep)
        for g in keep:
            del self.group_done[g]
        self.groups_ready -= len(keep)
        self._take(chosen)

    def _take(self, batch: list[_Ep]) -> None:
        """A synchronous step: the learner pauses decoding, then pushes weights."""
        self.accepted += len(batch)
        self.staleness += [self.version - e.version for e in batch]
        pause = self.cluster.learner_s(e.tokens for e in batch) + self.cluster.push_s
        if pause > 0:
            self.learning = True
            self._pause_all(True)
            self._push(self.now + pause, "resume")
        else:
            self._step_end()

    def _step_end(self) -> None:
        self.version += 1
        self.step_ends.append(self.now)
        self.learning = False
        if self.policy.name == "grouped":
            self._fill()
            if self.groups_ready * self.policy.group >= self.policy.batch:
                self._take_groups()
        elif len(self.ready) >= self.policy.batch:
            self._take([self.ready.popleft() for _ in range(self.policy.batch)])

    def _pause_all(self, paused: bool) -> None:
        for r, rep in enumerate(self.replicas):
            rep.advance(self.now)
            rep.paused = paused
            self._schedule(r)

    def _async_learn(self) -> None:
        """The learner takes the first B finished trajectories that are fresh enough; stale ones
        are dropped."""
        p = self.policy
        if self.learning:
            return
        fresh = [e for e in self.ready if self.version - e.version <= p.max_staleness]
        self.dropped += len(self.ready) - len(fresh)
        self.ready = collections.deque(fresh)
        if len(self.ready) < p.batch:
            return
        batch = [self.ready.popleft() for _ in range(p.batch)]
        self.accepted += len(batch)
        self.staleness += [self.version - e.version for e in batch]
        self.learning = True
        self._push(self.now + self.cluster.learner_s(e.tokens for e in batch), "learned")

    # --- the loop -------------------------------------------------------------------------------
    def run(self, steps: int, warmup: int = 0, max_events: int = 50_000_000) -> Result:
        """Collect `warmup + steps` steps; the rate is measured over the last `steps` (from time 0
        when `warmup` is 0)."""
        if steps < 1 or warmup < 0:
            raise ConfigError(f"`steps` must be >= 1 and `warmup` >= 0, got {steps}, {warmup}")
        p = self.policy
        start_delay = self.cluster.startup_s_per_slot * p.in_flight
        self._push(start_delay, "begin")
        want = steps + warmup
        n = 0
        while self.events and len(self.step_ends) < want:
            n += 1
            if n > max_events:
                raise ConfigError(f"the simulation did not finish within {max_events} events")
            t, _, kind, a, b = heapq.heappop(self.events)
            self.now = t
            if kind == "replica":
                self._replica_event(a, b)
            elif kind == "tool":
                self._tool_done(self.eps[a])
            elif kind == "request":
                self._submit(self.eps[a])
            elif kind == "begin":
                self._fill()
            elif kind == "resume":
                self._pause_all(False)
                self._step_end()
            elif kind == "learned":
                self._push(self.now + self.cluster.push_s, "pushed")
                self.pushing = True
                self._pause_all(True)
            elif kind == "pushed":
                self.pushing = False
                self._pause_all(False)
                self.version += 1
                self.step_ends.append(self.now)
                self.learning = False
                self._fill()
                self._async_learn()
        if len(self.step_ends) < want:
            why = "the fixed episode list ran out" if self.exhausted else "nothing was left to run"
            raise ConfigError(
                f"`{p.name}` stopped after {len(self.step_ends)} of {want} steps: {why}; "
                f"pass more episodes or ask for fewer steps"
            )
        t0 = self.step_ends[warmup - 1] if warmup else 0.0
        span = self.step_ends[-1] - t0
        times = [b - a for a, b in zip([0.0, *self.step_ends], self.step_ends)][warmup:]
        busy = sum(r.busy_s for r in self.replicas) / (len(self.replicas) * self.now) if self.now else 0.0
        stale = float(np.mean(self.staleness)) if self.staleness else 0.0
        return Result(p.name, steps * p.batch / span, span / steps, stale, self.dropped, self.accepted, busy, times)


def simulate(
    policy: Policy,
    cluster: Cluster,
    workload: Workload | None,
    *,
    steps: int,
    warmup: int = 0,
    seed: int = 0,
    episodes: Sequence[Episode] | None = None,
) -> Result:
    """Run one policy; see `Simulation`."""
    return Simulation(policy, cluster, workload, seed=seed, episodes=episodes).run(steps, warmup)


# --- validation against the CPU benchmark -------------------------------------------------------
CPU_SOURCE = (
    'bench/RESULTS.md, section "Rollout throughput (bench/rollout_throughput.py)", '
    'subsection "Rerun on an idle machine (2026-11-27, 16:32-16:40 UTC)"'
)
# "Engine scaling on the idle machine": concurrent requests -> ms per decode step. The 1-request
# row (31 ms) includes the warm-up (the section says so) and is left out; below 8 sequences the
# curve continues the 8-24 slope.
CPU_SCALING = ((8, 0.011), (24, 0.019), (48, 0.038))
# traj/s by (tail, sigma) and mode, 6 steps x B = 24, 2 repeats, the same subsection
CPU_MEASURED = {
    ("length", 0.5): {"grouped": 15.07, "single": 16.99, "single-os": 23.21},
    ("length", 1.0): {"grouped": 9.33, "single": 19.07, "single-os": 19.50},
    ("tool", 0.5): {"grouped": 6.90, "single": 11.18, "single-os": 13.65},
    ("tool", 1.0): {"grouped": 2.85, "single": 10.37, "single-os": 16.31},
}
CPU_MODES = {
    "grouped": Policy("grouped", 24, 24, group=8),
    "single": Policy("single", 24, 24),
    "single-os": Policy("single", 24, 48),
}
# `bench/rollout_throughput.py` builds one environment per in-flight slot when a run starts, on
# the event loop, before any episode runs: 17 ms each (`OneTurnEnv()`, 10,000 problems, timed on
# an idle machine of the same type, 2026-12-01).
CPU_ENV_BUILD_S = 0.017
# the benchmark's prompt, "Write a short story about the number {i}." in the tiny model's chat
# template (SmolLM2's), is 40-43 tokens
CPU_PROMPT_TOKENS = 42
# The serial per-request handling time (client and API server run one event loop each and share
# the 2 cores with the engine): not measured, fitted to the 12 measured rates (`--fit-frontend`:
# RMS log error 0.15 at 45 ms, 0.33 without).
CPU_FRONTEND_S = 0.045


def cpu_workload(tail: str, sigma: float) -> Workload:
    """The benchmark's episodes: one generation of `clip(round(32 exp(sigma Z)), 1, 512)` tokens
    (`--tail length`), or 16 tokens then one env step waiting `clip(1.0 exp(sigma Z), 0, 16)` s
    (`--tail tool --median 16 --tool-median-s 1.0`)."""
    if tail == "length":
        return Workload(gen_median=32, gen_sigma=sigma, gen_max=512, prompt_tokens=CPU_PROMPT_TOKENS)
    return Workload(
        gen_median=16,
        gen_sigma=0.0,
        gen_max=16,
        calls_mean=1,
        calls_max=1,
        tool_median_s=1.0,
        tool_sigma=sigma,
        tool_max_s=16.0,
        trailing_tool=True,
        prompt_tokens=CPU_PROMPT_TOKENS,
    )


def cpu_cluster(frontend_s: float = 0.0, startup: bool = True, latency_s: float = 0.0, prefill: float = 0.0) -> Cluster:
    return Cluster(
        replicas=1,
        engine=Engine(CPU_SCALING, prefill_s_per_token=prefill),
        frontend_s=frontend_s,
        request_latency_s=latency_s,
        startup_s_per_slot=CPU_ENV_BUILD_S if startup else 0.0,
    )


def cpu_rate(mode: str, tail: str, sigma: float, cluster: Cluster, seeds: Sequence[int]) -> list[float]:
    """The benchmark's statistic, traj/s over 2 repeats of 6 steps, for each seed."""
    out = []
    for seed in seeds:
        runs = [
            simulate(CPU_MODES[mode], cluster, cpu_workload(tail, sigma), steps=6, seed=1000 * seed + rep)
            for rep in range(2)
        ]
        out.append(2 * 6 * 24 / sum(r.step_s * 6 for r in runs))
    return out


# --- GPU-scale inputs ---------------------------------------------------------------------------
def load_figures(path: Path = FIGURES) -> dict[str, Any]:
    """`bench/gpu_figures.json`, checked: every figure has a value and a kind, and a source unless
    it is an assumption."""
    try:
        figs = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read the GPU figures `{path}`: {e}; restore `bench/gpu_figures.json`") from e
    for section, entries in figs.items():
        if section.startswith("_"):
            continue
        for key, f in entries.items():
            if key == "name":
                continue
            kinds = ("published", "derived", "assumption")
            if not isinstance(f, dict) or "value" not in f or f.get("kind") not in kinds:
                raise ConfigError(
                    f"`{section}.{key}` in `{path}` must be an object with `value` and a `kind` of "
                    f"published / derived / assumption, got {f!r}"
                )
            if f["kind"] != "assumption" and not f.get("source"):
                raise ConfigError(f"`{section}.{key}` in `{path}` is {f['kind']} but names no `source`")
    return figs


def figure_values(figs: dict[str, Any], scale: dict[str, float] | None = None) -> dict[str, Any]:
    """`{"section.key": value}`, each value multiplied by `scale[key]` when given."""
    out: dict[str, Any] = {}
    for section, entries in figs.items():
        if section.startswith("_"):
            continue
        for key, f in entries.items():
            if key != "name":
                out[f"{section}.{key}"] = f["value"]
    for key, factor in (scale or {}).items():
        if key not in out:
            raise ConfigError(f"unknown figure `{key}`; expected one of {', '.join(sorted(out))}")
        out[key] = out[key] * factor
    return out


def assumptions(figs: dict[str, Any]) -> list[str]:
    """The numeric figures marked as assumptions (the sensitivity table's rows)."""
    return [
        f"{s}.{k}"
        for s, entries in figs.items()
        if not s.startswith("_")
        for k, f in entries.items()
        if k != "name" and f["kind"] == "assumption" and isinstance(f["value"], (int, float))
    ]


def gpu_engine(v: dict[str, Any]) -> Engine:
    """One replica of the model on one GPU: a step reads the weights once and the KV cache of
    every decoding sequence (at the measured bandwidth efficiency) and spends 2 x params FLOPs
    per sequence; the KV cache takes what vLLM's memory share leaves after weights and reserve."""
    weights = v["model.params"] * v["model.bytes_per_value"]
    bw = v["gpu.hbm_bytes_per_s"] * v["serving.decode_bandwidth_efficiency"]
    per_seq = 2 * v["model.params"] / (v["gpu.bf16_flops"] * v["serving.decode_compute_efficiency"])
    kv_bytes = 2 * v["model.layers"] * v["model.kv_heads"] * v["model.head_dim"] * v["model.bytes_per_value"]
    free = v["gpu.memory_bytes"] * v["serving.gpu_memory_utilization"] - weights - v["serving.activation_reserve_bytes"]
    if free <= 0:
        raise ConfigError(
            f"no memory left for the KV cache: {free / 1e9:.1f} GB; lower the weights' size or "
            f"raise `serving.gpu_memory_utilization`"
        )
    return Engine(
        points=((0, weights / bw), (1, weights / bw + per_seq)),
        kv_s_per_token=kv_bytes / bw,
        max_seqs=int(v["serving.max_num_seqs"]),
        kv_tokens=free / kv_bytes,
        prefill_s_per_token=2 * v["model.params"] / (v["gpu.bf16_flops"] * v["serving.prefill_efficiency"]),
    )


def roofline_check(v: dict[str, Any]) -> tuple[float, float]:
    """The same roofline for the published A100 sweep (Llama-3.1-8B, 1,024 in / 128 out): its
    throughput gain from 1 to 8 requests, predicted and published."""
    weights = v["serving.check_model_params"] * v["model.bytes_per_value"]
    bw = v["serving.check_gpu_bytes_per_s"] * v["serving.decode_bandwidth_efficiency"]
    flops = v["serving.check_gpu_bf16_flops"] * v["serving.decode_compute_efficiency"]
    per_seq = 2 * v["serving.check_model_params"] / flops
    kv = v["serving.check_model_kv_bytes_per_token"] / bw * (1024 + 64)

    def step(c: int) -> float:
        return weights / bw + c * (per_seq + kv)

    return 8 * step(1) / step(8), v["serving.batching_gain_1_to_8"]


def gpu_workload(v: dict[str, Any]) -> Workload:
    return Workload(
        gen_median=v["workload.response_median_tokens"],
        gen_sigma=v["workload.response_sigma"],
        gen_max=v["workload.max_response_tokens"],
        prompt_tokens=int(v["workload.prompt_tokens"]),
        calls_mean=min(v["workload.calls_mean"], v["workload.max_tool_calls"]),
        calls_max=int(v["workload.max_tool_calls"]),
        tool_median_s=v["workload.tool_median_s"],
        tool_sigma=v["workload.tool_sigma"],
        tool_max_s=v["workload.tool_max_s"],
        tool_output_tokens=int(v["workload.tool_output_tokens"]),
    )


def gpu_cluster(v: dict[str, Any], gpus: int, train_gpus: int | None = None) -> Cluster:
    """Synchronous policies (`train_gpus` None): every GPU serves, then every GPU trains, and the
    switch costs `weight_push.colocated_s`. Asynchronous: `train_gpus` train, the rest serve, and
    a push broadcasts the bf16 weights over the network."""
    n_train = gpus if train_gpus is None else train_gpus
    if not 1 <= n_train <= gpus or (train_gpus is not None and n_train == gpus):
        raise ConfigError(f"`train_gpus` must leave at least one of the {gpus} GPUs to serve, got {train_gpus}")
    flops = n_train * v["gpu.bf16_flops"] * v["learner.mfu"]
    passes = v["learner.passes"]
    d_attn = v["model.q_heads"] * v["model.head_dim"]
    if train_gpus is None:
        push = v["weight_push.colocated_s"]
    else:
        weights = v["model.params"] * v["model.bytes_per_value"]
        push = weights / (v["gpu.network_bytes_per_s"] * v["weight_push.network_efficiency"]) + v["weight_push.fixed_s"]
    return Cluster(
        replicas=gpus - (0 if train_gpus is None else n_train),
        engine=gpu_engine(v),
        request_latency_s=v["serving.request_latency_s"],
        learner_fixed_s=v["learner.fixed_s"],
        learner_s_per_token=passes * 2 * v["model.params"] / flops,
        learner_s_per_token2=passes * 2 * v["model.layers"] * d_attn / flops,
        push_s=push,
    )


def gpu_policies(v: dict[str, Any]) -> dict[str, Policy]:
    b, g, s = int(v["workload.batch"]), int(v["workload.group"]), int(v["cluster.async_max_staleness"])
    return {
        "grouped": Policy("grouped", b, b, group=g),
        "single": Policy("single", b, b),
        "single-os": Policy("single", b, 2 * b),
        "async": Policy("async", b, (s + 1) * b, max_staleness=s),
    }


# --- tables -------------------------------------------------------------------------------------
def validation(seeds: Sequence[int], frontend_s: float | None = None) -> list[dict[str, Any]]:
    """Predicted vs measured CPU rates and ratios, with the mechanisms switched on one by one:
    `curve` (the batching curve alone), `+build` (environments built at the start of a run),
    `full` (+ the serial per-request handler)."""
    x = CPU_FRONTEND_S if frontend_s is None else frontend_s
    models = {"curve": cpu_cluster(startup=False), "+build": cpu_cluster(), "full": cpu_cluster(frontend_s=x)}
    rows = []
    for (tail, sigma), meas in CPU_MEASURED.items():
        rates = {
            name: {m: np.array(cpu_rate(m, tail, sigma, cl, seeds)) for m in CPU_MODES} for name, cl in models.items()
        }
        for mode in ("single", "single-os"):
            full = rates["full"][mode] / rates["full"]["grouped"]
            measured = meas[mode] / meas["grouped"]
            pred = float(np.mean(full))
            rows.append(
                {
                    "tail": tail,
                    "sigma": sigma,
                    "ratio": f"{mode} / grouped",
                    "measured": measured,
                    "predicted": pred,
                    "p10": float(np.percentile(full, 10)),
                    "p90": float(np.percentile(full, 90)),
                    "error": pred / measured - 1,
                    "curve": float(np.mean(rates["curve"][mode] / rates["curve"]["grouped"])),
                    "+build": float(np.mean(rates["+build"][mode] / rates["+build"]["grouped"])),
                    "rates": {m: (float(np.mean(rates["full"][m])), meas[m]) for m in (mode, "grouped")},
                }
            )
    return rows


def fit_frontend(seeds: Sequence[int], grid: Sequence[float]) -> list[tuple[float, float]]:
    """RMS log error of the 12 measured CPU rates for each per-request handler time in `grid`."""
    out = []
    for x in grid:
        errs = [
            math.log(np.mean(cpu_rate(m, tail, sigma, cpu_cluster(frontend_s=x), seeds)) / meas[m])
            for (tail, sigma), meas in CPU_MEASURED.items()
            for m in CPU_MODES
        ]
        out.append((x, math.sqrt(float(np.mean(np.square(errs))))))
    return out


def async_best(v: dict[str, Any], gpus: int, steps: int, warmup: int, seed: int) -> tuple[Result, int]:
    """The asynchronous policy with the best of the tried learner shares of the GPUs."""
    best: tuple[Result, int] | None = None
    tried = sorted({min(max(1, round(gpus * f)), gpus - 1) for f in v["cluster.async_train_fractions"]})
    for n_train in tried:
        r = simulate(
            gpu_policies(v)["async"],
            gpu_cluster(v, gpus, n_train),
            gpu_workload(v),
            steps=steps,
            warmup=warmup,
            seed=seed,
        )
        if best is None or r.traj_per_s > best[0].traj_per_s:
            best = (r, n_train)
    assert best is not None
    return best


def gpu_table(
    v: dict[str, Any],
    sizes: Sequence[int],
    steps: int,
    warmup: int,
    seed: int,
    train_gpus: dict[int, int] | None = None,
) -> list[dict[str, Any]]:
    """The four policies at each cluster size. `train_gpus` fixes the asynchronous learner's GPUs
    per size (else the best of the tried shares)."""
    rows = []
    for gpus in sizes:
        res: dict[str, Result] = {}
        for name, pol in gpu_policies(v).items():
            if name == "async":
                if train_gpus and gpus in train_gpus:
                    n_train = train_gpus[gpus]
                    res[name] = simulate(
                        pol, gpu_cluster(v, gpus, n_train), gpu_workload(v), steps=steps, warmup=warmup, seed=seed
                    )
                else:
                    res[name], n_train = async_best(v, gpus, steps, warmup, seed)
            else:
                res[name] = simulate(pol, gpu_cluster(v, gpus), gpu_workload(v), steps=steps, warmup=warmup, seed=seed)
        base = res["grouped"].traj_per_s
        for name, r in res.items():
            rows.append(
                {
                    **r.row(),
                    "gpus": gpus,
                    "policy": name,
                    "ratio": r.traj_per_s / base,
                    "train_gpus": n_train if name == "async" else gpus,
                }
            )
    return rows


# published figures that are used outside the setting they were measured in (an A100 figure
# applied to the H100): varied like the assumptions
SENSITIVE_PUBLISHED = ("serving.decode_bandwidth_efficiency",)
SHARES = ("efficiency", "mfu", "utilization")  # figures that cannot exceed 1


def varied(figs: dict[str, Any], key: str, factor: float) -> dict[str, Any]:
    """The figures with `key` scaled by `factor` (shares capped at 1, counts rounded down)."""
    base = figure_values(figs)[key]
    if key.endswith(SHARES):
        factor = min(factor, 1.0 / base)
    v = figure_values(figs, {key: factor})
    if isinstance(base, int):
        v[key] = int(v[key])
    return v


def sensitivity(
    figs: dict[str, Any], gpus: int, steps: int, warmup: int, seed: int, keys: Sequence[str] | None = None
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Ratios to `grouped` at `gpus` with the base inputs, then with each input that cannot be
    measured here halved and doubled (the asynchronous learner keeps the GPU count that was best
    with the base inputs)."""
    base_v = figure_values(figs)
    _, n_train = async_best(base_v, gpus, steps, warmup, seed)
    base = {r["policy"]: r["ratio"] for r in gpu_table(base_v, [gpus], steps, warmup, seed, {gpus: n_train})}
    rows = []
    for key in keys if keys is not None else [*SENSITIVE_PUBLISHED, *assumptions(figs)]:
        row: dict[str, Any] = {
            "input": key,
            "base": base_v[key],
            "kind": "published" if key in SENSITIVE_PUBLISHED else "assumption",
        }
        for label, factor in (("half", 0.5), ("double", 2.0)):
            v = varied(figs, key, factor)
            row[f"{label}_value"] = v[key]
            if key == "workload.group" and (v[key] < 1 or v["workload.batch"] % int(v[key])):
                row[label] = None
                continue
            t = gpu_table(v, [gpus], steps, warmup, seed, {gpus: n_train})
            row[label] = {r["policy"]: r["ratio"] for r in t}
        rows.append(row)
    return base, rows


def paper_check(seeds: Sequence[int], target: float = 4.35) -> dict[str, Any]:
    """The paper's Sec. 5.4 simulation: a sample's time does not depend on how many others run;
    group-based batching waits for all 24 samples of a batch (3 groups of 8), group-free batching
    starts 48 and keeps the first 24. The paper gives the two times (486 s and 112 s), not the
    distribution: with lognormal times, find the sigma whose mean ratio is `target`."""
    flat = Cluster(replicas=1, engine=Engine(((1, 1.0),)))

    def ratio(sigma: float) -> np.ndarray:
        w = Workload(gen_median=100.0, gen_sigma=sigma, gen_max=1e9, gen_min=0.0)
        out = []
        for s in seeds:
            g = simulate(Policy("grouped", 24, 24, group=8), flat, w, steps=1, seed=s).step_s
            f = simulate(Policy("single", 24, 48), flat, w, steps=1, seed=s).step_s
            out.append((g, f))
        return np.array(out)

    lo, hi = 0.1, 3.0
    for _ in range(14):
        mid = (lo + hi) / 2
        gf = ratio(mid)
        lo, hi = (mid, hi) if gf[:, 0].mean() / gf[:, 1].mean() < target else (lo, mid)
    gf = ratio((lo + hi) / 2)
    one = gf[:, 0] / gf[:, 1]
    return {
        "sigma": (lo + hi) / 2,
        "ratio": float(gf[:, 0].mean() / gf[:, 1].mean()),
        "one_draw_p10": float(np.percentile(one, 10)),
        "one_draw_p90": float(np.percentile(one, 90)),
        "median_s_for_112": 112.0 / float(gf[:, 1].mean()) * 100.0,
    }


def paper_setting_on_engines(v: dict[str, Any], seeds: Sequence[int]) -> dict[str, float]:
    """The paper's batch (24; start 48, keep 24) with engine coupling: on one GPU replica with
    the GPU workload, and on the measured CPU server with its two tails at sigma 1."""
    out = {}
    gpu = gpu_cluster(v, 1)
    gpu = dataclasses.replace(gpu, learner_fixed_s=0.0, learner_s_per_token=0.0, learner_s_per_token2=0.0, push_s=0.0)
    w = gpu_workload(v)
    g = np.mean([simulate(Policy("grouped", 24, 24, group=8), gpu, w, steps=3, seed=s).step_s for s in seeds])
    f = np.mean([simulate(Policy("single", 24, 48), gpu, w, steps=3, seed=s).step_s for s in seeds])
    out["gpu"] = float(g / f)
    for tail in ("length", "tool"):
        cl = cpu_cluster(frontend_s=CPU_FRONTEND_S, startup=False)
        g = np.mean(
            [
                simulate(Policy("grouped", 24, 24, group=8), cl, cpu_workload(tail, 1.0), steps=3, seed=s).step_s
                for s in seeds
            ]
        )
        f = np.mean(
            [simulate(Policy("single", 24, 48), cl, cpu_workload(tail, 1.0), steps=3, seed=s).step_s for s in seeds]
        )
        out[f"cpu-{tail}"] = float(g / f)
    return out


# --- report -------------------------------------------------------------------------------------
def _md(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def validation_report(rows: list[dict[str, Any]], tolerance: float = 0.2) -> str:
    out = [
        _md(
            [
                "tail",
                "sigma",
                "ratio",
                "measured",
                "predicted (p10-p90)",
                "error",
                "within 20%",
                "curve only",
                "+ env build",
            ],
            [
                (
                    r["tail"],
                    r["sigma"],
                    r["ratio"],
                    f"{r['measured']:.2f}x",
                    f"{r['predicted']:.2f}x ({r['p10']:.2f}-{r['p90']:.2f})",
                    f"{100 * r['error']:+.0f}%",
                    "yes" if abs(r["error"]) <= tolerance else "**no**",
                    f"{r['curve']:.2f}x",
                    f"{r['+build']:.2f}x",
                )
                for r in rows
            ],
        ),
        "",
    ]
    seen = set()
    rate_rows = []
    for r in rows:
        for m, (pred, meas) in r["rates"].items():
            if (r["tail"], r["sigma"], m) not in seen:
                seen.add((r["tail"], r["sigma"], m))
                rate_rows.append(
                    (r["tail"], r["sigma"], m, f"{meas:.2f}", f"{pred:.2f}", f"{100 * (pred / meas - 1):+.0f}%")
                )
    out.append(_md(["tail", "sigma", "mode", "measured traj/s", "predicted traj/s", "error"], rate_rows))
    return "\n".join(out)


def gpu_report(rows: list[dict[str, Any]]) -> str:
    head = ["GPUs", "policy", "traj/s", "x grouped", "step s", "staleness", "dropped", "decode busy", "learner GPUs"]
    return _md(
        head,
        [
            (
                r["gpus"],
                r["policy"],
                f"{r['traj_per_s']:.2f}",
                f"{r['ratio']:.2f}x",
                f"{r['step_s']:.0f}",
                f"{r['staleness']:.2f}",
                r["dropped"],
                f"{100 * r['decode_busy']:.0f}%",
                r["train_gpus"],
            )
            for r in rows
        ],
    )


def sensitivity_report(rows: list[dict[str, Any]], base: dict[str, float]) -> str:
    pols = ("single", "single-os", "async")

    def cell(d: dict[str, float] | None) -> str:
        return "n/a" if d is None else " / ".join(f"{d[p]:.2f}" for p in pols)

    head = ["input", "base", "halved to", "single / single-os / async (x grouped)", "doubled to", "the same"]
    body = [("(base inputs)", "", "", cell(base), "", cell(base))]
    body += [
        (
            f"`{r['input']}`" + (" (published, A100)" if r["kind"] == "published" else ""),
            f"{r['base']:g}",
            f"{r['half_value']:g}",
            cell(r["half"]),
            f"{r['double_value']:g}",
            cell(r["double"]),
        )
        for r in rows
    ]
    return _md(head, body)


def commit() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, check=False
            ).stdout.strip()
            or "unknown"
        )
    except OSError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="seconds: fewer seeds and steps, 64 GPUs only, no sensitivity")
    p.add_argument("--figures", type=Path, default=FIGURES, help="the GPU figures (JSON)")
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 64, 512, 4096], help="cluster sizes in GPUs")
    p.add_argument(
        "--sensitivity-gpus", type=int, nargs="+", default=[64, 4096], help="cluster sizes of the sensitivity table"
    )
    p.add_argument("--steps", type=int, default=6, help="measured steps per GPU run (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fit-frontend", action="store_true", help="also print the fit of the CPU per-request handler time")
    p.add_argument("--json", type=Path, default=None, help="also write every number here")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.steps, args.warmup = [64], 2, 1
    started = time.perf_counter()
    figs = load_figures(args.figures)
    v = figure_values(figs)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    out: dict[str, Any] = {
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine,
    }
    print(
        f"# bench/cluster_sim.py {' '.join(argv if argv is not None else sys.argv[1:])}\n"
        f"commit {out['commit']}, {out['date']}, {out['machine']}\n"
    )

    seeds = range(8 if args.quick else 40)
    out["validation"] = validation(seeds)
    print(
        f"## 1. Validation against the CPU benchmark ({CPU_SOURCE})\n\n"
        f"Mean over {len(seeds)} seeds of the benchmark's statistic (2 repeats x 6 steps x B = 24); p10-p90 is its "
        f"spread across seeds. Per-request handler {1000 * CPU_FRONTEND_S:.0f} ms.\n"
    )
    print(validation_report(out["validation"]), "\n")
    if args.fit_frontend:
        out["frontend_fit"] = fit_frontend(range(20), [i * 0.005 for i in range(15)])
        fit = [(f"{x:.3f}", f"{e:.3f}") for x, e in out["frontend_fit"]]
        print(_md(["handler s", "RMS log error of the 12 rates"], fit), "\n")

    gain, published = roofline_check(v)
    eng = gpu_engine(v)
    out["engine"] = {
        "weights_step_s": eng.points[0][1],
        "per_seq_s": eng.points[1][1] - eng.points[0][1],
        "kv_s_per_token": eng.kv_s_per_token,
        "kv_tokens": eng.kv_tokens,
        "prefill_s_per_token": eng.prefill_s_per_token,
        "check_gain": gain,
        "check_published": published,
    }
    print(
        f"## 2. GPU scale ({figs['model']['name']} on {figs['gpu']['name']}, B = {int(v['workload.batch'])}, "
        f"G = {int(v['workload.group'])}, responses up to {int(v['workload.max_response_tokens'])} tokens, "
        f"up to {int(v['workload.max_tool_calls'])} tool calls)\n\n"
        f"Decode step = {1000 * eng.points[0][1]:.2f} ms + {1e6 * out['engine']['per_seq_s']:.1f} us per sequence "
        f"+ {1e9 * eng.kv_s_per_token:.1f} ns per token of context; KV cache {eng.kv_tokens / 1e3:.0f}k tokens "
        f"per GPU. Roofline check on the published A100 sweep: 1 -> 8 requests gains {gain:.1f}x "
        f"(published {published:.1f}x).\n"
        f"{args.warmup} warm-up steps, then {args.steps} measured; seed {args.seed}.\n"
    )
    out["gpu"] = gpu_table(v, args.sizes, args.steps, args.warmup, args.seed)
    print(gpu_report(out["gpu"]), "\n")

    if not args.quick:
        out["sensitivity"] = {}
        for gpus in args.sensitivity_gpus:
            base, rows = sensitivity(figs, gpus, args.steps, args.warmup, args.seed)
            out["sensitivity"][gpus] = {"base": base, "rows": rows}
            print(
                f"## 3. Sensitivity at {gpus} GPUs: ratios to grouped with one input halved or doubled "
                f"(shares capped at 1; the asynchronous learner keeps its GPUs)\n"
            )
            print(sensitivity_report(rows, base), "\n")

    pc = paper_check(range(100 if args.quick else 400))
    eng_ratios = paper_setting_on_engines(v, range(3 if args.quick else 20))
    out["paper"] = {**pc, "engines": eng_ratios}
    print(
        "## 4. The paper's Sec. 5.4 setting (24-sample batch; group-free starts 48, keeps the first 24)\n\n"
        f"With times independent of concurrency (the paper's simulation) and lognormal times, a mean ratio of 4.35x "
        f"needs sigma = {pc['sigma']:.2f} (one draw of that setting gives "
        f"{pc['one_draw_p10']:.1f}x-{pc['one_draw_p90']:.1f}x, "
        f"p10-p90; median sample time {pc['median_s_for_112']:.0f} s puts group-free at 112 s). The same batch with "
        f"engine coupling: one GPU replica with the GPU workload {eng_ratios['gpu']:.2f}x; the measured CPU server "
        f"{eng_ratios['cpu-length']:.2f}x (length tail, sigma 1) and {eng_ratios['cpu-tool']:.2f}x "
        f"(tool tail, sigma 1).\n"
    )
    out["seconds"] = time.perf_counter() - started
    print(f"({out['seconds']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    main()
