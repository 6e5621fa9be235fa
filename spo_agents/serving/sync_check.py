"""Is the server serving the learner's weights? Its teacher-forced log-probs against the learner's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from spo_agents.errors import PolicyError
from spo_agents.serving.vllm_server import endpoint_of


def server_logprobs(server: Any, token_ids: Sequence[int], *, model: str | None = None) -> list[float]:
    """Teacher-forced log-probs under the served weights: entry i is log p(token_ids[i + 1] |
    token_ids[: i + 1]) (vLLM's `prompt_logprobs`; temperature 1, no truncation)."""
    endpoint = endpoint_of(server)
    ids = [int(t) for t in token_ids]
    answer = endpoint.post(
        "/v1/completions",
        {
            "model": model or endpoint.model,
            "prompt": ids,
            "max_tokens": 1,
            "temperature": 1.0,
            "prompt_logprobs": 0,
        },
    )
    try:
        entries = answer["choices"][0]["prompt_logprobs"]
        return [float(entries[i][str(ids[i])]["logprob"]) for i in range(1, len(ids))]
    except (KeyError, IndexError, TypeError) as e:
        raise PolicyError(f"the server's answer has no usable `prompt_logprobs`: {str(answer)[:300]}") from e


def learner_logprobs(model: Any, token_ids: Sequence[int]) -> list[float]:
    """The same quantity from the learner's model in fp32 (one forward pass, no gradient)."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([list(token_ids)], device=device)
    with torch.no_grad():
        logp = model(input_ids=ids).logits.float().log_softmax(-1)[0]  # [T, V]
    return logp[:-1].gather(1, ids[0, 1:, None]).squeeze(1).tolist()


def check_sync(
    model: Any, server: Any, token_ids: Sequence[int], *, served_model: str | None = None, atol: float = 1e-3
) -> float:
    """Max |server - learner| log-prob over `token_ids`; raises `PolicyError` above `atol`.
    In fp32 on both sides the difference is ~1e-6; bf16 serving needs `atol` ~0.3."""
    a = server_logprobs(server, token_ids, model=served_model)
    b = learner_logprobs(model, token_ids)
    diff = max((abs(x - y) for x, y in zip(a, b)), default=0.0)
    if not diff <= atol:
        raise PolicyError(
            f"after the weight sync the server's log-probs differ from the learner's by up to {diff:.3g} "
            f"(allowed {atol}); the server does not serve the learner's weights. Check `rollout.weight_sync`, "
            "the server's `--dtype` and that it reads the directory the learner writes."
        )
    return diff
