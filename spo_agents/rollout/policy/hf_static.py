"""The `hf` static scheduler: one left-padded `model.generate` call per group of requests with the
same sampling settings (docs/training.md, "The in-process `hf` backend")."""

from __future__ import annotations

import hashlib
import queue
import time
from collections.abc import Callable
from typing import Any

from spo_agents.errors import PolicyError
from spo_agents.rollout.policy.base import Generation, SamplingParams
from spo_agents.rollout.policy.hf_request import Request, params_key, resolve
from spo_agents.rollout.policy.stopping import StopMatch, StopScanner


class StaticScheduler:
    """The static scheduler's worker loop, mixed into `HFPolicy` (its state lives there)."""

    def _loop_static(self) -> None:
        pending: list[Request] = []
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
                key = params_key(pending[0].params)
                batch = [r for r in pending if params_key(r.params) == key][: self.max_batch_size]
                taken = {id(r) for r in batch}
                pending = [r for r in pending if id(r) not in taken]

                def deliver(i: int, gen: Generation, batch: list[Request] = batch) -> None:
                    gen.policy_version = batch[i].version  # what its gate handed out
                    gen.info["policy_version_last"] = batch[i].version
                    resolve(batch[i].future, gen)

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
            # Seeded inside the fork in every case: left unseeded, every call would replay the
            # global generator's same saved state, hence the same draws batch after batch.
            if known:
                digest = hashlib.sha256(repr(sorted(known)).encode()).digest()
                torch.manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
            else:
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self._seeds).item()))
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
