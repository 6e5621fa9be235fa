"""`openai`: a policy served by any OpenAI-compatible server, through the `openai` client.

`mode="auto"` probes the server on first use (`connect()`: one 1-token completion) and picks:
- `tokens` (vLLM's server): token-id prompts with `return_token_ids` and `logprobs: 0`, so the
  sampled ids and their log-probs come back as they are: trainable.
- `text` (servers that take only text): prompts decoded to text and the reply re-tokenised, no
  log-probs: evaluation only, logged once and reported in `Generation.info["token_io"]`.
A refused probe is an error that quotes the server and names the fix (wrong model, base URL
without `/v1`, a reply that is not JSON). Requests are retried, timed out and waited for by
`ServerClient` (`spo_agents.rollout.policy.openai_client`); the settings and what each failure
does: docs/evaluation.md, "Server behaviour". Every generation is stamped with the weight version
its request was sent under (the policy's `VersionGate`).

1. vLLM returns raw log-probs (before temperature / top-k / top-p) unless started with
   `--logprobs-mode processed_logprobs`; training needs the processed ones.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Literal

from spo_agents.errors import PolicyError
from spo_agents.rollout.policy.base import Generation, PolicyBackend, SamplingParams
from spo_agents.rollout.policy.openai_client import RequestStats, ServerClient
from spo_agents.rollout.policy.openai_errors import mentions_model, server_message
from spo_agents.rollout.policy.stopping import StopMatch, eos_token_ids, find_stop

log = logging.getLogger(__name__)

Mode = Literal["auto", "tokens", "text"]
_TOKEN_IO_BODY = {"return_token_ids": True, "return_tokens_as_token_ids": True, "logprobs": 0}
_PROBE = "the capability probe"


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
        if mode not in ("auto", "tokens", "text"):
            raise PolicyError(f"`mode` must be `auto`, `tokens` or `text`, got `{mode}`")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.mode: Mode = mode
        self.server_kind = "unknown"
        self.extra_body = dict(extra_body or {})
        self.ignore_eos = ignore_eos
        self.client = ServerClient(
            self.base_url,
            model,
            api_key_env=api_key_env,
            request_timeout_s=request_timeout_s,
            connect_timeout_s=connect_timeout_s,
            probe_timeout_s=probe_timeout_s,
            max_retries=max_retries,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
            server_wait_s=server_wait_s,
        )
        self._client = self.client.api
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
        self._probe_lock = asyncio.Lock()
        self._probed = False
        self._limit = asyncio.Semaphore(max_concurrency)
        self._warned = False

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def stats(self) -> RequestStats:
        """What the requests met (retries, outages)."""
        return self.client.stats

    @property
    def supports_token_io(self) -> bool:  # type: ignore[override]
        return self.mode == "tokens"

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
                        f"{server_message(reply)}); token-in/token-out needs vLLM's server; a server without it is "
                        f"usable for evaluation only (`mode: text`)"
                    )
                self.server_kind = "transformers-serve" if "prompt must be a string" in str(reply) else "text-only"
            else:
                choice = self.client.first_choice(reply, _PROBE)
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
        self.client.first_choice(reply, _PROBE)
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
        kw = {
            **self._common(params),
            "prompt": prompt,
            "extra_body": body or None,
            "timeout": self.client.probe_timeout,
        }

        async def call() -> Any:
            try:
                return await self._client.completions.create(**kw)
            except (openai.BadRequestError, openai.NotFoundError, openai.UnprocessableEntityError) as e:
                return e

        return await self.client.request(call, _PROBE, probe=True)

    async def _diagnose(self, e: Any) -> None:
        """Raise the clearest `PolicyError` for a probe the server refused (400 / 404 / 422),
        keeping the server's own message."""
        said = f"HTTP {e.status_code}: {server_message(e)}"
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
            if not mentions_model(server_message(e), self.model):
                raise PolicyError(
                    f"`{self.base_url}` answers HTTP 404 to `/completions` and `/models` ({server_message(e)}): it "
                    f"is not the base of an OpenAI-compatible API; check `--base-url`{hint}"
                )
        raise PolicyError(
            f"the server at `{self.base_url}` refused a 1-token completion for model `{self.model}` ({said}); "
            f"check `--model` (the name the server serves, see its `/models`) and `--base-url`"
        )

    async def _served_models(self) -> list[str] | None:
        """The model names `/models` lists, or None when it cannot be read."""
        try:
            page = await self._client.models.list(timeout=self.client.probe_timeout)
            return [str(m.id) for m in page.data]
        except Exception:  # noqa: BLE001 - servers without /v1/models, non-JSON replies, ...
            return None

    async def _answers_under_v1(self) -> bool:
        """Whether `{base_url}/v1/models` answers with a model list (a base URL missing `/v1`)."""
        import httpx

        if self.base_url.endswith("/v1"):
            return False
        try:
            async with httpx.AsyncClient(timeout=self.client.probe_timeout) as client:
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

    def set_served_model(self, name: str) -> None:
        """Send `name` as the `model` of later requests (after a `lora` sync: the adapter)."""
        self.model = self.client.model = name

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
        resp = await self.client.request(
            lambda: self._client.completions.create(prompt=prompt_ids, extra_body=body, **self._common(params)),
            "a completion",
        )
        choice = self.client.first_choice(resp, "a completion")
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
        resp = await self.client.request(
            lambda: self._client.completions.create(prompt=prompt, extra_body=body or None, **kw), "a completion"
        )
        choice = self.client.first_choice(resp, "a completion")
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
        await self.client.close()
