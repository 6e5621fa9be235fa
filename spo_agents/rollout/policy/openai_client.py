"""The `openai` backend's connection to its server: an `AsyncOpenAI` client whose requests are
retried, timed out and waited for as `spo_agents.rollout.policy.openai` describes, with counts."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

from spo_agents.errors import PolicyError, ServerUnavailable
from spo_agents.rollout.policy.openai_errors import cause_text, connection_failure, retry_after, server_message

log = logging.getLogger("spo_agents.rollout.policy.openai")


@dataclass
class RequestStats:
    """What the backend's requests met: `requests` attempted (retries and refused connections
    included), `retries` by reason (`HTTP 500`, `HTTP 429`, `dropped connection`, `timeout`), and
    the server outages waited for (`outages`, `outage_s` seconds in all)."""

    requests: int = 0
    retries: dict[str, int] = field(default_factory=dict)
    outages: int = 0
    outage_s: float = 0.0

    def summary(self) -> str:
        retried = sum(self.retries.values())
        parts = [f"{self.requests} requests", f"{retried} retries"]
        if retried:
            parts[-1] += " (" + ", ".join(f"{n} {why}" for why, n in sorted(self.retries.items())) + ")"
        if self.outages:
            parts.append(f"waited {self.outage_s:.1f} s for the server over {self.outages} outage(s)")
        return ", ".join(parts)


class ServerClient:
    """`api` (an `AsyncOpenAI`) plus `request`, which retries one API call; `stats` counts them."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        request_timeout_s: float = 600.0,
        connect_timeout_s: float = 3.0,
        probe_timeout_s: float = 10.0,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        server_wait_s: float = 300.0,
    ) -> None:
        import httpx
        from openai import AsyncOpenAI

        positive = {
            "request_timeout_s": request_timeout_s,
            "connect_timeout_s": connect_timeout_s,
            "probe_timeout_s": probe_timeout_s,
        }
        not_negative = {
            "max_retries": max_retries,
            "backoff_s": backoff_s,
            "max_backoff_s": max_backoff_s,
            "server_wait_s": server_wait_s,
        }
        bad = [f"`{k}` = {v}" for k, v in positive.items() if not v > 0]
        bad += [f"`{k}` = {v}" for k, v in not_negative.items() if not v >= 0]
        if bad:
            raise PolicyError(
                f"the `openai` backend's timeouts must be > 0 and its retry settings >= 0; got {', '.join(bad)}"
            )
        self.base_url = base_url
        self.model = model
        self.api_key_env = api_key_env
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.server_wait_s = server_wait_s
        self.probe_timeout_s = probe_timeout_s
        self.api = AsyncOpenAI(
            base_url=base_url,
            api_key=os.environ.get(api_key_env) or "EMPTY",
            max_retries=0,  # retries are ours: bounded, logged, and quick to give up on refusals
            timeout=httpx.Timeout(request_timeout_s, connect=connect_timeout_s),
        )
        self.probe_timeout = httpx.Timeout(probe_timeout_s, connect=connect_timeout_s)
        self.stats = RequestStats()
        self.seen_up = False  # the server has accepted a connection at least once
        self._down_since: float | None = None  # when the current outage (refused connections) began
        self._last_warning = -1e9

    async def request(self, make: Any, what: str, *, probe: bool = False) -> Any:
        """Run `make()` (one API call) with the retries of `spo_agents.rollout.policy.openai`; return its reply.

        `probe`: a timeout waiting for the answer is an error at once (with its reason), not a retry.
        """
        import openai

        failures, polls = 0, 0
        while True:
            self.stats.requests += 1
            asked = None  # the wait a 429 / 503 asked for
            try:
                reply = await make()
            except openai.APIStatusError as e:
                self._answered()
                reason = self._retryable_status(e, what)
                asked = retry_after(e.response, self.server_wait_s) if e.status_code in (429, 503) else None
            except openai.APIConnectionError as e:
                failure = connection_failure(e)
                if failure == "refused":
                    await self._wait_for_server(e, what, polls)
                    polls += 1
                    continue
                self.seen_up = True
                if failure == "timeout" and probe:
                    raise ServerUnavailable(
                        f"connected to `{self.base_url}`, but no response to {what} (a 1-token completion for "
                        f"`{self.model}`) within {self.probe_timeout_s:g} s: the server accepts connections but does "
                        f"not answer (stuck, overloaded or still loading?); `--probe-timeout` sets this wait"
                    ) from e
                reason = "timeout" if failure == "timeout" else "dropped connection"
            except ValueError as e:  # a JSON content type whose body does not parse
                self._answered()
                raise PolicyError(self.not_json(what, f"{type(e).__name__}: {e}")) from e
            else:
                self._answered()
                if isinstance(reply, str):
                    raise PolicyError(self.not_json(what, repr(reply[:120])))
                return reply
            failures += 1
            if failures > self.max_retries:
                raise ServerUnavailable(
                    f"`{self.base_url}` failed {what} {failures} times in a row (last: {reason}); giving up after "
                    f"{self.max_retries} retries (`--max-retries`)"
                )
            kind = reason.split(":")[0]  # `HTTP 503`, not the server's message
            self.stats.retries[kind] = self.stats.retries.get(kind, 0) + 1
            delay = asked if asked is not None else self._backoff(failures)
            self._log_retry(
                f"retrying {what} against {self.base_url} in {delay:.1f} s after {reason} "
                f"(retry {failures} of {self.max_retries})"
            )
            await asyncio.sleep(delay)

    def _retryable_status(self, e: Any, what: str) -> str:
        """The retry reason of HTTP 408, 429 and 5xx; any other status is a `PolicyError` now."""
        status = e.status_code
        if status == 401:
            raise PolicyError(
                f"`{self.base_url}` rejected the API key (HTTP 401); set it in `${self.api_key_env}`"
            ) from e
        if status in (408, 429) or status >= 500:
            return f"HTTP {status}: {server_message(e)}"
        raise PolicyError(f"`{self.base_url}` refused {what} with HTTP {status}: {server_message(e)}") from e

    def _backoff(self, n: int) -> float:
        """The wait before retry `n` (1-based): doubling from `backoff_s`, jittered, capped."""
        return min(self.backoff_s * 2 ** (n - 1) * (0.5 + random.random()), self.max_backoff_s)

    def _answered(self) -> None:
        """The server answered: note it, and end an outage if one was going on."""
        self.seen_up = True
        if self._down_since is not None:
            down = time.monotonic() - self._down_since
            self._down_since = None
            self.stats.outage_s += down
            log.warning("the server at %s answers again after %.1f s", self.base_url, down)

    async def _wait_for_server(self, e: Exception, what: str, polls: int) -> None:
        """A refused connection: fail at once if the server never answered, else wait for it (at
        most `server_wait_s` since the outage began) by sleeping before the next attempt."""
        cause = cause_text(e)
        if not self.seen_up:
            raise ServerUnavailable(
                f"cannot reach the OpenAI-compatible server at `{self.base_url}` ({cause}); "
                f"check `--base-url` and that the server is running"
            ) from e
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            self.stats.outages += 1
            log.warning(
                "the server at %s refuses connections (%s): requests wait up to %g s (`--server-wait`) for it "
                "to come back",
                self.base_url,
                cause,
                self.server_wait_s,
            )
        down = now - self._down_since
        if down >= self.server_wait_s:
            raise ServerUnavailable(
                f"the server at `{self.base_url}` has refused connections for {down:.0f} s ({cause}), longer than the "
                f"{self.server_wait_s:g} s `--server-wait` allows; {what} gave up. Restart the server, then finish "
                f"the run with `--resume`"
            ) from e
        pause = min(self.backoff_s * 2**polls, self.max_backoff_s, self.server_wait_s - down + 0.01)
        await asyncio.sleep(max(0.0, pause))

    def _log_retry(self, message: str) -> None:
        """A warning at most every 10 s (retries under a flaky server would flood the terminal),
        debug otherwise; `stats` has the counts."""
        now = time.monotonic()
        if now - self._last_warning >= 10.0:
            self._last_warning = now
            log.warning("%s (%s so far; further retries within 10 s are not shown)", message, self.stats.summary())
        else:
            log.debug(message)

    def not_json(self, what: str, found: str) -> str:
        return (
            f"`{self.base_url}` answered {what} with a reply that is not JSON ({found}); expected an "
            f"OpenAI-compatible API: check `--base-url` (it usually ends in `/v1`)"
        )

    def first_choice(self, reply: Any, what: str) -> Any:
        choices = getattr(reply, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise PolicyError(
                f"`{self.base_url}` answered {what} with JSON that has no `choices` ({str(reply)[:200]}); "
                f"expected an OpenAI completion object: check `--base-url` and that the server is OpenAI-compatible"
            )
        return choices[0]

    async def close(self) -> None:
        try:
            await self.api.close()
        except Exception:  # noqa: BLE001 - closing twice or after the loop ended is harmless
            pass
