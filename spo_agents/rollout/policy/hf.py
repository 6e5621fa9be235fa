"""`hf`: transformers in-process, the CPU default and the backend of the tests.

This module holds `HFPolicy`: requests, policy versions, pause and resume, and the one worker
thread that runs torch. The schedulers are `hf_continuous` (the default: requests join and leave
the running batch between decode steps, so a short request never waits for a long one) and
`hf_static` (one `model.generate` call per group of requests with the same sampling settings);
the batch and prefix KV caches are in `hf_kv`, the token draw in `hf_sampling`. Log-probs are
those of the distribution actually sampled from (pi_old). The learner may share the model and
update it in place between `pause()` and `resume(version)`.

Scheduling, log-probs, stops, seeds, prefix reuse and weight sharing in detail: docs/training.md,
section "The in-process `hf` backend".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections import deque
from typing import Any

from spo_agents.errors import ConfigError, PolicyError
from spo_agents.models import takes_logits_to_keep
from spo_agents.rollout.policy.base import Generation, PolicyBackend, SamplingParams, VersionGate
from spo_agents.rollout.policy.hf_continuous import ContinuousScheduler
from spo_agents.rollout.policy.hf_kv import PrefixCache, plain_kv_cache
from spo_agents.rollout.policy.hf_request import Request, reject
from spo_agents.rollout.policy.hf_static import StaticScheduler
from spo_agents.rollout.policy.stopping import eos_token_ids

log = logging.getLogger(__name__)

SCHEDULERS = ("continuous", "static")


class HFPolicy(ContinuousScheduler, StaticScheduler, PolicyBackend):
    """A transformers causal LM served in-process (docs/training.md, "The in-process `hf` backend").

    Args:
        model: a loaded `torch.nn.Module` (shared with the learner), or `None` to load `model_name`.
        tokenizer: the matching tokenizer, or `None` to load it from `model_name`.
        device: where generation runs; defaults to the model's device.
        model_name: a directory or name for `from_pretrained` when `model` is `None`
            (`make_policy` resolves `smollm2-135m` / `tiny-random` first).
        dtype: `float32` (default), `bfloat16` or `float16` when loading.
        batch_wait_s: how long the worker waits for more requests when it is idle (continuous) or
            before each batch (static).
        max_batch_size: the most requests decoded together; more wait for a row to leave.
        torch_threads: sets `torch.set_num_threads` when given.
        scheduler: `continuous` (requests join and leave the running batch between decode steps)
            or `static` (one `model.generate` call per batch); see docs/training.md.
        prefix_cache_tokens: continuous: how many tokens of finished requests' keys and values
            are kept for reuse by prompts that start with the same tokens (0: none).
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
        scheduler: str = "continuous",
        prefix_cache_tokens: int = 8192,
    ) -> None:
        import torch

        super().__init__()  # makes the VersionGate
        self._gate_loop: asyncio.AbstractEventLoop | None = None

        if scheduler not in SCHEDULERS:
            expected = ", ".join(f"`{s}`" for s in SCHEDULERS)
            raise ConfigError(f"unknown `hf` scheduler `{scheduler}`; expected one of {expected}")
        if max_batch_size < 1:
            raise ConfigError(f"`max_batch_size` must be at least 1, got {max_batch_size}")
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
        if scheduler == "continuous":
            unsupported = plain_kv_cache(model)
            if unsupported is not None:
                log.warning("`hf`: this model's KV cache has %s layers; using the static scheduler", unsupported)
                scheduler = "static"
        #: `continuous` or `static` (the one in use: `continuous` falls back for unsupported caches)
        self.scheduler = scheduler
        # the source of the random streams of requests without a seed (continuous)
        self._seeds = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        self._logits_to_keep = takes_logits_to_keep(self.model)
        self._prefixes = PrefixCache(prefix_cache_tokens)
        self._epoch = 0  # +1 at each `pause`: cached keys and values from before are not reused
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._allowed = threading.Event()
        self._allowed.set()
        self._busy = threading.Lock()
        self._closed = False
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()
        #: counters for benchmarks and logs: `batches` (static: `generate` calls; continuous:
        #: prefill passes), `rows` (requests started), `tokens` (generated tokens handed back);
        #: continuous only: `steps` (decode steps), `prefill_tokens` (prompt tokens computed),
        #: `reused_tokens` (prompt tokens taken from the prefix cache), `prefill_s` / `decode_s`
        #: (seconds in prefill passes / decode steps)
        self.stats: dict[str, float] = {"batches": 0, "rows": 0, "tokens": 0, "steps": 0}
        self.stats.update(prefill_tokens=0, reused_tokens=0, prefill_s=0.0, decode_s=0.0)

    # --- protocol -----------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        if self._closed:
            raise PolicyError("this `HFPolicy` is closed; create a new one")
        if not prompt_ids:
            raise PolicyError("`prompt_ids` is empty; a generation needs at least one prompt token")
        if params.max_new_tokens < 1:
            raise PolicyError(f"`max_new_tokens` must be at least 1, got {params.max_new_tokens}")
        self._ensure_worker()
        async with self._current_gate().request() as version:
            if self._closed:  # closed while this request waited at the gate
                raise PolicyError("this `HFPolicy` was closed while the request waited for `resume`")
            fut: concurrent.futures.Future = concurrent.futures.Future()
            self._queue.put(Request(list(prompt_ids), params, fut, version))
            return await asyncio.wrap_future(fut)

    @property
    def version(self) -> int:
        """The weight version new requests are stamped with (the learner step)."""
        return self._gate.version

    @version.setter
    def version(self, value: int) -> None:
        self._gate.version = value

    def _current_gate(self) -> VersionGate:
        """The gate, made anew (same version) when an idle, open one was last used under another
        event loop: its events belong to that loop."""
        loop = asyncio.get_running_loop()
        if loop is not self._gate_loop and self._gate.in_flight == 0 and not self._gate.paused:
            self._gate, self._gate_loop = VersionGate(self._gate.version), loop
        return self._gate

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
        self._gate.resume()  # requests held by a pause fail instead of waiting for ever
        self._queue.put(None)
        if self._worker is not None:
            await asyncio.to_thread(self._worker.join, 30)

    # --- weight updates -----------------------------------------------------------------------
    async def pause(self) -> None:
        """Hold new requests and return once every request in flight has finished and the
        worker is idle (a drain: no generation spans two weight versions). Cached keys and
        values from before are not reused after it."""
        await self._current_gate().pause()
        self._allowed.clear()
        self._epoch += 1
        await asyncio.to_thread(self._wait_idle)

    def _wait_idle(self) -> None:
        with self._busy:
            pass

    def resume(self, version: int | None = None) -> None:
        """Set the weight version (when given) and let requests run again."""
        self._allowed.set()
        self._gate.resume(version)

    @property
    def paused(self) -> bool:
        return self._gate.paused

    # --- worker -------------------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        with self._worker_lock:
            if self._worker is None or not self._worker.is_alive():
                target = self._loop_continuous if self.scheduler == "continuous" else self._loop_static
                self._worker = threading.Thread(target=target, name="hf-policy", daemon=True)
                self._worker.start()

    @staticmethod
    def _fail(reqs: list[Request], err: Exception, cause: Exception | None = None) -> None:
        if cause is not None:
            err.__cause__ = cause
        for r in reqs:
            reject(r.future, err)

    def _collect(self, pending: deque[Request], block: bool) -> bool:
        """Move queued requests to `pending`. With `block`, wait for one, then `batch_wait_s` for
        more. Returns False once `close` was called."""
        if block:
            item = self._queue.get()
            if item is None:
                return False
            pending.append(item)
            deadline = time.monotonic() + self.batch_wait_s
            while (timeout := deadline - time.monotonic()) > 0:
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    break
                if item is None:
                    return False
                pending.append(item)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return True
            if item is None:
                return False
            pending.append(item)

    # --- continuous scheduler -----------------------------------------------------------------
