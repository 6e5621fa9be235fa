"""One episode, token-in, token-out: `run_episode` plays an environment with a policy.

The env's reset messages go through the chat template (with the generation prompt) to give
`prompt_ids`; then, until the episode ends, the policy generates until one of `env.stop_sequences`
or end-of-turn, `env.step(text)` runs in a worker thread, and the env's reply is appended with
loss mask 0 (tokenised as raw text for `reply_role = None`, as the chat template's delta for a
chat role). Infrastructure failures become `Trajectory.error`; an env's own exception propagates.
The whole contract: docs/environments.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import hashlib
import time
from collections.abc import Callable, Mapping
from typing import Any

from spo_agents.envs.protocol import TextEnv
from spo_agents.errors import InfraError, PolicyError, ServerLost
from spo_agents.rollout.policy.base import PolicyBackend, SamplingParams
from spo_agents.rollout.prompt_limit import PromptLimit
from spo_agents.types import ToolCall, Trajectory

#: How many times an episode is played again after its server left rotation mid-episode.
MAX_RESTARTS = 3


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)


def _tool_call(info: dict[str, Any]) -> list[ToolCall]:
    """The tool call an env reported in one step's `info["tool_call"]` (a `ToolCall` or its dict),
    as a list of zero or one. `info["tool_calls"]` is the env's count so far, not read here."""
    call = info.get("tool_call")
    if isinstance(call, dict):
        known = {f.name for f in dataclasses.fields(ToolCall)}
        call = ToolCall(**{k: v for k, v in call.items() if k in known})
    return [call] if isinstance(call, ToolCall) else []


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
    env: TextEnv,
    policy: PolicyBackend,
    problem_id: str,
    *,
    sampling: SamplingParams,
    max_episode_tokens: int = 1024,
    seed: int | None = None,
    executor: concurrent.futures.Executor | None = None,
    prompt_limit: PromptLimit | None = None,
    restarts: int = 0,
) -> Trajectory:
    """Play one episode of `env` on `problem_id` with `policy` (see the module docstring).

    `env.reset` / `env.step` run in `executor` (default: asyncio's default thread pool, which
    has only a few threads: collectors pass a pool with one thread per in-flight episode so
    blocking tool calls of different episodes overlap). A prompt over `prompt_limit` is refused
    (`Trajectory.error`) or truncated (`info["prompt_cut_tokens"]`), before any generation.
    An episode whose server left rotation mid-episode (`ServerLost`, several servers) is played again
    from `env.reset`, at most `MAX_RESTARTS` times; `restarts` counts them (`info["server_restarts"]`)."""
    loop = asyncio.get_running_loop()

    def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return loop.run_in_executor(executor, functools.partial(fn, *args, **kwargs))

    tok = policy.tokenizer
    session = policy.session()  # every turn on one server, for a backend over several
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
    prompt_cut = 0
    try:
        t = time.perf_counter()
        messages, info = await in_thread(env.reset, seed=seed, options={"problem_id": problem_id})
        timings["env"] += time.perf_counter() - t
        chat = [dict(m) for m in messages]
        prompt_ids = full_prompt_ids = tok.encode(_render(tok, chat, True), add_special_tokens=False)
        if prompt_limit is not None and len(prompt_ids) > prompt_limit.max_tokens:
            if prompt_limit.overflow == "refuse":
                raise _Refused(prompt_limit.refusal(len(prompt_ids)))
            prompt_ids, prompt_cut = prompt_limit.truncate(prompt_ids)
        stop = list(dict.fromkeys([*env.stop_sequences, *sampling.stop]))
        reply_role = env.reply_role
        assistant_text = ""  # the current assistant message, for chat-role replies
        while True:
            budget = max_episode_tokens - len(token_ids)
            if budget <= 0:
                truncated = True
                break
            params = dataclasses.replace(
                sampling,
                stop=stop,
                max_new_tokens=min(sampling.max_new_tokens, budget),
                seed=turn_seed(sampling.seed, seed, len(turn_starts)),
            )
            t = time.perf_counter()
            gen = await session.generate(prompt_ids + token_ids, params)
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
            tool_calls += _tool_call(info)
            timings["sandbox"] += float((info.get("timings") or {}).get("sandbox_s", 0.0))
            if terminated or truncated:
                break
            if reply_role is None:
                reply = tok.encode(obs, add_special_tokens=False)
                assistant_text += obs
            else:
                so_far = tok.decode(full_prompt_ids + token_ids, skip_special_tokens=False)
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
    except ServerLost as e:
        if restarts < MAX_RESTARTS:
            return await run_episode(
                env,
                policy,
                problem_id,
                sampling=sampling,
                max_episode_tokens=max_episode_tokens,
                seed=seed,
                executor=executor,
                prompt_limit=prompt_limit,
                restarts=restarts + 1,
            )
        error = f"{type(e).__name__}: {e} (after {restarts} restarts)"
    except InfraError as e:
        error = f"{type(e).__name__}: {e}"
    except _Refused as e:
        error, prompt_ids = str(e), []
    timings["total"] = time.perf_counter() - t_start
    if not timings["sandbox"]:
        timings["sandbox"] = sum(tc.duration_s for tc in tool_calls)
    if error is None and isinstance((info or {}).get("error"), str):
        error = info["error"]  # the env caught an infrastructure failure (e.g. the sandbox)
    out_info = {k: _jsonable(v) for k, v in (info or {}).items() if k != "tool_call"}
    if not token_io:
        out_info["token_io"] = False
    if prompt_cut:
        out_info["prompt_cut_tokens"] = prompt_cut
    if restarts:
        out_info["server_restarts"] = restarts
    return Trajectory(
        problem_id=problem_id,
        env_id=env.env_id,
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


class _Refused(Exception):
    """A prompt over the limit with `overflow = "refuse"`: the episode ends before generating."""


def turn_seed(given: int | None, episode_seed: int | None, turn: int) -> int | None:
    """The sampling seed of one generation call: the sampling settings' own, else one derived from
    the episode's seed and the turn, so an episode draws the same tokens however requests are
    batched, and a resumed run the same as an uninterrupted one; `None` (the backend's own stream)
    for an unseeded episode."""
    if given is not None or episode_seed is None:
        return given
    return derive_seed(episode_seed, turn, bits=63)


def derive_seed(*parts: object, bits: int = 32) -> int:
    """A seed that depends only on `parts` (the same on every run, machine and resume): the low
    `bits` bits (at most 64) of the SHA-256 of the parts joined by `:`. Episodes (the collector),
    evaluation samples and generation turns all derive theirs here."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << bits) - 1)
