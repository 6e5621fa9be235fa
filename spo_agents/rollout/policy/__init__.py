"""Policy backends (one protocol, `spo_agents.rollout.policy.base.PolicyBackend`).

- `hf`: transformers in-process with batched `generate`; the CPU default and the test backend.
- `openai`: any OpenAI-compatible server; token-in/token-out against vLLM's server, text-only
  (evaluation only) against servers that cannot return sampled tokens. A list of `base_url`s
  gives `MultiServerPolicy` (`spo_agents.rollout.policy.multi`): one policy over several servers.
- `vllm`: vLLM's engine in-process, on a GPU.

Backends are imported only when built, so importing this package loads neither torch nor vLLM.
"""

from __future__ import annotations

from typing import Any

from spo_agents.errors import ConfigError, did_you_mean
from spo_agents.rollout.policy.base import Generation, PolicyBackend, SamplingParams

BACKENDS = ("hf", "openai", "vllm")

__all__ = ["BACKENDS", "Generation", "PolicyBackend", "SamplingParams", "make_policy"]


def make_policy(backend: str, model: str, **kw: Any) -> PolicyBackend:
    """Build a policy backend.

    `model` goes through `spo_agents.models.resolve_model` (`smollm2-135m`, `tiny-random` or a
    path). Keyword arguments are the backend's: `HFPolicy(device=, dtype=, batch_wait_s=, ...)`,
    `OpenAIPolicy(base_url=, tokenizer=, api_key_env=, mode=, ...)` (a list of
    `base_url`s: `MultiServerPolicy`), `VLLMPolicy(dtype=, ...)`.
    For `openai`, `model` is the name the server knows; pass `tokenizer=` when that name is not a
    loadable directory (for `smollm2-135m` / `tiny-random` the local copy is used).
    """
    from spo_agents.models import EMBEDDED, TINY, resolve_model

    if backend == "hf":
        from spo_agents.rollout.policy.hf import HFPolicy

        return HFPolicy(model_name=resolve_model(model), **kw)
    if backend == "openai":
        from spo_agents.rollout.policy.openai import OpenAIPolicy

        if "base_url" not in kw or not kw["base_url"]:
            raise ConfigError("the `openai` backend needs `base_url`, e.g. `--base-url http://127.0.0.1:8000/v1`")
        if kw.get("tokenizer") is None and model in (EMBEDDED, TINY):
            kw["tokenizer"] = resolve_model(model)
        urls = kw.pop("base_url")
        if isinstance(urls, (list, tuple)) and len(urls) > 1:
            from spo_agents.rollout.policy.multi import MultiServerPolicy

            return MultiServerPolicy(list(urls), model, **kw)
        return OpenAIPolicy(base_url=urls[0] if isinstance(urls, (list, tuple)) else urls, model=model, **kw)
    if backend == "vllm":
        from spo_agents.rollout.policy.vllm import VLLMPolicy

        return VLLMPolicy(resolve_model(model), **kw)
    raise ConfigError(
        f"unknown policy backend `{backend}`; expected one of {', '.join(f'`{b}`' for b in BACKENDS)}."
        f"{did_you_mean(backend, BACKENDS)}"
    )
