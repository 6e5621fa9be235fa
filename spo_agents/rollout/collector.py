"""Single-stream rollout: episodes driven by the policy, delivered the moment they finish.

One episode (`run_episode`): the environment's reset messages go through
the chat template (with the generation prompt) to give `prompt_ids`; then, until the episode ends,
the policy generates until one of `env.stop_sequences` or end-of-turn, `env.step(text)` runs in
a worker thread, and the environment's reply is appended with loss mask 0. Token-in, token-out:
the trajectory holds exactly the sampled tokens and the inserted reply tokens.

- `reply_role = None`: the reply continues the assistant turn; its tokens are
  `tokenizer.encode(obs, add_special_tokens=False)`.
- `reply_role = "user"` / `"tool"`: the reply is a new chat message; its tokens are the chat
  template's delta: the text of everything so far is a prefix of the chat rendered with the reply
  (and the next generation prompt), and the suffix is tokenised. A template that is not
  prefix-preserving makes the episode an error instead of a silently wrong
  training sequence.

The episode ends when the env terminates or truncates, or when `max_episode_tokens` (all tokens
after the prompt, replies included) is spent (`truncated`). Infrastructure failures
(`InfraError`: `SandboxError`, `PolicyError`) become `Trajectory.error`: a bad rollout is data,
not a crash. Anything else (a bad config, an environment that raises) is a programmer error and
stops the run: the collector raises it from `next_batch`, an environment's own exception as a
`PluginError` naming its file and line.

`Collector` keeps `max_in_flight` episodes running and hands out the first that finish, with no
group barrier (paper Sec. 3 and 5.4). Over-sampling is submitting more problems than a batch needs:
the first `n` finished are returned and the rest stay in flight for the next call (or are
`cancel`ed). Trajectories generated more than `max_staleness` policy versions before the
current `policy.version` are dropped and counted. `group_size = G > 1` is the grouped mode of the
GRPO comparison, in the same code path: each problem runs G times under one `group_id`, and a
group is delivered only when all G have finished (the barrier).

The collector's tasks live on the event loop that calls `next_batch`; keep one loop for its
lifetime.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from spo_agents.errors import ConfigError, InfraError, PluginError, PolicyError, RolloutError, SPOError
from spo_agents.rollout.policy.base import PolicyBackend, SamplingParams
from spo_agents.types import ToolCall, Trajectory

log = logging.getLogger(__name__)


def _env_id(env: Any) -> str:
    spec = getattr(env, "spec", None)
    if spec is not None and getattr(spec, "id", None):
        return str(spec.id)
    return str(getattr(env, "env_id", None) or type(env).__name__)


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)


def _tool_calls(info: dict[str, Any]) -> list[ToolCall]:
    """Tool calls an env reported in one step's info: a `ToolCall` (or its dict) under
    `tool_call`, or a list of them under `tool_calls` (an int there is the env's count)."""
    raw: list[Any] = []
    if info.get("tool_call") is not None:
        raw.append(info["tool_call"])
    if isinstance(info.get("tool_calls"), list):
        raw.extend(info["tool_calls"])
    out = []
    for t in raw:
        if isinstance(t, ToolCall):
            out.append(t)
        elif isinstance(t, dict):
            known = {f.name for f in dataclasses.fields(ToolCall)}
            out.append(ToolCall(**{k: v for k, v in t.items() if k in known}))
    return out


def _jsonable(value: Any) -> Any:
    """Keep info values that survive JSON (transcripts are JSONL)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    return repr(value)


async def run_episode(
    env: Any,
    policy: PolicyBackend,
    problem_id: str,
    *,
    sampling: SamplingParams,
    max_episode_tokens: int = 1024,
    seed: int | None = None,
    executor: concurrent.futures.Executor | None = None,
) -> Trajectory:
    """Play one episode of `env` on `problem_id` with `policy` (see the module docstring).

    `env.reset` / `env.step` run in `executor` (default: asyncio's default thread pool, which
    has only a few threads: collectors pass a pool with one thread per in-flight episode so
    blocking tool calls of different episodes overlap)."""
    loop = asyncio.get_running_loop()

    def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return loop.run_in_executor(executor, functools.partial(fn, *args, **kwargs))

    tok = policy.tokenizer
    t_start = time.perf_counter()
    timings = {"generate": 0.0, "env": 0.0, "sandbox": 0.0, "total": 0.0}
    prompt_ids: list[int] = []
    token_ids: list[int] = []
    loss_mask: list[int] = []
    logprobs: list[float] = []
    turn_starts: list[int] = []
    versions: list[int] = []
    tool_calls: list[ToolCall] = []
    reward = 0.0
    terminated = truncated = False
    info: dict[str, Any] = {}
    error: str | None = None
    token_io = True
    try:
        t = time.perf_counter()
        messages, info = await in_thread(env.reset, seed=seed, options={"problem_id": problem_id})
        timings["env"] += time.perf_counter() - t
        chat = [dict(m) for m in messages]
        prompt_ids = tok.encode(_render(tok, chat, True), add_special_tokens=False)
        stop = list(dict.fromkeys([*getattr(env, "stop_sequences", []), *sampling.stop]))
        reply_role = getattr(env, "reply_role", None)
        assistant_text = ""  # the current assistant message, for chat-role replies
        while True:
            budget = max_episode_tokens - len(token_ids)
            if budget <= 0:
                truncated = True
                break
            params = dataclasses.replace(sampling, stop=stop, max_new_tokens=min(sampling.max_new_tokens, budget))
            t = time.perf_counter()
            gen = await policy.generate(prompt_ids + token_ids, params)
            timings["generate"] += time.perf_counter() - t
            turn_token_io = bool(gen.info.get("token_io", policy.supports_token_io))
            token_io = token_io and turn_token_io
            if turn_token_io and len(gen.logprobs) != len(gen.token_ids):
                # a token-in/out backend must report the log-prob of what it sampled (a text-only
                # server's turns keep 0.0: they are for evaluation only)
                raise PolicyError(
                    f"the policy returned {len(gen.token_ids)} tokens but {len(gen.logprobs)} log-probs; "
                    "training needs the behaviour log-prob of every sampled token"
                )
            turn_starts.append(len(token_ids))
            versions.append(gen.policy_version)
            token_ids += gen.token_ids
            loss_mask += [1] * len(gen.token_ids)
            logprobs += list(gen.logprobs) if len(gen.logprobs) == len(gen.token_ids) else [0.0] * len(gen.token_ids)
            assistant_text += gen.text
            t = time.perf_counter()
            obs, r, terminated, truncated, info = await in_thread(env.step, gen.text)
            timings["env"] += time.perf_counter() - t
            reward += float(r)
            tool_calls += _tool_calls(info)
            timings["sandbox"] += float((info.get("timings") or {}).get("sandbox_s", 0.0))
            if terminated or truncated:
                break
            if reply_role is None:
                reply = tok.encode(obs, add_special_tokens=False)
                assistant_text += obs
            else:
                so_far = tok.decode(prompt_ids + token_ids, skip_special_tokens=False)
                chat += [{"role": "assistant", "content": assistant_text}, {"role": reply_role, "content": obs}]
                assistant_text = ""
                rendered = _render(tok, chat, True)
                if not rendered.startswith(so_far):
                    error = (
                        f"the chat template is not prefix-preserving: the tokens so far are not a prefix of the chat "
                        f"rendered with the `{reply_role}` reply, so the reply cannot be appended token-in/token-out; "
                        f"use an env with `reply_role = None` or a prefix-preserving template (`spo-agent check-env`)"
                    )
                    break
                reply = tok.encode(rendered[len(so_far) :], add_special_tokens=False)
            if len(token_ids) + len(reply) > max_episode_tokens:
                truncated = True
                break
            token_ids += reply
            loss_mask += [0] * len(reply)
            logprobs += [0.0] * len(reply)
    except InfraError as e:
        error = f"{type(e).__name__}: {e}"
    timings["total"] = time.perf_counter() - t_start
    if not timings["sandbox"]:
        timings["sandbox"] = sum(tc.duration_s for tc in tool_calls)
    if error is None and isinstance((info or {}).get("error"), str):
        error = info["error"]  # the env caught an infrastructure failure (e.g. the sandbox)
    out_info = {k: _jsonable(v) for k, v in (info or {}).items() if k not in ("tool_call", "tool_calls")}
    if not token_io:
        out_info["token_io"] = False
    return Trajectory(
        problem_id=problem_id,
        env_id=_env_id(env),
        prompt_ids=prompt_ids,
        token_ids=token_ids,
        loss_mask=loss_mask,
        logprobs=logprobs,
        reward=reward,
        terminated=bool(terminated),
        truncated=bool(truncated),
        policy_version=versions[0] if versions else policy.version,
        policy_versions=versions,
        turn_starts=turn_starts,
        tool_calls=tool_calls,
        timings=timings,
        info=out_info,
        error=error,
    )


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


@dataclass
class _Job:
    problem_id: str
    group_id: str | None
    sample_index: int
    submitted_at: float


class Collector:
    """Single-stream collection (see the module docstring).

    Args:
        env_factory: returns a fresh environment; the collector keeps a pool, one env per running
            episode, and reuses them.
        policy: the policy backend.
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
    """

    def __init__(
        self,
        env_factory: Callable[[], Any],
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
    ) -> None:
        if max_in_flight < 1:
            raise ConfigError(f"`max_in_flight` must be >= 1, got {max_in_flight}")
        if group_size < 1:
            raise ConfigError(f"`group_size` must be >= 1, got {group_size}")
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
        self.stats = CollectorStats()
        self.failed: list[Trajectory] = []
        self._pending: collections.deque[_Job] = collections.deque()
        self._tasks: set[asyncio.Task] = set()
        self._envs: list[Any] = []
        self._ready: collections.deque[list[Trajectory]] = collections.deque()  # units: 1 or a whole group
        self._groups: dict[str, list[Trajectory]] = {}
        # submissions (one episode, or one group) not settled yet, per problem id: settled when
        # delivered, dropped as stale, failed (single-stream) or cancelled
        self._unsettled: collections.Counter[str] = collections.Counter()
        self._counter = 0
        self._consecutive_errors = 0
        self._fatal: BaseException | None = None  # a programmer error in an episode: raised by next_batch
        self._wake: asyncio.Event | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="env")

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

    # --- running ------------------------------------------------------------------------------
    def _episode_seed(self, job: _Job) -> int:
        self._counter += 1
        digest = hashlib.sha256(
            f"{self.seed}:{job.problem_id}:{job.group_id}:{job.sample_index}:{self._counter}".encode()
        ).digest()
        return int.from_bytes(digest[:4], "little")

    def _fill(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # started by the next `next_batch`
        while self._pending and len(self._tasks) < self.max_in_flight:
            job = self._pending.popleft()
            env = self._envs.pop() if self._envs else self.env_factory()
            task = asyncio.create_task(self._run(job, env))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            self.stats.started += 1

    async def _run(self, job: _Job, env: Any) -> None:
        queued = time.perf_counter() - job.submitted_at
        try:
            traj = await run_episode(
                env,
                self.policy,
                job.problem_id,
                sampling=self.sampling,
                max_episode_tokens=self.max_episode_tokens,
                seed=self._episode_seed(job),
                executor=self._executor,
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - anything but an infrastructure error stops the collector
            self._fatal = e if isinstance(e, SPOError) else PluginError.from_exception(env, e)
            self._fatal.__cause__ = None if self._fatal is e else e
            self._tasks.discard(asyncio.current_task())
            if self._wake is not None:
                self._wake.set()
            return
        self._tasks.discard(asyncio.current_task())  # no longer in flight (the done-callback comes later)
        self._envs.append(env)
        traj.timings["queued"] = queued
        traj.group_id = job.group_id
        traj.sample_index = job.sample_index
        self._finished(traj)
        self._fill()
        if self._wake is not None:
            self._wake.set()

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

    async def close(self) -> None:
        """Cancel what runs and close the pooled environments (safe to call twice)."""
        await self.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
        envs, self._envs = self._envs, []
        for env in envs:
            try:
                env.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                log.warning("closing an environment failed", exc_info=True)
