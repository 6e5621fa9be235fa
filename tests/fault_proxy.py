"""A fault-injecting HTTP proxy on loopback, for testing clients of an OpenAI-compatible server.

`FaultProxy(upstream_port, rate=0.3, seed=1).start()` listens on 127.0.0.1 and forwards each
request to `127.0.0.1:upstream_port`, except that each POST request meets a fault instead with
probability `rate`, independently (the n-th POST draws the n-th number of `random.Random(seed)`, so
a seed fixes which POSTs are faulted, whatever the request), with the kinds taken in turn from
`kinds`:

- `500`: an HTTP 500 reply, the request is not forwarded;
- `429`: an HTTP 429 reply with `Retry-After: retry_after`, not forwarded;
- `drop`: the connection is closed without a reply, not forwarded (a server that died on it);
- `cut`: forwarded, then the reply is cut mid-body (headers and half of the body, then close);
- `delay`: forwarded after `delay_s` seconds (slow, not a failure).

`outage_after=n, outage_s=s`: when the n-th POST arrives, the proxy stops listening and cuts every
open connection (that request included), as a server process that dies, and listens again on the
same port `s` seconds later (a restart). GET requests are always forwarded, except
`GET /weight_info` when `weight_label` is set: the proxy answers it with
`{"weight_version": weight_label}`, as vLLM's server does once a weight push labelled it.

Everything is bounded: one upstream request per incoming request, each with a timeout; handler
threads end with their connection.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KINDS = ("500", "429", "drop", "cut", "delay")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "upgrade", "te"}


class FaultProxy:
    """See the module docstring. `faults` counts the faults injected by kind, `posts` the POST
    requests received and `forwarded` the requests sent upstream."""

    def __init__(
        self,
        upstream_port: int,
        *,
        rate: float = 0.3,
        seed: int = 1,
        kinds: tuple[str, ...] = KINDS,
        retry_after: str = "1",
        delay_s: float = 0.5,
        outage_after: int | None = None,
        outage_s: float = 3.0,
        on_post: Callable[[int], None] | None = None,
        weight_label: str | None = None,
    ) -> None:
        if not 0.0 <= rate <= 1.0 or any(k not in KINDS for k in kinds):
            raise ValueError(f"rate must be in [0, 1] and kinds among {KINDS}; got {rate}, {kinds}")
        self.upstream_port = upstream_port
        self.rate, self.kinds, self.retry_after, self.delay_s = rate, kinds, retry_after, delay_s
        self.outage_after, self.outage_s = outage_after, outage_s
        self.on_post = on_post
        self.weight_label = weight_label
        self._rng = random.Random(seed)
        self.faults: Counter[str] = Counter()
        self.posts = 0
        self.forwarded = 0
        self.outages = 0
        self.port = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()
        self._timers: list[threading.Timer] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # --- listening ----------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def kill(self) -> None:
        """Stop listening and cut every open connection (connections are then refused)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def outage(self, seconds: float) -> None:
        """`kill()` now and `start()` again on the same port after `seconds` (in the background)."""
        self.outages += 1
        self.kill()
        timer = threading.Timer(seconds, self.start)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
            timer.join(5)
        self.kill()

    # --- what each request meets ----------------------------------------------------------------
    def _next_post(self) -> tuple[int, str | None]:
        """Count a POST; its number (1-based) and its fault kind, or None."""
        with self._lock:
            self.posts += 1
            kind = None
            if self._rng.random() < self.rate:
                kind = self.kinds[sum(self.faults.values()) % len(self.kinds)]
                self.faults[kind] += 1
        return self.posts, kind

    def _forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=120)
        try:
            conn.request(method, path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            kept = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
            with self._lock:
                self.forwarded += 1
            return resp.status, kept, data
        finally:
            conn.close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with proxy._lock:
                    proxy._connections.add(self.connection)

            def finish(self) -> None:
                with proxy._lock:
                    proxy._connections.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass

            def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes, cut: bool = False) -> None:
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2] if cut else data)
                if cut:
                    self.wfile.flush()
                    self.close_connection = True

            def _headers(self) -> dict[str, str]:
                return {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP | {"host"}}

            def do_GET(self) -> None:
                if self.path == "/weight_info" and proxy.weight_label is not None:
                    label = json.dumps({"weight_version": proxy.weight_label}).encode()
                    self._reply(200, [("Content-Type", "application/json")], label)
                    return
                try:
                    self._reply(*proxy._forward("GET", self.path, self._headers(), b""))
                except OSError:
                    self.close_connection = True

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                n, kind = proxy._next_post()
                if proxy.on_post is not None:
                    proxy.on_post(n)
                try:
                    if proxy.outage_after == n:
                        self.close_connection = True
                        proxy.outage(proxy.outage_s)
                        return
                    if kind in ("500", "429"):
                        error = {"error": {"message": f"injected HTTP {kind}", "type": "injected", "code": int(kind)}}
                        extra = [("Retry-After", proxy.retry_after)] if kind == "429" else []
                        headers = [("Content-Type", "application/json"), *extra]
                        self._reply(int(kind), headers, json.dumps(error).encode())
                        return
                    if kind == "drop":
                        self.close_connection = True
                        return
                    if kind == "delay":
                        time.sleep(proxy.delay_s)
                    self._reply(*proxy._forward("POST", self.path, self._headers(), body), cut=kind == "cut")
                except OSError:
                    self.close_connection = True

        return Handler


def main(argv: list[str] | None = None) -> None:
    """`python tests/fault_proxy.py --upstream-port 8000 --port 8001 --rate 0.3`: run the proxy in
    the foreground; on Ctrl-C or SIGTERM it prints what it injected as JSON on stdout."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rate", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--outage-after", type=int, default=None)
    parser.add_argument("--outage-s", type=float, default=3.0)
    args = parser.parse_args(argv)
    proxy = FaultProxy(
        args.upstream_port, rate=args.rate, seed=args.seed, outage_after=args.outage_after, outage_s=args.outage_s
    )
    proxy.port = args.port
    proxy.start()
    print(f"listening on {proxy.base_url}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    proxy.stop()
    print(
        json.dumps(
            {"posts": proxy.posts, "forwarded": proxy.forwarded, "faults": dict(proxy.faults), "outages": proxy.outages}
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
