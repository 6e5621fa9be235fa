"""`hf`: transformers in-process, the CPU default and the backend of the tests.

Scheduling (`scheduler="continuous"`, opt-in; `static`, described below, is the default: with
the continuous scheduler the fast test of the SPO signal's sign (tests/test_signal.py, one-token
turns) does not learn, which is not understood yet, so it is not used for training by default).
Concurrent `generate` calls are queued for a
single worker thread that decodes all running requests together, one token per step, over a
KV cache shared by the batch. Before each step, requests that arrived since the last one are
prefilled (left-padded forward passes, reusing cached prefixes: see below) and their cache rows
join the batch; after each step, every request that has finished (its stop string, end-of-turn
token or its own `max_new_tokens`) is handed back at once and its rows leave the cache. A short
request that arrives while a long one runs therefore waits at most one prefill and one step,
never for the long one to end (iteration-level scheduling, as in Orca and vLLM). Requests may
differ in every sampling setting: temperature, top-k, top-p, stop strings, budget and seed are
per request. The batch cache is left-padded: each row's columns end at the right edge, `mask`
marks its real ones (a row that reused a prefix may have a masked gap after it), positions come
from each row's own length, and columns no row uses any more are trimmed when the longest row
leaves. A request whose caller was cancelled leaves at the next step. Models whose cache is not
plain per-layer keys and values (sliding-window or hybrid layers) fall back to the static
scheduler, with a warning. (transformers' own continuous batching, `init_continuous_batching`,
runs on a CPU and returns the sampled tokens' log-probs, but it has no stop strings, no
per-request seeds, and per-request temperature / top-k / top-p only when the generation config
set them when the manager was created; hence this loop.)

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
Static: one random stream serves a whole `generate` call, seeded from all of its requests'
seeds (in a forked RNG); results repeat only when the same requests are batched the same way.

Prefix reuse (continuous). The keys and values a finished request leaves in the cache (its
prompt and sampled tokens) are kept, up to `prefix_cache_tokens` tokens, least recently used
first out. A new prompt reuses the longest prefix it shares with any of them and computes only
the rest: the next turn of an episode (the previous prompt, the sampled tokens and the
environment's reply) computes just the reply, and a new problem under the same system prompt
and examples computes just its own part. Nothing cached before a `pause` is reused after it.

Sharing weights with the learner. `HFPolicy(model=module, tokenizer=tok)` wraps an existing
`torch.nn.Module`; the learner updates it in place between `await policy.pause()` and
`policy.resume()`, then sets `policy.version`. `pause()` returns once no prefill or decode step
is running and holds the next one; requests in flight stay in the batch and continue after
`resume()`. Such a request then samples its later tokens from the new weights, attending to
keys and values its earlier tokens left in the cache under the old weights: its log-probs
remain those of the distribution it was actually sampled from. `Generation.policy_version` is
the version that sampled its first token, `info["policy_version_last"]` the one that sampled
its last (equal unless an update happened in between). Generation runs under
`torch.no_grad()` in eval mode (no dropout): the module is put in eval mode before each step
(the learner, which trains it in train mode, leaves it in eval mode too).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from spo_agents.errors import ConfigError, PolicyError
from spo_agents.rollout.policy.base import Generation, PolicyBackend, Resumed, SamplingParams
from spo_agents.rollout.policy.stopping import StopMatch, StopScanner, eos_token_ids

log = logging.getLogger(__name__)

SCHEDULERS = ("continuous", "static")


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    future: concurrent.futures.Future


def _params_key(p: SamplingParams) -> tuple:
    """Requests that can share a static `generate` call: `max_new_tokens` may differ (each row
    stops at its own budget), the sampling distribution and stop strings may not."""
    return (p.temperature, p.top_p, p.top_k, tuple(p.stop))


def _resolve(fut: concurrent.futures.Future, gen: Generation) -> None:
    """Hand `gen` to a waiting caller; a caller that was cancelled meanwhile is skipped."""
    try:
        if not fut.done():
            fut.set_result(gen)
    except concurrent.futures.InvalidStateError:  # cancelled between the check and the set
        pass


def _reject(fut: concurrent.futures.Future, err: Exception) -> None:
    try:
        if not fut.done():
            fut.set_exception(err)
    except concurrent.futures.InvalidStateError:
        pass


@dataclass
class _Row:
    """One request being decoded: what it has sampled so far and how much of it the cache holds."""

    request: _Request
    scanner: StopScanner
    generator: Any  # torch.Generator: this request's random stream
    version: int  # policy version of the first token
    length: int  # tokens of this row in the batch cache (prompt + sampled tokens fed back so far)
    epoch: int  # `HFPolicy._epoch` at admission: whether its cache may still be reused at the end
    logprobs: list[float] = field(default_factory=list)
    next_token: int = -1  # the last sampled token, fed to the model at the next step

    @property
    def cancelled(self) -> bool:
        return self.request.future.done()


class _Batch:
    """The rows being decoded and their KV cache.

    The cache is a `DynamicCache` whose layers hold `[rows, kv_heads, width, head_dim]` keys and
    values, left-padded: row i's real columns are where `mask[i]` is 1, always the rightmost
    ones. Rows join between steps (cache and mask padded on the left to the common width, then
    concatenated on the batch axis) and leave (their rows dropped, then the leading columns no
    remaining row uses are trimmed). Keys are stored after the rotary embedding, so moving a
    row's columns does not change what they encode."""

    def __init__(self) -> None:
        self.rows: list[_Row] = []
        self.cache: Any = None
        self.mask: Any = None  # LongTensor [rows, width]

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, rows: list[_Row], cache: Any, mask: Any) -> None:
        import torch

        if not self.rows:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            self._trim()
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)], dim=0)
            mine.values = torch.cat([_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)], dim=0)
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)], dim=0)
        self.rows += rows

    def keep(self, index: list[int]) -> None:
        """Keep only the rows at `index` (in this order)."""
        import torch

        if len(index) == len(self.rows):
            return
        if not index:
            self.rows, self.cache, self.mask = [], None, None
            return
        sel = torch.tensor(index, dtype=torch.long, device=self.mask.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, sel)
            layer.values = layer.values.index_select(0, sel)
        self.mask = self.mask.index_select(0, sel)
        self.rows = [self.rows[i] for i in index]
        self._trim()

    def _trim(self) -> None:
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else 0
        if first > 0:
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]
            self.mask = self.mask[:, first:]


def _pad_left(t: Any, width: int, dim: int) -> Any:
    """`t` with zeros prepended along `dim` up to `width`."""
    import torch

    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _plain_kv_cache(model: Any) -> str | None:
    """`None` when `model`'s KV cache is plain per-layer keys and values (what `_Batch` can
    re-pad and re-slice), else the name of the layer type that is not."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        cache = DynamicCache(config=model.config)
    except Exception as e:  # noqa: BLE001 - any model we cannot inspect goes the static way
        return f"unknown ({type(e).__name__}: {e})"
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            return type(layer).__name__
    return None


@dataclass
class _Prefix:
    """Keys and values `[kv_heads, len, head_dim]` per layer (on the model's device) of a token
    sequence the model has read, computed under the weights of `epoch`."""

    tokens: Any  # LongTensor [len], on the CPU
    keys: list[Any]
    values: list[Any]
    epoch: int


class _PrefixCache:
    """What finished requests left in the KV cache, reused by later prompts that start with the
    same tokens: the next turn of the same episode (its prompt is the previous prompt, the
    sampled tokens and the environment's reply) or another problem under the same system prompt
    and examples. A prompt reuses the longest common prefix with any entry; the keys of a causal
    model at a position depend only on the tokens up to it, so any leading part of an entry is
    valid. Entries from before the last `pause` (the weights may have changed since) are never
    used. Least recently used entries go first once `max_tokens` are held."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.entries: OrderedDict[int, _Prefix] = OrderedDict()
        self._held = 0
        self._next = 0

    def lookup(self, prompt: list[int], epoch: int) -> tuple[_Prefix | None, int]:
        """The entry sharing the longest prefix with `prompt` and that length (at most
        `len(prompt) - 1`: the last prompt token is always computed, for its logits)."""
        import torch

        self._drop_stale(epoch)
        ids = torch.tensor(prompt, dtype=torch.long)
        best, best_len = None, 0
        for key, e in self.entries.items():
            n = _common_prefix(e.tokens, ids, len(prompt) - 1)
            if n > best_len:
                best, best_len = key, n
        if best is None:
            return None, 0
        self.entries.move_to_end(best)
        return self.entries[best], best_len

    def add(self, entry: _Prefix) -> None:
        """Hold `entry`, replacing the entries it extends."""
        self._drop_stale(entry.epoch)
        n = len(entry.tokens)
        if n == 0 or n > self.max_tokens:
            return
        for key in [k for k, e in self.entries.items() if _common_prefix(e.tokens, entry.tokens, n) == len(e.tokens)]:
            self._held -= len(self.entries.pop(key).tokens)
        self.entries[self._next] = entry
        self._next += 1
        self._held += n
        while self._held > self.max_tokens:
            self._held -= len(self.entries.popitem(last=False)[1].tokens)

    def _drop_stale(self, epoch: int) -> None:
        if any(e.epoch != epoch for e in self.entries.values()):
            self.entries = OrderedDict((k, e) for k, e in self.entries.items() if e.epoch == epoch)
            self._held = sum(len(e.tokens) for e in self.entries.values())


def _common_prefix(a: Any, b: Any, limit: int) -> int:
    """How many leading tokens the 1-d tensors `a` and `b` share, at most `limit`."""
    m = min(len(a), len(b), limit)
    if m <= 0:
        return 0
    differ = (a[:m] != b[:m]).nonzero()
    return int(differ[0]) if differ.numel() else m


def _suffix_groups(lengths: list[int]) -> list[list[int]]:
    """Indices of `lengths` (tokens each row still has to prefill) grouped for separate prefill
    passes: a pass pads every row to its longest, so rows of very different lengths (a new
    prompt next to a turn whose prefix was reused) go to different passes."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] <= 1.5 * lengths[groups[-1][0]] + 16:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _shared_lead(prompts: list[list[int]], cached: list[int], min_shared: int = 32) -> int | None:
    """The index of a prompt that shares at least `min_shared` more leading tokens with another
    prompt than either has cached (`cached[i]` tokens of prompt i are), or `None`."""
    if len(prompts) < 2:
        return None
    import torch

    first = min(range(len(prompts)), key=lambda i: cached[i])
    lead = torch.tensor(prompts[first], dtype=torch.long)
    for j, p in enumerate(prompts):
        if j != first:
            shared = _common_prefix(lead, torch.tensor(p, dtype=torch.long), min(len(p), len(lead)) - 1)
            if shared >= max(cached[first], cached[j]) + min_shared:
                return first
    return None


def _inverse_cdf(probs: Any, u: Any, block: int = 256) -> Any:
    """For each row of `probs` `[rows, vocab]`, the first index whose cumulative probability
    exceeds `u * total` (`u` `[rows]` in [0, 1)): a draw from `probs`. Sums are in float64, in two
    levels (block sums, then within the chosen block), which keeps a 50k vocabulary at about a
    millisecond per batch on a CPU (`torch.multinomial` takes milliseconds per row). An entry of
    probability 0 (removed by top-k/top-p) adds nothing to the sums and is never chosen."""
    import torch

    rows, vocab = probs.shape
    p = torch.nn.functional.pad(probs, (0, (-vocab) % block)).double().view(rows, -1, block)
    sums = p.sum(dim=-1).cumsum(dim=-1)  # [rows, blocks]
    target = u.double()[:, None] * sums[:, -1:]
    k = torch.searchsorted(sums, target, right=True).clamp(max=sums.shape[1] - 1)  # [rows, 1]
    before = torch.where(k > 0, sums.gather(1, (k - 1).clamp(min=0)), torch.zeros_like(target))
    inner = p[torch.arange(rows, device=p.device), k[:, 0]].cumsum(dim=-1)  # [rows, block]
    rest = torch.minimum(target - before, inner[:, -1:] * (1 - 2**-40))  # within the block's mass
    j = torch.searchsorted(inner, rest, right=True).clamp(max=block - 1)
    return (k * block + j)[:, 0]


def _sample(logits: Any, params: list[SamplingParams], generators: list[Any]) -> tuple[list[int], list[float]]:
    """One token per row of `logits` `[rows, vocab]` (fp32) and its log-prob under the
    distribution it was drawn from: logits / temperature, then top-k, then top-p (transformers'
    warpers, in `generate`'s order); greedy rows (`temperature = 0`) take the argmax and report
    the unmodified model's log-prob. Each row draws one uniform number per token from its own
    generator (`_inverse_cdf`)."""
    import torch
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    groups: dict[tuple[float, int, float], list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
    tokens = [0] * len(params)
    logprobs = [0.0] * len(params)
    for (temperature, top_k, top_p), index in groups.items():
        z = logits[index] if len(index) < len(params) else logits
        sample = temperature > 0
        if sample:
            if temperature != 1.0:
                z = z / temperature
            if top_k > 0:
                z = TopKLogitsWarper(top_k=top_k)(None, z)
            if top_p < 1.0:
                z = TopPLogitsWarper(top_p=top_p)(None, z)
        logp = torch.log_softmax(z, dim=-1)
        if sample:
            gens = [generators[i] for i in index]
            draws = [torch.rand(1, generator=g, dtype=torch.float64, device=g.device) for g in gens]
            chosen = _inverse_cdf(logp.exp(), torch.cat(draws).to(logp.device)).tolist()
        else:
            chosen = z.argmax(dim=-1).tolist()
        picked = logp.gather(1, torch.tensor(chosen, device=logp.device)[:, None])[:, 0].tolist()
        for j, i in enumerate(index):
            tokens[i], logprobs[i] = chosen[j], picked[j]
    return tokens, logprobs


class HFPolicy(PolicyBackend):
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
        scheduler: str = "static",
        prefix_cache_tokens: int = 8192,
    ) -> None:
        super().__init__()
        import torch

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
            unsupported = _plain_kv_cache(model)
            if unsupported is not None:
                log.warning("`hf`: this model's KV cache has %s layers; using the static scheduler", unsupported)
                scheduler = "static"
        #: `continuous` or `static` (the one in use: `continuous` falls back for unsupported caches)
        self.scheduler = scheduler
        # the source of the random streams of requests without a seed (continuous)
        self._seeds = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        self._logits_to_keep = True
        self._prefixes = _PrefixCache(prefix_cache_tokens)
        self._epoch = 0  # +1 at each `pause`: cached keys and values from before are not reused
        self._queue: queue.Queue[_Request | None] = queue.Queue()
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
        """Hold the next prefill or decode step (static: the next batch); return once none is
        running. Requests in flight keep their place and continue after `resume`."""
        self._allowed.clear()
        self._epoch += 1
        await asyncio.to_thread(self._wait_idle)

    def _wait_idle(self) -> None:
        with self._busy:
            pass

    def resume(self) -> Resumed:
        """Let queued, in-flight and new requests run again (works with or without `await`)."""
        self._allowed.set()
        return Resumed()

    @property
    def paused(self) -> bool:
        return not self._allowed.is_set()

    # --- worker -------------------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        with self._worker_lock:
            if self._worker is None or not self._worker.is_alive():
                target = self._loop_continuous if self.scheduler == "continuous" else self._loop_static
                self._worker = threading.Thread(target=target, name="hf-policy", daemon=True)
                self._worker.start()

    @staticmethod
    def _fail(reqs: list[_Request], err: Exception, cause: Exception | None = None) -> None:
        if cause is not None:
            err.__cause__ = cause
        for r in reqs:
            _reject(r.future, err)

    def _collect(self, pending: deque[_Request], block: bool) -> bool:
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
    def _loop_continuous(self) -> None:
        pending: deque[_Request] = deque()
        batch = _Batch()
        while True:
            if not self._collect(pending, block=not pending and not batch):
                closed = PolicyError("the policy was closed while this request was pending or running")
                self._fail([*pending, *(r.request for r in batch.rows)], closed)
                return
            self._allowed.wait()
            with self._busy:
                if not self._allowed.is_set():
                    continue  # paused between the wait and taking the lock
                try:
                    self._iterate(pending, batch)
                except Exception as e:  # noqa: BLE001 - never leave a caller waiting on a dead worker
                    self._fail_batch(batch, e, extra=list(pending))
                    pending.clear()

    def _iterate(self, pending: deque[_Request], batch: _Batch) -> None:
        """Admit what is pending (as far as `max_batch_size` allows), then one decode step."""
        if self.model.training:
            self.model.eval()
        for r in [r for r in pending if r.future.done()]:  # cancelled while queued
            pending.remove(r)
        room = self.max_batch_size - len(batch)
        if pending and room > 0:
            self._admit(batch, [pending.popleft() for _ in range(min(room, len(pending)))])
        if batch:
            self._step(batch)

    def _admit(self, batch: _Batch, reqs: list[_Request]) -> None:
        """Prefill `reqs` (reusing cached prefixes; one pass per group of similar lengths), sample
        their first tokens, hand back those already finished and add the others to `batch`.
        When several share a long start nothing cached covers (new problems under one system
        prompt, arriving together), one of them goes first, alone, and the others reuse it."""
        epoch = self._epoch
        plans = [(r, *self._prefixes.lookup(r.prompt_ids, epoch)) for r in reqs]
        lead = _shared_lead([r.prompt_ids for r in reqs], [n for _, _, n in plans])
        if lead is not None and self._prefixes.max_tokens > 0:
            self._prefill(batch, [plans[lead]], epoch)
            plans = [(r, *self._prefixes.lookup(r.prompt_ids, epoch)) for i, r in enumerate(reqs) if i != lead]
        for group in _suffix_groups([len(r.prompt_ids) - n for r, _, n in plans]):
            self._prefill(batch, [plans[i] for i in group], epoch)

    def _prefill(self, batch: _Batch, plans: list[tuple[_Request, _Prefix | None, int]], epoch: int) -> None:
        """One forward pass over the prompts' uncached tokens. Each row's cache is
        `[pad][reused prefix][pad][rest of its prompt]`: the reused keys and values are aligned
        to the right of the first `past` columns, the rest of the prompt to the right of the
        pass; the pads are masked out (and trimmed from the left once the batch allows)."""
        import torch
        from transformers import DynamicCache

        reqs = [r for r, _, _ in plans]
        start = time.perf_counter()
        try:
            n, device = len(plans), self.device
            past = max(k for _, _, k in plans)
            width = max(len(r.prompt_ids) - k for r, _, k in plans)
            ids = torch.full((n, width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((n, past + width), dtype=torch.long)
            position_ids = torch.zeros((n, width), dtype=torch.long)
            for i, (r, _, k) in enumerate(plans):
                rest = r.prompt_ids[k:]
                ids[i, width - len(rest) :] = torch.tensor(rest, dtype=torch.long)
                position_ids[i, width - len(rest) :] = torch.arange(k, len(r.prompt_ids))
                mask[i, past - k : past] = 1
                mask[i, past + width - len(rest) :] = 1
            ids, mask, position_ids = ids.to(device), mask.to(device), position_ids.to(device)
            cache = DynamicCache(config=self.model.config)
            if past:
                cache = DynamicCache(ddp_cache_data=self._reused(plans, past), config=self.model.config)
            logits = self._forward(ids, mask, position_ids, cache)
            self.stats["batches"] += 1
            self.stats["rows"] += n
            self.stats["prefill_tokens"] += sum(len(r.prompt_ids) - k for r, _, k in plans)
            self.stats["reused_tokens"] += sum(k for _, _, k in plans)
            rows = [self._new_row(r, epoch) for r in reqs]
            keep = self._advance(rows, logits, cache, mask)
            if epoch == self._epoch and self._prefixes.max_tokens > 0:
                for i in keep:  # a prompt is reusable at once (finished rows were kept by `_advance`)
                    self._remember(rows[i], cache, mask, i)
        except Exception as e:  # noqa: BLE001 - surfaced to the callers of these requests
            self._fail(reqs, PolicyError(f"`hf` generation failed: {type(e).__name__}: {e}"), cause=e)
            return
        finally:
            self.stats["prefill_s"] += time.perf_counter() - start
        if keep:
            sub = _Batch()
            sub.rows, sub.cache, sub.mask = rows, cache, mask
            sub.keep(keep)
            try:
                batch.join(sub.rows, sub.cache, sub.mask)
            except Exception as e:  # noqa: BLE001 - the batch cache is in an unknown state: fail all
                self._fail_batch(batch, e, extra=[r.request for r in sub.rows])

    def _reused(self, plans: list[tuple[_Request, _Prefix | None, int]], past: int) -> list[tuple[Any, Any]]:
        """Per layer, the rows' reused keys and values `[rows, kv_heads, past, head_dim]`, each
        right-aligned (zeros where a row reuses less)."""

        ref = next(e for _, e, _ in plans if e is not None)
        out = []
        for layer in range(len(ref.keys)):
            k0 = ref.keys[layer]
            shape = (len(plans), k0.shape[0], past, k0.shape[2])
            keys, values = k0.new_zeros(shape), k0.new_zeros(shape)
            for i, (_, e, k) in enumerate(plans):
                if k:
                    keys[i, :, past - k :] = e.keys[layer][:, :k]
                    values[i, :, past - k :] = e.values[layer][:, :k]
            out.append((keys.to(self.device), values.to(self.device)))
        return out

    def _new_row(self, req: _Request, epoch: int) -> _Row:
        scanner = StopScanner(self._tokenizer, req.params.stop, self.eos_ids)
        return _Row(req, scanner, self._generator(req.params.seed), self.version, len(req.prompt_ids), epoch)

    def _step(self, batch: _Batch) -> None:
        """One decode step of every row: feed its last token, sample the next."""
        import torch

        start = time.perf_counter()
        try:
            live = [i for i, r in enumerate(batch.rows) if not r.cancelled]
            batch.keep(live)
            if not batch:
                return
            device = self.device
            ids = torch.tensor([[r.next_token] for r in batch.rows], dtype=torch.long, device=device)
            position_ids = torch.tensor([[r.length] for r in batch.rows], dtype=torch.long, device=device)
            mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch), 1))], dim=1)
            logits = self._forward(ids, mask, position_ids, batch.cache)
            batch.mask = mask
            for r in batch.rows:
                r.length += 1
            self.stats["steps"] += 1
            keep = self._advance(batch.rows, logits, batch.cache, batch.mask)
            batch.keep(keep)
        except Exception as e:  # noqa: BLE001 - surfaced to every caller in the batch
            self._fail_batch(batch, e)
        finally:
            self.stats["decode_s"] += time.perf_counter() - start

    def _fail_batch(self, batch: _Batch, e: Exception, extra: list[_Request] | None = None) -> None:
        """Fail every request of `batch` (and `extra`) with `e` and empty the batch."""
        reqs = [*(r.request for r in batch.rows), *(extra or [])]
        batch.keep([])
        self._fail(reqs, PolicyError(f"`hf` generation failed: {type(e).__name__}: {e}"), cause=e)

    def _forward(self, ids: Any, mask: Any, position_ids: Any, cache: Any) -> Any:
        """Logits `[rows, vocab]` (fp32) of the last position; `cache` grows by `ids`' width."""
        import torch

        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}
        kwargs.update(cache=cache, use_cache=True)
        with torch.no_grad():
            if self._logits_to_keep:
                try:
                    return self.model(**kwargs, logits_to_keep=1).logits[:, -1, :].float()
                except TypeError:  # a model without `logits_to_keep`
                    self._logits_to_keep = False
            return self.model(**kwargs).logits[:, -1, :].float()

    def _generator(self, seed: int | None) -> Any:
        import torch

        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seeds).item())
        return torch.Generator(device=self.device).manual_seed(int(seed))

    def _advance(self, rows: list[_Row], logits: Any, cache: Any, mask: Any) -> list[int]:
        """Sample each row's next token from `logits`, record it, hand back the rows that are
        done (keeping what they left in `cache` for later prompts); returns the indices of the
        rows that go on."""
        tokens, logprobs = _sample(logits, [r.request.params for r in rows], [r.generator for r in rows])
        keep = []
        for i, (r, tok, lp) in enumerate(zip(rows, tokens, logprobs)):
            r.logprobs.append(lp)
            r.next_token = tok
            end = r.scanner.push(tok)
            if end is None and len(r.logprobs) >= r.request.params.max_new_tokens:
                end = StopMatch(len(r.logprobs), "length")
            if end is None:
                keep.append(i)
                continue
            self._finish(r, end)
            if r.epoch == self._epoch and self._prefixes.max_tokens > 0:
                self._remember(r, cache, mask, i)
        return keep

    def _remember(self, row: _Row, cache: Any, mask: Any, i: int) -> None:
        """Cache row `i`'s keys and values: its prompt and every sampled token but the last
        (never fed to the model), with the padding columns left out."""
        import torch

        real = mask[i].bool()
        fed = row.request.prompt_ids + row.scanner.tokens[:-1]
        keys = [layer.keys[i][:, real] for layer in cache.layers]  # boolean indexing copies
        values = [layer.values[i][:, real] for layer in cache.layers]
        if keys and keys[0].shape[1] == len(fed):
            self._prefixes.add(_Prefix(torch.tensor(fed, dtype=torch.long), keys, values, row.epoch))

    def _finish(self, row: _Row, end: StopMatch) -> None:
        toks = row.scanner.tokens[: end.length]
        self.stats["tokens"] += len(toks)
        text = self._tokenizer.decode(toks[:-1] if end.reason == "eos" else toks, skip_special_tokens=False)
        gen = Generation(
            token_ids=toks,
            logprobs=row.logprobs[: end.length],
            text=text,
            finish_reason=end.reason,
            stop_string=end.stop_string,
            policy_version=row.version,
            info={"policy_version_last": self.version},
        )
        _resolve(row.request.future, gen)

    # --- static scheduler ---------------------------------------------------------------------
    def _loop_static(self) -> None:
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
                    gen.info["policy_version_last"] = version
                    _resolve(batch[i].future, gen)

                try:
                    self._generate_static(
                        [r.prompt_ids for r in batch],
                        batch[0].params,
                        [r.params.seed for r in batch],
                        [r.params.max_new_tokens for r in batch],
                        deliver,
                    )
                except Exception as e:  # noqa: BLE001 - surfaced to every waiting caller
                    err = PolicyError(f"`hf` generation failed: {type(e).__name__}: {e}")
                    self._fail([r for r in batch if not r.future.done()], err, cause=e)
                    continue

    def _generate_static(
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
