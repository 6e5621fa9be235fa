"""Sampling one token per row for the `hf` continuous scheduler, with its log-prob under the
distribution it was drawn from."""

from __future__ import annotations

from typing import Any

from spo_agents.rollout.policy.base import SamplingParams


def inverse_cdf(probs: Any, u: Any, block: int = 256) -> Any:
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


def sample_tokens(logits: Any, params: list[SamplingParams], generators: list[Any]) -> tuple[list[int], list[float]]:
    """One token per row of `logits` `[rows, vocab]` (fp32) and its log-prob under the
    distribution it was drawn from: logits / temperature, then top-k, then top-p (transformers'
    warpers, in `generate`'s order); greedy rows (`temperature = 0`) take the argmax and report
    the unmodified model's log-prob. Each row draws one uniform number per token from its own
    generator (`inverse_cdf`)."""
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
            chosen = inverse_cdf(logp.exp(), torch.cat(draws).to(logp.device)).tolist()
        else:
            chosen = z.argmax(dim=-1).tolist()
        picked = logp.gather(1, torch.tensor(chosen, device=logp.device)[:, None])[:, 0].tolist()
        for j, i in enumerate(index):
            tokens[i], logprobs[i] = chosen[j], picked[j]
    return tokens, logprobs
