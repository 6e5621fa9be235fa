"""`hf`: transformers in-process, the CPU default and the backend of the tests.

Batching. Concurrent `generate` calls are queued; a single worker thread waits `batch_wait_s`
(a few milliseconds) for more requests, groups them by identical sampling settings (temperature,
top-p, top-k, stop strings; `max_new_tokens` may differ, each row stops at its own), and runs one
left-padded `model.generate` call per group. Each row's result is handed back the moment that
row finishes (its episode goes on with the environment), but the batch is static: requests that
arrive while it runs wait for its longest row before their own batch starts (an engine with
continuous batching, like vLLM, admits them at once). Torch runs in that one thread, so the event loop
stays free and torch's intra-op thread pool (`torch_threads`) is not oversubscribed.

Log-probs. `Generation.logprobs` are fp32 log-probs of the distribution actually sampled from:
the model's logits after temperature, top-k and top-p (`transformers` logits processors), i.e.
the behaviour policy pi_old of the PPO ratio (docs/algorithm.md section 3). Tokens removed by top-k/top-p
cannot be sampled, so every returned log-prob is finite. With `temperature = 0` decoding is
greedy and the log-probs are those of the unmodified model (temperature 1).

Stops. A row stops at an end-of-turn token (kept in `token_ids`, left out of `text`,
`finish_reason = "eos"`), at the token that
completes a stop string (kept, `"stop"`, see `spo_agents.policy.stopping`) or after
`max_new_tokens` (`"length"`).

Seeds. Requests are batched, so one random stream serves a whole batch: a batch whose requests
carry seeds is sampled under a seed derived from all of them (in a forked RNG, leaving the
global torch RNG untouched). Results are reproducible when the same requests are batched the
same way (for example one request at a time).

Sharing weights with the learner. `HFPolicy(model=module, tokenizer=tok)` wraps an existing
`torch.nn.Module`; the learner updates it in place between `await policy.pause()` (returns once
no `generate` is running; later calls wait) and `policy.resume()`, then sets `policy.version`.
Generation runs under `torch.no_grad()` in eval mode (no dropout): the module is put in eval mode
before each batch (the learner, which trains it in train mode, leaves it in eval mode too).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from spo_agents.errors import ConfigError, PolicyError
from spo_agents.policy.base import Generation, PolicyBackend, Resumed, SamplingParams
from spo_agents.policy.stopping import StopMatch, StopScanner, eos_token_ids

log = logging.getLogger(__name__)


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    future: concurrent.futures.Future
    version: int = 0


def _params_key(p: SamplingParams) -> tuple:
    """Requests that can share a `generate` call: `max_new_tokens` may differ (each row stops
    at its own budget), the sampling distribution and stop strings may not."""
    return (p.temperature, p.top_p, p.top_k, tuple(p.stop))


class HFPolicy(PolicyBackend):
    """A transformers causal LM served in-process (see the module docstring).

    Args:
        model: a loaded `torch.nn.Module` (shared with the learner), or `None` to load `model_name`.
        tokenizer: the matching tokenizer, or `None` to load it from `model_name`.
        device: where generation runs; defaults to the model's device.
        model_name: a directory or name for `from_pretrained` when `model` is `None`
            (`make_policy` resolves `smollm2-135m` / `tiny-random` first).
        dtype: `float32` (default), `bfloat16` or `float16` when loading.
        batch_wait_s: how long the worker waits for more requests before a batch starts.
        max_batch_size: the most rows in one `generate` call.
        torch_threads: sets `torch.set_num_threads` when given.
    """

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        device: str | None = None,
        *,
        model_name: str | None = None,
        dtype: str = "float32",
        batch_wait_s: float = 0.005,
        max_batch_size: int = 64,
        torch_threads: int | None = None,
    ) -> None:
        super().__init__()
        import torch

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        if model is None or tokenizer is None:
            if model_name is None:
                raise ConfigError("`HFPolicy` needs `model` and `tokenizer`, or `model_name` to load them from")
            from transformers import AutoModelForCausalLM, AutoTokenizer

            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(model_name)
            if model is None:
                from spo_agents.models import torch_dtype

                model = AutoModelForCausalLM.from_pretrained(model_name, dtype=torch_dtype(dtype))
                model.eval()
                if device is not None:
                    model.to(device)
        self.model = model
        self._tokenizer = tokenizer
        self._device = torch.device(device) if device is not None else None
        self.eos_ids = eos_token_ids(tokenizer, getattr(model, "generation_config", None))
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]
        self.batch_wait_s = batch_wait_s
        self.max_batch_size = max_batch_size
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._allowed = threading.Event()
        self._allowed.set()
        self._busy = threading.Lock()
        self._closed = False
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()
        #: counters for benchmarks and logs: generate calls, rows, generated tokens
        self.stats = {"batches": 0, "rows": 0, "tokens": 0}

    # --- protocol -----------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        if self._closed:
            raise PolicyError("this `HFPolicy` is closed; create a new one")
        if not prompt_ids:
            raise PolicyError("`prompt_ids` is empty; a generation needs at least one prompt token")
        self._ensure_worker()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Request(list(prompt_ids), params, fut))
        return await asyncio.wrap_future(fut)

    @property
    def device(self) -> Any:
        """Where generation runs: the `device` given, else the model's (read each time, since
        `train.sharding: fsdp` moves the shared module after this policy is built)."""
        return self._device if self._device is not None else next(self.model.parameters()).device

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._allowed.set()
        self._queue.put(None)
        if self._worker is not None:
            await asyncio.to_thread(self._worker.join, 30)

    # --- weight updates -----------------------------------------------------------------------
    async def pause(self) -> None:
        """Stop starting new batches; return once no `generate` batch is running."""
        self._allowed.clear()
        await asyncio.to_thread(self._wait_idle)

    def _wait_idle(self) -> None:
        with self._busy:
            pass

    def resume(self) -> Resumed:
        """Let queued and new requests run again (works with or without `await`)."""
        self._allowed.set()
        return Resumed()

    @property
    def paused(self) -> bool:
        return not self._allowed.is_set()

    # --- worker -------------------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        with self._worker_lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._loop, name="hf-policy", daemon=True)
                self._worker.start()

    def _loop(self) -> None:
        pending: list[_Request] = []
        while True:
            if not pending:
                item = self._queue.get()
                if item is None:
                    return
                pending.append(item)
            deadline = time.monotonic() + self.batch_wait_s
            while True:
                timeout = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=max(timeout, 0)) if timeout > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._fail(pending, PolicyError("the policy was closed while this request waited"))
                    return
                pending.append(item)
            self._allowed.wait()
            with self._busy:
                if not self._allowed.is_set():
                    continue  # paused between the wait and taking the lock: keep the requests
                key = _params_key(pending[0].params)
                batch = [r for r in pending if _params_key(r.params) == key][: self.max_batch_size]
                taken = {id(r) for r in batch}
                pending = [r for r in pending if id(r) not in taken]
                version = self.version

                def deliver(i: int, gen: Generation, batch: list[_Request] = batch, version: int = version) -> None:
                    gen.policy_version = version
                    if not batch[i].future.done():
                        batch[i].future.set_result(gen)

                try:
                    self._generate_batch(
                        [r.prompt_ids for r in batch],
                        batch[0].params,
                        [r.params.seed for r in batch],
                        [r.params.max_new_tokens for r in batch],
                        deliver,
                    )
                except Exception as e:  # noqa: BLE001 - surfaced to every waiting caller
                    self._fail([r for r in batch if not r.future.done()], PolicyError(f"`hf` generation failed: {type(e).__name__}: {e}"), cause=e)
                    continue

    @staticmethod
    def _fail(reqs: list[_Request], err: Exception, cause: Exception | None = None) -> None:
        if cause is not None:
            err.__cause__ = cause
        for r in reqs:
            if not r.future.cancelled():
                r.future.set_exception(err)

    def _generate_batch(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        seeds: list[int | None],
        budgets: list[int],
        deliver: Callable[[int, Generation], None],
    ) -> None:
        """One `generate` call; `deliver(i, generation)` runs as soon as row `i` has finished
        (while longer rows go on), so its episode can continue with the environment."""
        import torch
        from transformers import (
            GenerationConfig,
            LogitsProcessor,
            LogitsProcessorList,
            StoppingCriteria,
            StoppingCriteriaList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        n = len(prompts)
        width = max(len(p) for p in prompts)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        scanners = [StopScanner(self._tokenizer, params.stop, self.eos_ids) for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        ends: list[StopMatch | None] = [None] * n
        last_scores: list[torch.Tensor] = []
        delivered = [False] * n
        self.stats["batches"] += 1  # counted when it starts: rows are delivered before it ends
        self.stats["rows"] += n
        tokenizer = self._tokenizer

        def finish(i: int, end: StopMatch) -> None:
            toks = scanners[i].tokens[: end.length]
            delivered[i] = True
            self.stats["tokens"] += len(toks)
            deliver(
                i,
                Generation(
                    token_ids=toks,
                    logprobs=logprobs[i][: end.length],
                    text=tokenizer.decode(toks[:-1] if end.reason == "eos" else toks, skip_special_tokens=False),
                    finish_reason=end.reason,
                    stop_string=end.stop_string,
                ),
            )

        class KeepScores(LogitsProcessor):
            """Last in the processor list: sees the distribution the next token is drawn from."""

            def __call__(self, input_ids, scores):
                last_scores[:] = [scores]
                return scores

        class RecordAndStop(StoppingCriteria):
            """Runs after each sampled token: records its log-prob and checks the stops."""

            def __call__(self, input_ids, scores, **kwargs):
                logp = torch.log_softmax(last_scores[0].float(), dim=-1)
                new = input_ids[:, -1]
                chosen = logp.gather(1, new[:, None])[:, 0].tolist()
                new = new.tolist()
                done = []
                for i in range(n):
                    if ends[i] is None:
                        logprobs[i].append(chosen[i])
                        ends[i] = scanners[i].push(new[i])
                        if ends[i] is None and len(logprobs[i]) >= budgets[i]:
                            ends[i] = StopMatch(budgets[i], "length")
                        if ends[i] is not None:
                            finish(i, ends[i])
                    done.append(ends[i] is not None)
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        sample = params.temperature > 0
        # The warpers are ours, in transformers' order (temperature, top-k, top-p), followed by
        # `KeepScores`: `generate` would append its own warpers after any custom processor.
        processors: list[Any] = []
        if sample:
            if params.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                processors.append(TopKLogitsWarper(top_k=params.top_k))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p=params.top_p))
        processors.append(KeepScores())
        config = GenerationConfig(
            max_new_tokens=max(budgets),
            do_sample=sample,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            min_p=None,
            typical_p=1.0,
            repetition_penalty=1.0,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
            num_beams=1,
        )
        known = [s for s in seeds if s is not None]
        if self.model.training:
            self.model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if known:
                digest = hashlib.sha256(repr(sorted(known)).encode()).digest()
                torch.manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
            self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                generation_config=config,
                logits_processor=LogitsProcessorList(processors),
                stopping_criteria=StoppingCriteriaList([RecordAndStop()]),
            )
        for i in range(n):
            if not delivered[i]:
                finish(i, ends[i] or StopMatch(len(scanners[i].tokens), "length"))
