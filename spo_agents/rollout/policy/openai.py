"""`openai`: any OpenAI-compatible server through the `openai` client.

Two modes, chosen by probing the server on first use (`mode="auto"`):

- `tokens` (vLLM's server): `POST /v1/completions` with the prompt as token ids and
  `return_token_ids`, `return_tokens_as_token_ids`, `logprobs: 0`; the server returns the sampled
  token ids and each one's log-prob, so trajectories are token-in/token-out and trainable
  (`supports_token_io = True`). Start vLLM with `--logprobs-mode processed_logprobs` to get the
  log-probs of the distribution actually sampled from; by default vLLM returns raw log-probs
  (before temperature / top-k / top-p).
- `text` (servers that take only text, e.g. `transformers serve`): the prompt ids are decoded to
  text and sent to `/v1/completions`; the returned text is re-tokenised, so the tokens are not
  exactly what the server sampled and there are no log-probs (`supports_token_io = False`):
  usable for evaluation only. The backend logs this once and reports it in
  `Generation.info["token_io"]`, which `evaluate` copies into its JSON.

**The probe** (`connect()`, or the first `generate` in `auto` mode) is one 1-token completion
request (two for a text-only server: token ids, then text). It checks the endpoint, the model
name and what the server can do before any sample runs. A refusal keeps the server's own words:
a model the server does not serve (vLLM's 404 "The model `Y` does not exist", `transformers
serve`'s 400 "Server is pinned to X; requested Y") is an error that quotes them and lists the
served models; 404 on both `/completions` and `/models` is a base URL without `/v1`, and the error
says so (checking `{base}/v1/models` first); a reply that is not JSON is an error, not a crash.

**Retries and timeouts** (every request, the probe included; the `spo-agent eval` flag in brackets):
- `connect_timeout_s` = 3 (`--connect-timeout`): opening a TCP connection.
- `probe_timeout_s` = 10 (`--probe-timeout`): the probe's wait for an answer. A server that accepts
  but never answers fails the probe with "connected, but no response within 10 s" (no retry).
- `request_timeout_s` = 600 (`--request-timeout`): a generation request's wait for the next byte
  of its answer; then it is retried.
- `max_retries` = 5 (`--max-retries`): retries of one request after HTTP 429, HTTP 408 or 5xx, a
  timeout, or a dropped connection (peer closed mid-body, server disconnected, connection reset).
- `backoff_s` = 0.5, `max_backoff_s` = 10 (`--backoff`, `--max-backoff`): the wait before retry n
  is `backoff_s * 2^(n-1)`, jittered by x0.5-1.5, at most `max_backoff_s`. A `Retry-After` (or
  `retry-after-ms`) header on 429 / 503 replaces it, up to `server_wait_s`.
- `server_wait_s` = 300 (`--server-wait`): how long requests wait for a server that refuses
  connections after having answered (a restart). They poll at the same doubling intervals, without
  using up `max_retries`, and fail once the outage is older than this.

A server that has never answered and refuses the connection fails at once ("cannot reach"): a
wrong address is not waited for. Once a request has used its retries or the outage outlasts
`server_wait_s`, it raises `PolicyError`, which the rollout records as the sample's `error`.
`stats` counts the requests sent, the retries by reason and the time spent waiting for the
server (`spo-agent eval` prints it).

The API key comes from the environment variable `api_key_env` (default `OPENAI_API_KEY`; `EMPTY`
when unset, which local servers accept).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from spo_agents.errors import PolicyError
from spo_agents.rollout.policy.base import Generation, PolicyBackend, Resumed, SamplingParams, VersionGate
from spo_agents.rollout.policy.stopping import StopMatch, eos_token_ids, find_stop

log = logging.getLogger(__name__)

Mode = Literal["auto", "tokens", "text"]
_TOKEN_IO_BODY = {"return_token_ids": True, "return_tokens_as_token_ids": True, "logprobs": 0}
_PROBE = "the capability probe"


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


class OpenAIPolicy(PolicyBackend):
    """A policy served by an OpenAI-compatible endpoint (see the module docstring).

    Args:
        base_url: e.g. `http://127.0.0.1:8000/v1`.
        model: the model name the server knows.
        tokenizer: the matching Hugging Face tokenizer (object or name/path); defaults to `model`
            (works when `model` is a local directory).
        api_key_env: environment variable holding the API key.
        mode: `auto` (probe), `tokens` (require token-in/token-out) or `text` (eval only).
        request_timeout_s, connect_timeout_s, probe_timeout_s, max_retries, backoff_s,
            max_backoff_s, server_wait_s: the retry and timeout settings (module docstring).
        max_concurrency: requests in flight at most.
        extra_body: extra request fields sent with every completion request.
        ignore_eos: keep generating past end-of-turn until `max_new_tokens` or a stop string
            (vLLM's `ignore_eos`; `min_new_tokens` for `transformers serve`). For benchmarks that
            need controlled response lengths.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        tokenizer: Any = None,
        api_key_env: str = "OPENAI_API_KEY",
        mode: Mode = "auto",
        request_timeout_s: float = 600.0,
        connect_timeout_s: float = 3.0,
        probe_timeout_s: float = 10.0,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        server_wait_s: float = 300.0,
        max_concurrency: int = 64,
        extra_body: dict[str, Any] | None = None,
        ignore_eos: bool = False,
    ) -> None:
        super().__init__()
        self._gate = VersionGate(self.version)
        import httpx
        from openai import AsyncOpenAI

        if mode not in ("auto", "tokens", "text"):
            raise PolicyError(f"`mode` must be `auto`, `tokens` or `text`, got `{mode}`")
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
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.mode: Mode = mode
        self.server_kind = "unknown"
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.server_wait_s = server_wait_s
        self.connect_timeout_s = connect_timeout_s
        self.probe_timeout_s = probe_timeout_s
        self.extra_body = dict(extra_body or {})
        self.ignore_eos = ignore_eos
        self.api_key_env = api_key_env
        self.stats = RequestStats()
        if tokenizer is None or isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            name = tokenizer or model
            try:
                tokenizer = AutoTokenizer.from_pretrained(name)
            except Exception as e:  # noqa: BLE001 - many failure types, one message
                raise PolicyError(
                    f"cannot load the tokenizer `{name}` for the `openai` backend ({type(e).__name__}: {e}); "
                    f"pass `--tokenizer DIR` (a local copy of the served model's tokenizer)"
                ) from e
        self._tokenizer = tokenizer
        self.eos_ids = eos_token_ids(tokenizer)
        self._client = AsyncOpenAI(
            base_url=self.base_url,
            api_key=os.environ.get(api_key_env) or "EMPTY",
            max_retries=0,  # retries are ours: bounded, logged, and quick to give up on refusals
            timeout=httpx.Timeout(request_timeout_s, connect=connect_timeout_s),
        )
        self._probe_timeout = httpx.Timeout(probe_timeout_s, connect=connect_timeout_s)
        self._probe_lock = asyncio.Lock()
        self._probed = False
        self._limit = asyncio.Semaphore(max_concurrency)
        self._warned = False
        self._seen_up = False  # the server has accepted a connection at least once
        self._down_since: float | None = None  # when the current outage (refused connections) began
        self._last_warning = -1e9

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def supports_token_io(self) -> bool:  # type: ignore[override]
        return self.mode == "tokens"

    # --- requests -----------------------------------------------------------------------------
    async def _request(self, make: Any, what: str, *, probe: bool = False) -> Any:
        """Run `make()` (one API call) with the retries of the module docstring; return its reply.

        `probe`: a timeout waiting for the answer is an error at once (with its reason), not a retry.
        """
        import openai

        failures, polls = 0, 0
        while True:
            self.stats.requests += 1
            retry_after = None
            try:
                reply = await make()
            except openai.APIStatusError as e:
                self._answered()
                reason = self._retryable_status(e, what)
                retry_after = _retry_after(e.response, self.server_wait_s) if e.status_code in (429, 503) else None
            except openai.APIConnectionError as e:
                failure = _connection_failure(e)
                if failure == "refused":
                    await self._wait_for_server(e, what, polls)
                    polls += 1
                    continue
                self._seen_up = True
                if failure == "timeout" and probe:
                    raise PolicyError(
                        f"connected to `{self.base_url}`, but no response to {what} (a 1-token completion for "
                        f"`{self.model}`) within {self.probe_timeout_s:g} s: the server accepts connections but does "
                        f"not answer (stuck, overloaded or still loading?); `--probe-timeout` sets this wait"
                    ) from e
                reason = "timeout" if failure == "timeout" else "dropped connection"
            except ValueError as e:  # a JSON content type whose body does not parse
                self._answered()
                raise PolicyError(self._not_json(what, f"{type(e).__name__}: {e}")) from e
            else:
                self._answered()
                if isinstance(reply, str):
                    raise PolicyError(self._not_json(what, repr(reply[:120])))
                return reply
            failures += 1
            if failures > self.max_retries:
                raise PolicyError(
                    f"`{self.base_url}` failed {what} {failures} times in a row (last: {reason}); giving up after "
                    f"{self.max_retries} retries (`--max-retries`)"
                )
            kind = reason.split(":")[0]  # `HTTP 503`, not the server's message
            self.stats.retries[kind] = self.stats.retries.get(kind, 0) + 1
            delay = retry_after if retry_after is not None else self._backoff(failures)
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
            return f"HTTP {status}: {_server_message(e)}"
        raise PolicyError(f"`{self.base_url}` refused {what} with HTTP {status}: {_server_message(e)}") from e

    def _backoff(self, n: int) -> float:
        """The wait before retry `n` (1-based): doubling from `backoff_s`, jittered, capped."""
        return min(self.backoff_s * 2 ** (n - 1) * (0.5 + random.random()), self.max_backoff_s)

    def _answered(self) -> None:
        """The server answered: note it, and end an outage if one was going on."""
        self._seen_up = True
        if self._down_since is not None:
            down = time.monotonic() - self._down_since
            self._down_since = None
            self.stats.outage_s += down
            log.warning("the server at %s answers again after %.1f s", self.base_url, down)

    async def _wait_for_server(self, e: Exception, what: str, polls: int) -> None:
        """A refused connection: fail at once if the server never answered, else wait for it (at
        most `server_wait_s` since the outage began) by sleeping before the next attempt."""
        cause = _cause_text(e)
        if not self._seen_up:
            raise PolicyError(
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
            raise PolicyError(
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

    def _not_json(self, what: str, found: str) -> str:
        return (
            f"`{self.base_url}` answered {what} with a reply that is not JSON ({found}); expected an "
            f"OpenAI-compatible API: check `--base-url` (it usually ends in `/v1`)"
        )

    def _first_choice(self, reply: Any, what: str) -> Any:
        choices = getattr(reply, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise PolicyError(
                f"`{self.base_url}` answered {what} with JSON that has no `choices` ({str(reply)[:200]}); "
                f"expected an OpenAI completion object: check `--base-url` and that the server is OpenAI-compatible"
            )
        return choices[0]

    # --- the probe ------------------------------------------------------------------------------
    async def _probe(self, prompt_ids: list[int]) -> None:
        """Check the server with 1-token requests and settle the mode (module docstring)."""
        import openai

        if self.mode in ("auto", "tokens"):
            reply = await self._probe_request(prompt_ids, tokens=True)
            if isinstance(reply, openai.APIStatusError):
                if reply.status_code == 404:
                    await self._diagnose(reply)
                if self.mode == "tokens":
                    raise PolicyError(
                        f"`{self.base_url}` refused a token-id prompt (HTTP {reply.status_code}: "
                        f"{_server_message(reply)}); token-in/token-out needs vLLM's server; a server without it is "
                        f"usable for evaluation only (`mode: text`)"
                    )
                self.server_kind = "transformers-serve" if "prompt must be a string" in str(reply) else "text-only"
            else:
                choice = self._first_choice(reply, _PROBE)
                extra = choice.model_extra or {}
                if isinstance(extra.get("token_ids"), list) and choice.logprobs is not None:
                    self.mode, self.server_kind = "tokens", "vllm"
                    return
                if self.mode == "tokens":
                    raise PolicyError(
                        "the server returned no `token_ids` for a token-id prompt: token-in/token-out needs vLLM's "
                        "`return_token_ids`; a server without it is usable for evaluation only (`mode: text`)"
                    )
                self.server_kind = "text-only"
                self._text_mode()
                return
        reply = await self._probe_request(prompt_ids, tokens=False)
        if isinstance(reply, openai.APIStatusError):
            await self._diagnose(reply)
        self._first_choice(reply, _PROBE)
        self._text_mode()

    def _text_mode(self) -> None:
        if self.mode == "auto":
            self.mode = "text"
            log.warning(
                "the server at %s cannot take token ids or return sampled tokens with log-probs "
                "(%s): the `openai` backend works in text mode, usable for evaluation only",
                self.base_url,
                self.server_kind,
            )

    async def _probe_request(self, prompt_ids: list[int], *, tokens: bool) -> Any:
        """One 1-token completion with the probe's timeout; a 400, 404 or 422 comes back as the
        exception (it is an answer about the server), other failures are retried or raised."""
        import openai

        params = SamplingParams(temperature=0.0, max_new_tokens=1)
        if tokens:
            prompt: Any = list(prompt_ids)
            body: dict[str, Any] | None = dict(_TOKEN_IO_BODY)
        else:
            prompt, body = self._tokenizer.decode(prompt_ids, skip_special_tokens=False), self._text_body(params)
        kw = {**self._common(params), "prompt": prompt, "extra_body": body or None, "timeout": self._probe_timeout}

        async def call() -> Any:
            try:
                return await self._client.completions.create(**kw)
            except (openai.BadRequestError, openai.NotFoundError, openai.UnprocessableEntityError) as e:
                return e

        return await self._request(call, _PROBE, probe=True)

    async def _diagnose(self, e: Any) -> None:
        """Raise the clearest `PolicyError` for a probe the server refused (400 / 404 / 422),
        keeping the server's own message."""
        said = f"HTTP {e.status_code}: {_server_message(e)}"
        served = await self._served_models()
        if served is not None and self.model not in served:
            raise PolicyError(
                f"the server at `{self.base_url}` does not serve a model named `{self.model}` ({said}); it serves "
                f"{', '.join(f'`{m}`' for m in served) or 'no model'}: pass one of them as `--model` "
                f"(or `rollout.server_model`)"
            )
        if e.status_code == 404 and served is None:
            if await self._answers_under_v1():
                raise PolicyError(
                    f"`{self.base_url}` answers HTTP 404 to `/completions` and `/models`, and "
                    f"`{self.base_url}/v1/models` answers: the API is under `/v1`; pass `--base-url {self.base_url}/v1`"
                )
            hint = "" if self.base_url.endswith("/v1") else " (an OpenAI-compatible base URL usually ends in `/v1`)"
            if not _mentions_model(_server_message(e), self.model):
                raise PolicyError(
                    f"`{self.base_url}` answers HTTP 404 to `/completions` and `/models` ({_server_message(e)}): it "
                    f"is not the base of an OpenAI-compatible API; check `--base-url`{hint}"
                )
        raise PolicyError(
            f"the server at `{self.base_url}` refused a 1-token completion for model `{self.model}` ({said}); "
            f"check `--model` (the name the server serves, see its `/models`) and `--base-url`"
        )

    async def _served_models(self) -> list[str] | None:
        """The model names `/models` lists, or None when it cannot be read."""
        try:
            page = await self._client.models.list(timeout=self._probe_timeout)
            return [str(m.id) for m in page.data]
        except Exception:  # noqa: BLE001 - servers without /v1/models, non-JSON replies, ...
            return None

    async def _answers_under_v1(self) -> bool:
        """Whether `{base_url}/v1/models` answers with a model list (a base URL missing `/v1`)."""
        import httpx

        if self.base_url.endswith("/v1"):
            return False
        try:
            async with httpx.AsyncClient(timeout=self._probe_timeout) as client:
                auth = {"Authorization": f"Bearer {self._client.api_key}"}
                r = await client.get(f"{self.base_url}/v1/models", headers=auth)
            return r.status_code == 200 and isinstance(r.json().get("data"), list)
        except Exception:  # noqa: BLE001 - any failure means "no"
            return False

    async def connect(self) -> None:
        """Probe the server now (and settle the mode): raises `PolicyError` before any sample when
        the endpoint is unreachable, does not answer within `probe_timeout_s`, or refuses the model."""
        await self._ensure_probed(self._tokenizer.encode("Hi", add_special_tokens=False) or [0])

    async def _ensure_probed(self, prompt_ids: list[int]) -> None:
        async with self._probe_lock:
            if not self._probed:
                await self._probe(list(prompt_ids))
                self._probed = True

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        if self.mode == "auto":
            await self._ensure_probed(prompt_ids)
        async with self._limit:
            # The gate holds new requests while weights are pushed and stamps each generation
            # with the version current when it was *sent*, so none is attributed to weights
            # that did not produce it.
            async with self._gate.request() as version:
                if self.mode == "tokens":
                    gen = await self._generate_tokens(list(prompt_ids), params)
                else:
                    gen = await self._generate_text(list(prompt_ids), params)
        gen.policy_version = version
        return gen

    async def pause(self) -> None:
        """Hold new requests and return once none is in flight (before a weight push)."""
        await self._gate.pause()

    def resume(self) -> Resumed:
        """Reopen with the weights of `self.version` (set it before resuming)."""
        self._gate.resume(self.version)
        return Resumed()

    def _common(self, params: SamplingParams) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "model": self.model,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.stop:
            kw["stop"] = list(params.stop)
        if params.seed is not None:
            kw["seed"] = params.seed
        return kw

    async def _generate_tokens(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        body: dict[str, Any] = {**_TOKEN_IO_BODY, "include_stop_str_in_output": True}
        if params.top_k > 0:
            body["top_k"] = params.top_k
        if self.ignore_eos:
            body["ignore_eos"] = True
        body.update(self.extra_body)
        resp = await self._request(
            lambda: self._client.completions.create(prompt=prompt_ids, extra_body=body, **self._common(params)),
            "a completion",
        )
        choice = self._first_choice(resp, "a completion")
        extra = choice.model_extra or {}
        if extra.get("token_ids") is None:
            raise PolicyError(
                "the server returned no `token_ids` for a token-id prompt: token-in/token-out needs vLLM's "
                "`return_token_ids`; a server without it is usable for evaluation only (`mode: text`)"
            )
        if choice.finish_reason not in ("stop", "length"):
            raise PolicyError(
                f"the server ended a generation with finish_reason `{choice.finish_reason}` (aborted or failed), "
                "not at a stop or a length limit; its partial turn is not trained on"
            )
        token_ids = [int(t) for t in extra["token_ids"]]
        lps = list(getattr(choice.logprobs, "token_logprobs", None) or [])
        if len(lps) != len(token_ids) or any(x is None for x in lps):
            raise PolicyError(
                f"the server returned {len(token_ids)} token ids but {sum(x is not None for x in lps)} log-probs; "
                f"expected "
                f"one log-prob per sampled token (is it vLLM with `logprobs: 0` support?)"
            )
        stop_reason = extra.get("stop_reason")
        if choice.finish_reason == "length":
            reason, stop_string = "length", None
        elif isinstance(stop_reason, str):
            reason, stop_string = "stop", stop_reason
        else:
            reason, stop_string = "eos", None
        kept = token_ids[:-1] if reason == "eos" and token_ids and token_ids[-1] in self.eos_ids else token_ids
        text = self._tokenizer.decode(kept, skip_special_tokens=False)
        return Generation(
            token_ids=token_ids,
            logprobs=[float(x) for x in lps],
            text=text,
            finish_reason=reason,
            stop_string=stop_string,
            info={"token_io": True},
        )

    async def _generate_text(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        prompt = self._tokenizer.decode(prompt_ids, skip_special_tokens=False)
        kw = self._common(params)
        body = self._text_body(params)
        resp = await self._request(
            lambda: self._client.completions.create(prompt=prompt, extra_body=body or None, **kw), "a completion"
        )
        choice = self._first_choice(resp, "a completion")
        text = choice.text or ""
        ids = self._tokenizer.encode(text, add_special_tokens=False)
        match = find_stop(self._tokenizer, ids, params.stop, self.eos_ids)
        if match is not None:
            ids = ids[: match.length]
        elif choice.finish_reason == "length" or len(ids) >= params.max_new_tokens:
            match = StopMatch(len(ids), "length")
        else:
            # the server stopped at its end-of-turn token and left it out of the text
            ids = ids + [self.eos_ids[0]] if self.eos_ids else ids
            match = StopMatch(len(ids), "eos")
        out_text = self._tokenizer.decode(ids[:-1] if match.reason == "eos" else ids, skip_special_tokens=False)
        if not self._warned:
            self._warned = True
            log.info("text mode: generations are re-tokenised and carry no log-probs (evaluation only)")
        return Generation(
            token_ids=ids,
            logprobs=[0.0] * len(ids),
            text=out_text,
            finish_reason=match.reason,
            stop_string=match.stop_string,
            info={"token_io": False},
        )

    def _text_body(self, params: SamplingParams) -> dict[str, Any]:
        """Extra fields of a text-mode request (`transformers serve` samples only when asked
        through its generation config)."""
        body = dict(self.extra_body)
        if self.server_kind == "transformers-serve":
            gc: dict[str, Any] = {"do_sample": params.temperature > 0, "max_new_tokens": params.max_new_tokens}
            if params.temperature > 0:
                gc.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
            if self.ignore_eos:
                gc["min_new_tokens"] = params.max_new_tokens
            body["generation_config"] = json.dumps({k: v for k, v in gc.items() if v is not None})
        return body

    async def close(self) -> None:
        try:
            await self._client.close()
        except Exception:  # noqa: BLE001 - closing twice or after the loop ended is harmless
            pass


def _causes(e: BaseException) -> list[BaseException]:
    """`e` and the exceptions it was raised from, outermost first (bounded: no cycles)."""
    chain: list[BaseException] = []
    while e is not None and len(chain) < 8 and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return chain


def _connection_failure(e: BaseException) -> str:
    """`refused` (no connection made: nothing listens, unreachable, connect timed out), `timeout`
    (connected, no answer in time) or `dropped` (the connection broke mid-request or mid-reply)."""
    names = {type(c).__name__ for c in _causes(e)}
    if names & {"ConnectError", "ConnectTimeout", "ConnectionRefusedError"}:
        return "refused"
    if names & {"ReadTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException"}:
        return "timeout"
    return "dropped"


def _cause_text(e: BaseException) -> str:
    """The innermost non-empty message of `e`'s chain, e.g. `All connection attempts failed`."""
    for c in reversed(_causes(e)):
        if str(c):
            return f"{type(c).__name__}: {c}"
    return type(e).__name__


def _server_message(e: Any) -> str:
    """The server's own words in an error reply: OpenAI's `error.message`, FastAPI's `detail`, or
    the body's first 300 characters."""
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        for key in ("message", "detail"):
            if isinstance(inner, dict) and isinstance(inner.get(key), str):
                return inner[key]
        if isinstance(body.get("detail"), str):
            return body["detail"]
        return json.dumps(body)[:300]
    if isinstance(body, str) and body.strip():
        return body.strip()[:300]
    return getattr(e, "message", None) or type(e).__name__


def _mentions_model(message: str, model: str) -> bool:
    """Whether a refusal speaks of the model (then it is about `--model`, not about the URL)."""
    return model in message or "model" in message.lower()


def _retry_after(response: Any, cap: float) -> float | None:
    """Seconds to wait from a reply's `retry-after-ms` or `Retry-After` (seconds or an HTTP
    date), at most `cap`; None when absent or unreadable."""
    headers = getattr(response, "headers", None) or {}
    try:
        if headers.get("retry-after-ms") is not None:
            return min(max(float(headers["retry-after-ms"]) / 1000.0, 0.0), cap)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            seconds = float(value)
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            seconds = (when - datetime.now(timezone.utc)).total_seconds()
        return min(max(seconds, 0.0), cap)
    except (TypeError, ValueError):
        return None
