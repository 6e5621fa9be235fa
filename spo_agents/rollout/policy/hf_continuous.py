"""The `hf` continuous scheduler (iteration-level scheduling): requests join and leave the running
batch between decode steps (docs/training.md, "The in-process `hf` backend")."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from spo_agents.errors import PolicyError
from spo_agents.rollout.policy.base import Generation
from spo_agents.rollout.policy.hf_kv import KVBatch, Prefix, shared_lead, suffix_groups
from spo_agents.rollout.policy.hf_request import Request, resolve
from spo_agents.rollout.policy.hf_sampling import sample_tokens
from spo_agents.rollout.policy.stopping import StopMatch, StopScanner


@dataclass
class Row:
    """One request being decoded: what it has sampled so far and how much of it the cache holds."""

    request: Request
    scanner: StopScanner
    generator: Any  # torch.Generator: this request's random stream
    version: int  # the weight version its gate handed out
    length: int  # tokens of this row in the batch cache (prompt + sampled tokens fed back so far)
    epoch: int  # `HFPolicy._epoch` at admission: whether its cache may still be reused at the end
    logprobs: list[float] = field(default_factory=list)
    next_token: int = -1  # the last sampled token, fed to the model at the next step

    @property
    def cancelled(self) -> bool:
        return self.request.future.done()


class ContinuousScheduler:
    """The continuous scheduler's worker loop, mixed into `HFPolicy` (its state lives there)."""

    def _loop_continuous(self) -> None:
        pending: deque[Request] = deque()
        batch = KVBatch()
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

    def _iterate(self, pending: deque[Request], batch: KVBatch) -> None:
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

    def _admit(self, batch: KVBatch, reqs: list[Request]) -> None:
        """Prefill `reqs` (reusing cached prefixes; one pass per group of similar lengths), sample
        their first tokens, hand back those already finished and add the others to `batch`.
        When several share a long start nothing cached covers (new problems under one system
        prompt, arriving together), one of them goes first, alone, and the others reuse it."""
        epoch = self._epoch
        plans = [(r, *self._prefixes.lookup(r.prompt_ids, epoch)) for r in reqs]
        lead = shared_lead([r.prompt_ids for r in reqs], [n for _, _, n in plans])
        if lead is not None and self._prefixes.max_tokens > 0:
            self._prefill(batch, [plans[lead]], epoch)
            plans = [(r, *self._prefixes.lookup(r.prompt_ids, epoch)) for i, r in enumerate(reqs) if i != lead]
        for group in suffix_groups([len(r.prompt_ids) - n for r, _, n in plans]):
            self._prefill(batch, [plans[i] for i in group], epoch)

    def _prefill(self, batch: KVBatch, plans: list[tuple[Request, Prefix | None, int]], epoch: int) -> None:
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
            sub = KVBatch()
            sub.rows, sub.cache, sub.mask = rows, cache, mask
            sub.keep(keep)
            try:
                batch.join(sub.rows, sub.cache, sub.mask)
            except Exception as e:  # noqa: BLE001 - the batch cache is in an unknown state: fail all
                self._fail_batch(batch, e, extra=[r.request for r in sub.rows])

    def _reused(self, plans: list[tuple[Request, Prefix | None, int]], past: int) -> list[tuple[Any, Any]]:
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

    def _new_row(self, req: Request, epoch: int) -> Row:
        scanner = StopScanner(self._tokenizer, req.params.stop, self.eos_ids)
        return Row(req, scanner, self._generator(req.params.seed), req.version, len(req.prompt_ids), epoch)

    def _step(self, batch: KVBatch) -> None:
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

    def _fail_batch(self, batch: KVBatch, e: Exception, extra: list[Request] | None = None) -> None:
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
                kwargs["logits_to_keep"] = 1
            return self.model(**kwargs).logits[:, -1, :].float()

    def _generator(self, seed: int | None) -> Any:
        import torch

        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seeds).item())
        return torch.Generator(device=self.device).manual_seed(int(seed))

    def _advance(self, rows: list[Row], logits: Any, cache: Any, mask: Any) -> list[int]:
        """Sample each row's next token from `logits`, record it, hand back the rows that are
        done (keeping what they left in `cache` for later prompts); returns the indices of the
        rows that go on."""
        tokens, logprobs = sample_tokens(logits, [r.request.params for r in rows], [r.generator for r in rows])
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

    def _remember(self, row: Row, cache: Any, mask: Any, i: int) -> None:
        """Cache row `i`'s keys and values: its prompt and every sampled token but the last
        (never fed to the model), with the padding columns left out."""
        import torch

        real = mask[i].bool()
        fed = row.request.prompt_ids + row.scanner.tokens[:-1]
        keys = [layer.keys[i][:, real] for layer in cache.layers]  # boolean indexing copies
        values = [layer.values[i][:, real] for layer in cache.layers]
        if keys and keys[0].shape[1] == len(fed):
            self._prefixes.add(Prefix(torch.tensor(fed, dtype=torch.long), keys, values, row.epoch))

    def _finish(self, row: Row, end: StopMatch) -> None:
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
            info={"policy_version_last": row.version},
        )
        resolve(row.request.future, gen)
