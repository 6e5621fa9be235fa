"""`openai`: any OpenAI-compatible server through the `openai` client.

Two modes, chosen by probing the server on first use (`mode="auto"`):

- `tokens` (vLLM's server): `POST /v1/completions` with the prompt as token ids and
  `return_token_ids`, `return_tokens_as_token_ids`, `logprobs: 0`; the server returns the sampled
  token ids and each one's log-prob, so trajectories are token-in/token-out and trainable
  (`supports_token_io = True`). Start vLLM with `--logprobs-mode processed_logprobs` to get the
  log-probs of the distribution actually sampled from (MACHINE.md); by default vLLM returns raw
  log-probs (before temperature / top-k / top-p).
- `text` (servers that take only text, e.g. `transformers serve`): the prompt ids are decoded to
  text and sent to `/v1/completions`; the returned text is re-tokenised, so the tokens are not
  exactly what the server sampled and there are no log-probs (`supports_token_io = False`):
  usable for evaluation only. The backend logs this once and reports it in
  `Generation.info["token_io"]`, which `evaluate` copies into its JSON.

Robustness: requests are retried with exponential backoff on HTTP 429, 5xx and timeouts
(`max_retries`); an unreachable endpoint raises `PolicyError` after `connect_timeout_s` (a few
seconds), never hangs. The API key comes from the environment variable `api_key_env`
(default `OPENAI_API_KEY`; `EMPTY` when unset, which local servers accept).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from typing import Any, Literal

from spo_agents.errors import PolicyError
from spo_agents.policy.base import Generation, PolicyBackend, Resumed, SamplingParams
from spo_agents.weight_sync import VersionGate
from spo_agents.policy.stopping import StopMatch, eos_token_ids, find_stop

log = logging.getLogger(__name__)

Mode = Literal["auto", "tokens", "text"]


class OpenAIPolicy(PolicyBackend):
    """A policy served by an OpenAI-compatible endpoint (see the module docstring).

    Args:
        base_url: e.g. `http://127.0.0.1:8000/v1`.
        model: the model name the server knows.
        tokenizer: the matching Hugging Face tokenizer (object or name/path); defaults to `model`
            (works when `model` is a local directory).
        api_key_env: environment variable holding the API key.
        mode: `auto` (probe), `tokens` (require token-in/token-out) or `text` (eval only).
        request_timeout_s: read timeout of one request; connect_timeout_s: connect timeout.
        max_retries: retries on 429, 5xx and timeouts, with backoff starting at `backoff_s`.
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
        max_retries: int = 5,
        backoff_s: float = 0.5,
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
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.mode: Mode = mode
        self.server_kind = "unknown"
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.connect_timeout_s = connect_timeout_s
        self.extra_body = dict(extra_body or {})
        self.ignore_eos = ignore_eos
        self.api_key_env = api_key_env
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
        self._probe_lock = asyncio.Lock() if mode == "auto" else None
        self._limit = asyncio.Semaphore(max_concurrency)
        self._warned = False

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def supports_token_io(self) -> bool:  # type: ignore[override]
        return self.mode == "tokens"

    # --- requests -----------------------------------------------------------------------------
    async def _request(self, make: Any, what: str) -> Any:
        """Run `make()` (one API call) with retries on 429, 5xx and timeouts."""
        import openai

        attempt = 0
        while True:
            try:
                return await make()
            except openai.APIConnectionError as e:
                timeout = isinstance(e, openai.APITimeoutError)
                if not timeout or attempt >= self.max_retries:
                    if timeout:
                        raise PolicyError(f"`{self.base_url}` timed out on {what} {attempt + 1} times; giving up") from e
                    raise PolicyError(
                        f"cannot reach the OpenAI-compatible server at `{self.base_url}` ({e.__cause__ or e}); "
                        f"check `--base-url` and that the server is running"
                    ) from e
            except openai.RateLimitError as e:
                if attempt >= self.max_retries:
                    raise PolicyError(f"`{self.base_url}` kept answering 429 (rate limited) on {what}; giving up after {attempt + 1} tries") from e
            except openai.InternalServerError as e:
                if attempt >= self.max_retries:
                    raise PolicyError(f"`{self.base_url}` kept failing with HTTP {e.status_code} on {what}; giving up after {attempt + 1} tries: {e}") from e
            except openai.AuthenticationError as e:
                raise PolicyError(f"`{self.base_url}` rejected the API key (HTTP 401); set it in `${self.api_key_env}`") from e
            except openai.APIStatusError as e:
                raise PolicyError(f"`{self.base_url}` refused {what} with HTTP {e.status_code}: {e.message}") from e
            delay = self.backoff_s * (2**attempt) * (0.5 + random.random())
            log.warning("retrying %s against %s in %.1fs (attempt %d)", what, self.base_url, delay, attempt + 1)
            await asyncio.sleep(delay)
            attempt += 1

    async def _probe(self, prompt_ids: list[int]) -> None:
        """Decide between `tokens` and `text` with one tiny token-id request."""
        import openai

        try:
            resp = await self._client.completions.create(
                model=self.model,
                prompt=prompt_ids,
                max_tokens=1,
                temperature=0.0,
                extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True, "logprobs": 0},
            )
        except openai.BadRequestError as e:
            self.mode = "text"
            self.server_kind = "transformers-serve" if "prompt must be a string" in str(e) else "text-only"
        except openai.APIStatusError as e:
            if e.status_code == 404:
                await self._check_model_served()
            if e.status_code in (404, 422):
                self.mode, self.server_kind = "text", "text-only"
            else:
                await self._request(lambda: self._raise(e), "the capability probe")
        except openai.APIConnectionError as e:
            raise PolicyError(
                f"cannot reach the OpenAI-compatible server at `{self.base_url}` ({e.__cause__ or e}); "
                f"check `--base-url` and that the server is running"
            ) from e
        else:
            choice = resp.choices[0]
            extra = choice.model_extra or {}
            ok = isinstance(extra.get("token_ids"), list) and choice.logprobs is not None
            self.mode = "tokens" if ok else "text"
            self.server_kind = "vllm" if ok else "text-only"
        if self.mode == "text":
            log.warning(
                "the server at %s cannot take token ids or return sampled tokens with log-probs "
                "(%s): the `openai` backend works in text mode, usable for evaluation only",
                self.base_url,
                self.server_kind,
            )

    async def _check_model_served(self) -> None:
        """A 404 usually means a wrong model name, not a text-only server: say so."""
        try:
            served = [m.id for m in (await self._client.models.list()).data]
        except Exception:  # noqa: BLE001 - servers without /v1/models: fall back as before
            return
        if served and self.model not in served:
            raise PolicyError(
                f"the server at `{self.base_url}` does not serve a model named `{self.model}`; it serves "
                f"{', '.join(f'`{m}`' for m in served)}: pass one of them as `--model` (or `rollout.server_model`)"
            )

    @staticmethod
    async def _raise(e: Exception) -> Any:
        raise e

    async def connect(self) -> None:
        """Check the server now (and choose the mode): raises `PolicyError` within about
        `connect_timeout_s` when the endpoint cannot be reached."""
        import openai

        if self.mode == "auto":
            await self._ensure_mode(self._tokenizer.encode("Hi", add_special_tokens=False) or [0])
            return
        try:
            await self._client.models.list()
        except openai.APIConnectionError as e:
            raise PolicyError(
                f"cannot reach the OpenAI-compatible server at `{self.base_url}` ({e.__cause__ or e}); "
                f"check `--base-url` and that the server is running"
            ) from e
        except openai.APIStatusError:
            pass  # reachable; some servers do not list models

    async def _ensure_mode(self, prompt_ids: list[int]) -> None:
        assert self._probe_lock is not None
        async with self._probe_lock:
            if self.mode == "auto":
                await self._probe(list(prompt_ids))

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        if self.mode == "auto":
            await self._ensure_mode(prompt_ids)
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
        kw: dict[str, Any] = {"model": self.model, "max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p}
        if params.stop:
            kw["stop"] = list(params.stop)
        if params.seed is not None:
            kw["seed"] = params.seed
        return kw

    async def _generate_tokens(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        body = {"return_token_ids": True, "return_tokens_as_token_ids": True, "logprobs": 0, "include_stop_str_in_output": True}
        if params.top_k > 0:
            body["top_k"] = params.top_k
        if self.ignore_eos:
            body["ignore_eos"] = True
        body.update(self.extra_body)
        resp = await self._request(
            lambda: self._client.completions.create(prompt=prompt_ids, extra_body=body, **self._common(params)), "a completion"
        )
        choice = resp.choices[0]
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
                f"the server returned {len(token_ids)} token ids but {sum(x is not None for x in lps)} log-probs; expected "
                f"one log-prob per sampled token (is it vLLM with `logprobs: 0` support?)"
            )
        stop_reason = extra.get("stop_reason")
        if choice.finish_reason == "length":
            reason, stop_string = "length", None
        elif isinstance(stop_reason, str):
            reason, stop_string = "stop", stop_reason
        else:
            reason, stop_string = "eos", None
        text = self._tokenizer.decode(token_ids[:-1] if reason == "eos" and token_ids and token_ids[-1] in self.eos_ids else token_ids, skip_special_tokens=False)
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
        body = dict(self.extra_body)
        if self.server_kind == "transformers-serve":
            # `transformers serve` samples only when asked through its generation config
            gc: dict[str, Any] = {"do_sample": params.temperature > 0, "max_new_tokens": params.max_new_tokens}
            if params.temperature > 0:
                gc.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
            if self.ignore_eos:
                gc["min_new_tokens"] = params.max_new_tokens
            body["generation_config"] = json.dumps({k: v for k, v in gc.items() if v is not None})
        resp = await self._request(lambda: self._client.completions.create(prompt=prompt, extra_body=body or None, **kw), "a completion")
        choice = resp.choices[0]
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

    async def close(self) -> None:
        try:
            await self._client.close()
        except Exception:  # noqa: BLE001 - closing twice or after the loop ended is harmless
            pass
