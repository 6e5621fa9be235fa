"""The `openai` backend's client side: token-in/token-out parsing, retries, quick failure.

The HTTP endpoint here is a scripted stand-in that answers with vLLM-shaped JSON, so each
retry path can be forced; the real servers are exercised in `tests/test_eval_server.py`
(`transformers serve`) and `tests/vllm_server/test_openai_backend.py` (vLLM, marked `vllm`).
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
from spo_agents.rollout.policy import make_policy
from spo_agents.rollout.policy.base import SamplingParams


class Script:
    """What the stand-in answers, one entry per POST (the last one repeats):
    - `(status, body)`, or `(status, body, headers)`: a JSON reply;
    - `("sleep", s)`: an empty 200 after `s` seconds;
    - `("raw", status, content_type, bytes)`: any body;
    - `("drop",)`: close the connection without a reply;
    - `("cut", status, body)`: send the headers and half of the body, then close.
    `models`: what `GET /v1/models` lists (None: 404 there). Every GET 404s elsewhere."""

    def __init__(self, replies, models=None):
        self.replies = list(replies)
        self.models = models
        self.requests: list[dict] = []
        self.times: list[float] = []
        self.gets: list[str] = []


def _serve(script: Script, port: int = 0):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def setup(self):
            super().setup()
            server.connections.add(self.connection)

        def _send(self, status, data, content_type="application/json", headers=()):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            return data

        def do_GET(self):
            script.gets.append(self.path)
            if self.path == "/v1/models" and script.models is not None:
                listing = {"object": "list", "data": [{"id": m, "object": "model"} for m in script.models]}
                data = self._send(200, json.dumps(listing).encode())
            else:
                data = self._send(404, b'{"detail": "Not Found"}')
            self.wfile.write(data)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            script.requests.append(body)
            script.times.append(time.monotonic())
            entry = script.replies.pop(0) if len(script.replies) > 1 else script.replies[0]
            try:
                if entry[0] == "drop":
                    self.close_connection = True
                    return
                if entry[0] == "sleep":
                    time.sleep(entry[1])
                    entry = (200, {})
                if entry[0] == "raw":
                    self.wfile.write(self._send(entry[1], entry[3], entry[2]))
                    return
                if entry[0] == "cut":
                    data = self._send(entry[1], json.dumps(entry[2]).encode())
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                status, payload, headers = (entry + ({},))[:3]
                self.wfile.write(self._send(status, json.dumps(payload).encode(), headers=headers.items()))
            except OSError:
                pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.connections = set()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _kill(server) -> None:
    """Stop listening and cut every open connection, as a server process that dies."""
    server.shutdown()
    server.server_close()
    for conn in list(server.connections):
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


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
                "logprobs": {
                    "tokens": [f"token_id:{t}" for t in token_ids],
                    "token_logprobs": logprobs,
                    "top_logprobs": None,
                    "text_offset": [],
                },
            }
        ],
    }


@pytest.fixture
def server_with():
    servers = []

    def start(replies, models=None):
        script = Script(replies, models)
        server = _serve(script)
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1", script

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


_TOKENIZER = []


def _tokenizer():
    if not _TOKENIZER:
        from transformers import AutoTokenizer

        _TOKENIZER.append(AutoTokenizer.from_pretrained(tiny_model_dir()))
    return _TOKENIZER[0]


def _policy(url, **kw):
    return make_policy("openai", "tiny-random", base_url=url, backoff_s=0.01, tokenizer=_tokenizer(), **kw)


async def test_token_mode_returns_the_servers_tokens_and_logprobs(server_with):
    reply = _completion([11, 12, 13], [-0.5, -1.0, -0.25], stop_reason="</code>")
    url, script = server_with([(200, _completion([5], [-0.1])), (200, reply)])
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
    url, script = server_with(
        [(429, {"error": "slow down"}), (503, {"error": "busy"}), (500, {"error": "oops"}), (200, ok)]
    )
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
    choice = {"index": 0, "text": "hello world!", "finish_reason": "stop"}
    text = {"id": "c", "object": "text_completion", "created": 0, "model": "m", "choices": [choice]}
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

    from spo_agents.rollout.policy.base import Generation, SamplingParams
    from spo_agents.rollout.policy.openai import OpenAIPolicy

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
    policy.resume(1)
    assert policy.version == 1
    assert (await held).policy_version == 1
    await policy.close()


async def test_a_wrong_model_name_is_an_error_that_quotes_the_server_and_lists_the_served_models(server_with):
    refusal = {"error": {"message": "The model `tiny-random` does not exist.", "code": 404}}
    url, script = server_with([(404, refusal)], models=["served-model"])
    policy = _policy(url)
    with pytest.raises(PolicyError, match="does not serve a model named `tiny-random`.*does not exist.*`served-model`"):
        await policy.connect()
    assert len(script.requests) == 1  # one probe, no sample
    await policy.close()


async def test_a_refused_model_on_a_text_only_server_keeps_the_servers_message(server_with):
    """`transformers serve` with a wrong `--model`: 400 for token ids, then 400 naming the model."""
    pinned = "Server is pinned to 'served-model'; requested 'tiny-random'."
    replies = [(400, {"detail": "prompt must be a string."}), (400, {"detail": pinned})]
    url, script = server_with(replies, models=["served-model"])
    policy = _policy(url)
    with pytest.raises(PolicyError) as info:
        await policy.connect()
    assert pinned in str(info.value) and "`served-model`" in str(info.value) and "--model" in str(info.value)
    assert len(script.requests) == 2
    await policy.close()


async def test_a_base_url_without_v1_is_diagnosed_as_such(server_with):
    url, script = server_with([(404, {"detail": "Not Found"})], models=["tiny-random"])
    root = url.removesuffix("/v1")
    policy = _policy(root)
    with pytest.raises(PolicyError, match=f"under `/v1`; pass `--base-url {root}/v1`"):
        await policy.connect()
    assert policy.mode == "auto" and "/v1/models" in script.gets
    await policy.close()


@pytest.mark.parametrize(
    "reply",
    [("raw", 200, "text/html", b"<html><body>Welcome</body></html>"), ("raw", 200, "application/json", b"{not json")],
    ids=["html", "bad-json"],
)
async def test_a_reply_that_is_not_json_is_a_clear_error(server_with, reply):
    url, _ = server_with([reply])
    policy = _policy(url)
    with pytest.raises(PolicyError, match="not JSON"):
        await policy.connect()
    await policy.close()
    policy = _policy(url, mode="tokens")
    with pytest.raises(PolicyError, match="not JSON"):
        await policy.generate([1], SamplingParams(max_new_tokens=2))
    await policy.close()


async def test_the_probe_retries_5xx_and_429_for_real(server_with):
    """A transient 500 or 429 on the very first request must not end the run: the probe is sent again."""
    ok = _completion([5], [-0.1])
    replies = [
        (500, {"error": "warming up"}),
        (429, {"error": "slow down"}),
        (200, ok),
        (200, _completion([7], [-0.2])),
    ]
    url, script = server_with(replies)
    policy = _policy(url)
    await policy.connect()
    assert policy.mode == "tokens" and len(script.requests) == 3
    assert policy.stats.retries == {"HTTP 500": 1, "HTTP 429": 1}
    g = await policy.generate([1], SamplingParams(max_new_tokens=1))
    assert g.token_ids == [7]
    await policy.close()


@pytest.mark.parametrize("header", [("Retry-After", "1"), ("retry-after-ms", "1000")])
async def test_retry_after_is_honoured(server_with, header):
    url, script = server_with([(429, {"error": "slow down"}, dict([header])), (200, _completion([9], [-0.1]))])
    policy = _policy(url, mode="tokens")  # backoff_s=0.01: without the header the retry would follow at once
    g = await policy.generate([1], SamplingParams(max_new_tokens=1))
    assert g.token_ids == [9]
    assert script.times[1] - script.times[0] >= 0.95
    await policy.close()


@pytest.mark.parametrize(
    "drop", [("drop",), ("cut", 200, _completion([3, 4], [-0.1, -0.2]))], ids=["before-reply", "mid-body"]
)
async def test_dropped_connections_are_retried(server_with, drop):
    url, script = server_with([drop, drop, (200, _completion([9], [-0.1]))])
    policy = _policy(url, mode="tokens")
    g = await policy.generate([1], SamplingParams(max_new_tokens=1))
    assert g.token_ids == [9] and len(script.requests) == 3
    assert policy.stats.retries == {"dropped connection": 2}
    await policy.close()


async def test_a_restarting_server_is_waited_for_and_a_dead_one_is_given_up_on_in_time():
    import asyncio

    script = Script([(200, _completion([9], [-0.1]))])
    first = _serve(script)
    port = first.server_address[1]
    url = f"http://127.0.0.1:{port}/v1"
    policy = _policy(url, mode="tokens", server_wait_s=10)
    await policy.generate([1], SamplingParams(max_new_tokens=1))  # the server has answered once
    _kill(first)
    restarted = []
    timer = threading.Timer(1.0, lambda: restarted.append(_serve(script, port)))
    timer.start()
    start = time.monotonic()
    g = await asyncio.wait_for(policy.generate([1], SamplingParams(max_new_tokens=1)), 20)
    assert g.token_ids == [9] and time.monotonic() - start >= 0.9
    assert policy.stats.outages == 1 and policy.stats.outage_s >= 0.9
    await policy.close()
    timer.join()
    _kill(restarted[0])

    policy = _policy(url, mode="tokens", server_wait_s=0.5)
    policy.client.seen_up = True  # as if it had answered before it went down
    start = time.monotonic()
    with pytest.raises(PolicyError, match="refused connections for .* longer than the 0.5 s `--server-wait`"):
        await asyncio.wait_for(policy.generate([1], SamplingParams(max_new_tokens=1)), 20)
    assert time.monotonic() - start < 3
    await policy.close()


async def test_a_server_that_accepts_but_never_answers_fails_the_probe_quickly_with_the_reason():
    import asyncio

    with socket.socket() as s:  # listens (the kernel completes connections) but never reads or answers
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
        policy = _policy(url, probe_timeout_s=0.5)
        start = time.monotonic()
        expected = "connected to .*, but no response to the capability probe .* within 0.5 s"
        with pytest.raises(PolicyError, match=expected):
            await asyncio.wait_for(policy.connect(), 10)
        assert time.monotonic() - start < 3
        await policy.close()


def test_retry_after_parsing():
    from types import SimpleNamespace

    from spo_agents.rollout.policy.openai_errors import retry_after as _retry_after

    def r(**h):
        return SimpleNamespace(headers=h)

    assert _retry_after(r(**{"retry-after": "2"}), 60) == 2.0
    assert _retry_after(r(**{"retry-after": "120"}), 60) == 60.0  # capped
    assert _retry_after(r(**{"retry-after-ms": "250"}), 60) == 0.25
    assert _retry_after(r(**{"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}), 60) == 0.0  # a date in the past
    assert _retry_after(r(**{"retry-after": "soon"}), 60) is None
    assert _retry_after(r(), 60) is None
