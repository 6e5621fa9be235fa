"""The `openai` backend's client side: token-in/token-out parsing, retries, quick failure.

The HTTP endpoint here is a scripted stand-in that answers with vLLM-shaped JSON, so each
retry path can be forced; the real servers are exercised in `tests/test_eval_server.py`
(`transformers serve`) and `tests/policy/test_vllm_server.py` (vLLM, marked `vllm`).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from spo_agents.errors import PolicyError
from spo_agents.models import tiny_model_dir
from spo_agents.policy import make_policy
from spo_agents.policy.base import SamplingParams


class Script:
    """What the stand-in answers, one entry per request: (status, body dict) or ("sleep", s)."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.requests: list[dict] = []


def _serve(script: Script):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            script.requests.append(body)
            status, payload = script.replies.pop(0) if len(script.replies) > 1 else script.replies[0]
            if status == "sleep":
                time.sleep(payload)
                status, payload = 200, {}
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _completion(token_ids, logprobs, finish="stop", stop_reason=None):
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 0,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "text": "",
                "finish_reason": finish,
                "stop_reason": stop_reason,
                "token_ids": token_ids,
                "logprobs": {"tokens": [f"token_id:{t}" for t in token_ids], "token_logprobs": logprobs, "top_logprobs": None, "text_offset": []},
            }
        ],
    }


@pytest.fixture
def server_with():
    servers = []

    def start(replies):
        script = Script(replies)
        server = _serve(script)
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1", script

    yield start
    for s in servers:
        s.shutdown()


_TOKENIZER = []


def _tokenizer():
    if not _TOKENIZER:
        from transformers import AutoTokenizer

        _TOKENIZER.append(AutoTokenizer.from_pretrained(tiny_model_dir()))
    return _TOKENIZER[0]


def _policy(url, **kw):
    return make_policy("openai", "tiny-random", base_url=url, backoff_s=0.01, tokenizer=_tokenizer(), **kw)


async def test_token_mode_returns_the_servers_tokens_and_logprobs(server_with):
    url, script = server_with([(200, _completion([5], [-0.1])), (200, _completion([11, 12, 13], [-0.5, -1.0, -0.25], stop_reason="</code>"))])
    policy = _policy(url)
    g = await policy.generate([1, 2, 3], SamplingParams(max_new_tokens=8, stop=["</code>"], top_k=20))
    assert policy.supports_token_io and policy.mode == "tokens"
    assert g.token_ids == [11, 12, 13] and g.logprobs == [-0.5, -1.0, -0.25]
    assert g.finish_reason == "stop" and g.stop_string == "</code>"
    sent = script.requests[-1]
    assert sent["prompt"] == [1, 2, 3] and sent["return_token_ids"] is True and sent["top_k"] == 20
    await policy.close()


@pytest.mark.parametrize("finish", ["abort", "error"])
async def test_an_aborted_generation_is_an_error_not_an_end_of_turn(server_with, finish):
    url, _ = server_with([(200, _completion([11, 12], [-0.5, -1.0], finish=finish))])
    policy = _policy(url, mode="tokens")
    with pytest.raises(PolicyError, match=f"finish_reason `{finish}`"):
        await policy.generate([1, 2, 3], SamplingParams(max_new_tokens=8))
    await policy.close()


async def test_a_reply_without_token_ids_or_logprobs_is_an_error(server_with):
    no_ids = _completion([11], [-0.5])
    del no_ids["choices"][0]["token_ids"]
    url, _ = server_with([(200, no_ids)])
    policy = _policy(url, mode="tokens")
    with pytest.raises(PolicyError, match="evaluation only"):
        await policy.generate([1, 2, 3], SamplingParams(max_new_tokens=8))
    await policy.close()
    url, _ = server_with([(200, _completion([11, 12], [-0.5, None]))])
    policy = _policy(url, mode="tokens")
    with pytest.raises(PolicyError, match="one log-prob per"):
        await policy.generate([1, 2, 3], SamplingParams(max_new_tokens=8))
    await policy.close()


async def test_retries_on_429_and_5xx_then_succeeds(server_with):
    ok = _completion([7, 8], [-0.2, -0.3], finish="length")
    url, script = server_with([(429, {"error": "slow down"}), (503, {"error": "busy"}), (500, {"error": "oops"}), (200, ok)])
    policy = _policy(url, mode="tokens")
    g = await policy.generate([1], SamplingParams(max_new_tokens=2))
    assert g.token_ids == [7, 8] and g.finish_reason == "length"
    assert len(script.requests) == 4
    await policy.close()


async def test_gives_up_after_max_retries(server_with):
    url, script = server_with([(503, {"error": "down"})])
    policy = _policy(url, mode="tokens", max_retries=2)
    with pytest.raises(PolicyError, match="503"):
        await policy.generate([1], SamplingParams(max_new_tokens=2))
    assert len(script.requests) == 3
    await policy.close()


async def test_timeouts_are_retried(server_with):
    url, script = server_with([("sleep", 2.0), (200, _completion([9], [-0.1]))])
    policy = _policy(url, mode="tokens", request_timeout_s=0.5)
    g = await policy.generate([1], SamplingParams(max_new_tokens=1))
    assert g.token_ids == [9] and len(script.requests) == 2
    await policy.close()


async def test_unreachable_endpoint_fails_fast_with_a_clear_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    policy = _policy(f"http://127.0.0.1:{port}/v1")
    start = time.monotonic()
    with pytest.raises(PolicyError, match="cannot reach"):
        await policy.generate([1, 2], SamplingParams(max_new_tokens=2))
    assert time.monotonic() - start < 5
    await policy.close()


async def test_text_only_server_falls_back_to_eval_only_mode(server_with):
    text = {"id": "c", "object": "text_completion", "created": 0, "model": "m", "choices": [{"index": 0, "text": "hello world!", "finish_reason": "stop"}]}
    url, script = server_with([(400, {"detail": "prompt must be a string."}), (200, text)])
    policy = _policy(url)
    g = await policy.generate([1, 2], SamplingParams(max_new_tokens=16, stop=["!"]))
    assert policy.mode == "text" and not policy.supports_token_io
    assert g.info["token_io"] is False and g.finish_reason == "stop"
    assert policy.tokenizer.decode(g.token_ids).endswith("!")
    assert isinstance(script.requests[-1]["prompt"], str)
    await policy.close()


def test_api_key_comes_from_the_named_environment_variable(monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-test-123")
    p = make_policy("openai", "m", base_url="http://127.0.0.1:9/v1", tokenizer=_tokenizer(), api_key_env="MY_KEY")
    assert p._client.api_key == "sk-test-123"
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    q = make_policy("openai", "m", base_url="http://127.0.0.1:9/v1", tokenizer=_tokenizer())
    assert q._client.api_key == "EMPTY"


async def test_a_generation_carries_the_version_it_was_sent_under_and_pause_drains(monkeypatch):
    """A weight push between request and response must not relabel the generation."""
    import asyncio

    from spo_agents.policy.base import Generation, SamplingParams
    from spo_agents.policy.openai import OpenAIPolicy

    policy = OpenAIPolicy("http://127.0.0.1:9/v1", "m", tokenizer=_tokenizer(), mode="tokens")
    release = asyncio.Event()

    async def slow(prompt_ids, params):
        await release.wait()
        return Generation(token_ids=[1], logprobs=[0.0], text="x", finish_reason="length")

    monkeypatch.setattr(policy, "_generate_tokens", slow)
    first = asyncio.create_task(policy.generate([1, 2], SamplingParams()))
    await asyncio.sleep(0.01)
    pausing = asyncio.create_task(policy.pause())
    await asyncio.sleep(0.01)
    assert not pausing.done()  # a request is still in flight under version 0
    held = asyncio.create_task(policy.generate([1, 2], SamplingParams()))
    release.set()
    await pausing
    assert (await first).policy_version == 0
    assert not held.done()  # new requests wait while paused
    policy.version = 1
    policy.resume()
    assert (await held).policy_version == 1
    await policy.close()


async def test_a_wrong_model_name_is_an_error_that_lists_the_served_models(server_with, monkeypatch):
    from types import SimpleNamespace

    from spo_agents.errors import PolicyError

    url, _ = server_with([(404, {"error": {"message": "The model `m` does not exist."}})])
    policy = _policy(url)

    async def models_list():
        return SimpleNamespace(data=[SimpleNamespace(id="served-model")])

    monkeypatch.setattr(policy._client.models, "list", models_list)
    with pytest.raises(PolicyError, match="does not serve a model named `tiny-random`.*`served-model`"):
        await policy.generate([1, 2], SamplingParams(max_new_tokens=4))
    await policy.close()
