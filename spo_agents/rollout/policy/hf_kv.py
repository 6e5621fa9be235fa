"""The `hf` continuous scheduler's KV cache: the running batch's left-padded cache (`KVBatch`) and
the prefix cache of what finished requests left (`PrefixCache`), with the helpers that plan
prefill passes around them."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


class KVBatch:
    """The rows being decoded and their KV cache.

    The cache is a `DynamicCache` whose layers hold `[rows, kv_heads, width, head_dim]` keys and
    values, left-padded: row i's real columns are where `mask[i]` is 1, always the rightmost
    ones. Rows join between steps (cache and mask padded on the left to the common width, then
    concatenated on the batch axis) and leave (their rows dropped, then the leading columns no
    remaining row uses are trimmed). Keys are stored after the rotary embedding, so moving a
    row's columns does not change what they encode."""

    def __init__(self) -> None:
        self.rows: list[Any] = []
        self.cache: Any = None
        self.mask: Any = None  # LongTensor [rows, width]

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, rows: list[Any], cache: Any, mask: Any) -> None:
        import torch

        if not self.rows:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            self._trim()
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([pad_left(mine.keys, width, 2), pad_left(theirs.keys, width, 2)], dim=0)
            mine.values = torch.cat([pad_left(mine.values, width, 2), pad_left(theirs.values, width, 2)], dim=0)
        self.mask = torch.cat([pad_left(self.mask, width, 1), pad_left(mask, width, 1)], dim=0)
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


def pad_left(t: Any, width: int, dim: int) -> Any:
    """`t` with zeros prepended along `dim` up to `width`."""
    import torch

    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def plain_kv_cache(model: Any) -> str | None:
    """`None` when `model`'s KV cache is plain per-layer keys and values (what `KVBatch` can
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
class Prefix:
    """Keys and values `[kv_heads, len, head_dim]` per layer (on the model's device) of a token
    sequence the model has read, computed under the weights of `epoch`."""

    tokens: Any  # LongTensor [len], on the CPU
    keys: list[Any]
    values: list[Any]
    epoch: int


class PrefixCache:
    """What finished requests left in the KV cache, reused by later prompts that start with the
    same tokens: the next turn of the same episode (its prompt is the previous prompt, the
    sampled tokens and the environment's reply) or another problem under the same system prompt
    and examples. A prompt reuses the longest common prefix with any entry; the keys of a causal
    model at a position depend only on the tokens up to it, so any leading part of an entry is
    valid. Entries from before the last `pause` (the weights may have changed since) are never
    used. Least recently used entries go first once `max_tokens` are held."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.entries: OrderedDict[int, Prefix] = OrderedDict()
        self._held = 0
        self._next = 0

    def lookup(self, prompt: list[int], epoch: int) -> tuple[Prefix | None, int]:
        """The entry sharing the longest prefix with `prompt` and that length (at most
        `len(prompt) - 1`: the last prompt token is always computed, for its logits)."""
        import torch

        self._drop_stale(epoch)
        ids = torch.tensor(prompt, dtype=torch.long)
        best, best_len = None, 0
        for key, e in self.entries.items():
            n = common_prefix(e.tokens, ids, len(prompt) - 1)
            if n > best_len:
                best, best_len = key, n
        if best is None:
            return None, 0
        self.entries.move_to_end(best)
        return self.entries[best], best_len

    def add(self, entry: Prefix) -> None:
        """Hold `entry`, replacing the entries it extends."""
        self._drop_stale(entry.epoch)
        n = len(entry.tokens)
        if n == 0 or n > self.max_tokens:
            return
        for key in [k for k, e in self.entries.items() if common_prefix(e.tokens, entry.tokens, n) == len(e.tokens)]:
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


def common_prefix(a: Any, b: Any, limit: int) -> int:
    """How many leading tokens the 1-d tensors `a` and `b` share, at most `limit`."""
    m = min(len(a), len(b), limit)
    if m <= 0:
        return 0
    differ = (a[:m] != b[:m]).nonzero()
    return int(differ[0]) if differ.numel() else m


def suffix_groups(lengths: list[int]) -> list[list[int]]:
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


def shared_lead(prompts: list[list[int]], cached: list[int], min_shared: int = 32) -> int | None:
    """The index of a prompt that shares at least `min_shared` more leading tokens with another
    prompt than either has cached (`cached[i]` tokens of prompt i are), or `None`."""
    if len(prompts) < 2:
        return None
    import torch

    first = min(range(len(prompts)), key=lambda i: cached[i])
    lead = torch.tensor(prompts[first], dtype=torch.long)
    for j, p in enumerate(prompts):
        if j != first:
            shared = common_prefix(lead, torch.tensor(p, dtype=torch.long), min(len(p), len(lead)) - 1)
            if shared >= max(cached[first], cached[j]) + min_shared:
                return first
    return None
