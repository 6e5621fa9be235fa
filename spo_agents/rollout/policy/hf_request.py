"""What the `hf` backend's schedulers share: a queued request and handing its result back."""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass

from spo_agents.rollout.policy.base import Generation, SamplingParams


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    future: concurrent.futures.Future
    version: int = 0  # the weight version the policy's gate handed this request


def params_key(p: SamplingParams) -> tuple:
    """Requests that can share a static `generate` call: `max_new_tokens` may differ (each row
    stops at its own budget), the sampling distribution and stop strings may not."""
    return (p.temperature, p.top_p, p.top_k, tuple(p.stop))


def resolve(fut: concurrent.futures.Future, gen: Generation) -> None:
    """Hand `gen` to a waiting caller; a caller that was cancelled meanwhile is skipped."""
    try:
        if not fut.done():
            fut.set_result(gen)
    except concurrent.futures.InvalidStateError:  # cancelled between the check and the set
        pass


def reject(fut: concurrent.futures.Future, err: Exception) -> None:
    try:
        if not fut.done():
            fut.set_exception(err)
    except concurrent.futures.InvalidStateError:
        pass
