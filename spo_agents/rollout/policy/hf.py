"""`hf`: transformers in-process, the CPU default and the backend of the tests.

Modules: this one holds `HFPolicy` (requests, versions, pause and resume); the schedulers are
`hf_continuous` and `hf_static`, the batch and prefix KV caches `hf_kv`, the token draw
`hf_sampling`.

Scheduling (`scheduler="continuous"`, the default; `static` is described below).
Concurrent `generate` calls are queued for a single worker thread that decodes all running
requests together, one token per step, over a KV cache shared by the batch. Before each step,
requests that arrived since the last one are prefilled (left-padded forward passes, reusing
cached prefixes: see below) and their cache rows join the batch; after each step, every request
that has finished (its stop string, end-of-turn token or its own `max_new_tokens`) is handed
back at once and its rows leave the cache. A short request that arrives while a long one runs
therefore waits at most one prefill and one step, never for the long one to end (iteration-level
scheduling, as in Orca and vLLM). Requests may differ in every sampling setting: temperature,
top-k, top-p, stop strings, budget and seed are per request. The batch cache is left-padded:
each row's columns end at the right edge, `mask` marks its real ones (a row that reused a prefix
may have a masked gap after it), positions come from each row's own length, and columns no row
uses any more are trimmed when the longest row leaves. A request whose caller was cancelled
leaves at the next step. Models whose cache is not plain per-layer keys and values
(sliding-window or hybrid layers) fall back to the static scheduler, with a warning.
(transformers' own continuous batching, `init_continuous_batching`, runs on a CPU and returns
the sampled tokens' log-probs, but it has no stop strings, no per-request seeds, and per-request
temperature / top-k / top-p only when the generation config set them when the manager was
created; hence this loop.)

`scheduler="static"`: the worker waits `batch_wait_s` for more requests, groups them by
identical sampling settings (temperature, top-p, top-k, stop strings; `max_new_tokens` may
differ) and runs one left-padded `model.generate` call per group. Each row is handed back when
it finishes, but requests that arrive during a call wait for its longest row before theirs
starts. It is kept for comparison (`bench/hf_batching.py`).

Torch runs in the worker thread only, so the event loop stays free and torch's intra-op thread
pool (`torch_threads`) is not oversubscribed.

Log-probs. `Generation.logprobs` are fp32 log-probs of the distribution actually sampled from:
the model's logits divided by the temperature, then top-k, then top-p (transformers' warpers),
i.e. the behaviour policy pi_old of the PPO ratio (docs/algorithm.md section 3). Training
samples with top-k and top-p off, where this is `log_softmax(logits / temperature)`, the
learner's `token_logprobs`. Tokens removed by top-k/top-p cannot be sampled, so every returned
log-prob is finite. With `temperature = 0` decoding is greedy and the log-probs are those of
the unmodified model (temperature 1).

Stops. A request stops at an end-of-turn token (kept in `token_ids`, left out of `text`,
`finish_reason = "eos"`), at the token that completes a stop string (kept, `"stop"`, see
`spo_agents.rollout.policy.stopping`) or after `max_new_tokens` (`"length"`).

Seeds. Continuous: every request draws one uniform number per token from its own random
stream, seeded from `SamplingParams.seed` when it is set, else from the backend's own stream
(seeded once from torch's global generator when the backend is built; the global generator is
never touched afterwards). A seeded request thus makes the same draws whatever else runs. The
logits the draws are applied to can differ in their last bits (about 1e-6 in log-prob) with how
the request was computed: the batch's shape (other rows, padding) changes the summation order
of the matrix products, and a prompt that reuses cached keys and values is computed in two
passes instead of one. A sampled token changes only when its draw falls that close to a
boundary between two tokens, so a seeded request gives the same tokens in almost every case,
not in every case; it is identical bit for bit when it runs alone with `prefix_cache_tokens=0`.
Static: one random stream serves a whole `generate` call (in a forked RNG), seeded from all of its
requests' seeds, or from the backend's own stream when none has a seed (so unseeded calls draw
afresh each time); results repeat only when the same seeded requests are batched the same way.

Prefix reuse (continuous). The keys and values a finished request leaves in the cache (its
prompt and sampled tokens) are kept, up to `prefix_cache_tokens` tokens, least recently used
first out. A new prompt reuses the longest prefix it shares with any of them and computes only
the rest: the next turn of an episode (the previous prompt, the sampled tokens and the
environment's reply) computes just the reply, and a new problem under the same system prompt
and examples computes just its own part. Nothing cached before a `pause` is reused after it.

Sharing weights with the learner. `HFPolicy(model=module, tokenizer=tok)` wraps an existing
`torch.nn.Module`; the learner updates it in place between `await policy.pause()` and
`policy.resume(version)`. Both go through a `VersionGate` (`spo_agents.rollout.policy.base`):
`pause()` holds new requests and returns once every request in flight has finished (a drain)
and the worker is idle; `resume(version)` sets the version and reopens. Every generation is
sampled under one version and stamped with the one its gate handed out
(`Generation.policy_version`, and `info["policy_version_last"]`, equal). Generation runs under
`torch.no_grad()` in eval mode (no dropout): the module is put in eval mode before each step
(the learner, which trains it in train mode, leaves it in eval mode too).
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
    """A transformers causal LM served in-process (see the module docstring).

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
            or `static` (one `model.generate` call per batch); see the module docstring.
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
