"""The viewer's HTTP server: the standard library's `ThreadingHTTPServer`, GET only.

Routes (`i` is the position of a target on the command line):

    /                               runs and eval dirs given (redirects to the only one)
    /r/i                            run overview: metric curves
    /r/i/problems                   the tracker's problems (?q= &visited=1 &sort= &desc= &page=)
    /r/i/problem?id=ID              one problem's visits
    /r/i/trajectories?step=N        saved training trajectories of a step
    /r/i/traj?step=N&index=J        one trajectory (&lp=1: tokens shaded by log-prob)
    /r/i/evals                      the run's eval dirs
    /r/i/eval/NAME[/problem|/sample]   an eval dir of the run (as /e/i below)
    /e/i                            an eval dir: per-problem pass@k, maj@k, answer clusters
    /e/i/problem?id=ID              a problem's samples;  /e/i/sample?id=ID&i=K  one transcript
    /compare?runs=0&runs=1          runs on the same axes

Bound to 127.0.0.1 by default. Requests whose Host header names another machine are refused
while the server listens on a loopback address (a web page elsewhere cannot read the data through
DNS rebinding). Every response carries a Content-Security-Policy that allows scripts and styles
from the viewer only.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
import traceback
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from spo_agents.errors import SPOError
from spo_agents.view import pages
from spo_agents.view.data import EvalDir, RunDir, open_target
from spo_agents.view.static import FILES

log = logging.getLogger(__name__)

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


class NotFound(Exception):
    """No page at this address."""


class Viewer:
    """The targets and the routing of paths to pages (no HTTP in here: tests call `page`)."""

    def __init__(self, paths: Sequence[str | Path], refresh_s: int = pages.REFRESH_S) -> None:
        self.targets: list[RunDir | EvalDir] = [open_target(p) for p in paths]
        self.layout = pages.Layout(self.targets, refresh_s)

    def page(self, path: str, query: dict[str, list[str]]) -> str:
        """The HTML of `path`; raises `NotFound`; a `str` starting with `redirect:` redirects."""
        q = {k: v[-1] for k, v in query.items()}
        parts = [unquote(p) for p in path.strip("/").split("/") if p]
        if not parts:
            if len(self.targets) == 1:
                return "redirect:" + ("/r/0" if isinstance(self.targets[0], RunDir) else "/e/0")
            return pages.index_page(self.layout)
        if parts == ["compare"]:
            return pages.compare_page(self.layout, [int(x) for x in query.get("runs", []) if x.isdigit()])
        if len(parts) >= 2 and parts[0] in ("r", "e") and parts[1].isdigit():
            i = int(parts[1])
            if i >= len(self.targets):
                raise NotFound(path)
            target = self.targets[i]
            if parts[0] == "r" and isinstance(target, RunDir):
                return self._run(i, target, parts[2:], q)
            if parts[0] == "e" and isinstance(target, EvalDir):
                return self._eval(f"/e/{i}", target, parts[2:], q, i, "")
        raise NotFound(path)

    def _run(self, i: int, run: RunDir, rest: list[str], q: dict[str, str]) -> str:
        if not rest:
            return pages.overview_page(self.layout, i, run)
        head = rest[0]
        if head == "problems" and len(rest) == 1:
            return pages.problems_page(self.layout, i, run, q)
        if head == "problem" and len(rest) == 1 and "id" in q:
            return pages.problem_page(self.layout, i, run, q["id"])
        if head == "trajectories" and len(rest) == 1:
            return pages.trajectories_page(self.layout, i, run, q)
        if head == "traj" and len(rest) == 1:
            step, index = _int(q.get("step")), _int(q.get("index"))
            html = (
                None
                if step is None or index is None
                else pages.trajectory_page(self.layout, i, run, step, index, q.get("lp") == "1")
            )
            if html is None:
                raise NotFound("no such saved trajectory")
            return html
        if head == "evals" and len(rest) == 1:
            return pages.evals_page(self.layout, i, run)
        if head == "eval" and len(rest) >= 2:
            try:
                ev = run.eval_dir(rest[1])
            except KeyError:
                raise NotFound(rest[1]) from None
            from urllib.parse import quote

            return self._eval(f"/r/{i}/eval/{quote(rest[1])}", ev, rest[2:], q, i, "evals")
        raise NotFound("/".join(rest))

    def _eval(self, base: str, ev: EvalDir, rest: list[str], q: dict[str, str], target: int, tab: str) -> str:
        if not rest:
            return pages.eval_page(self.layout, base, ev, q, target, tab)
        if rest == ["problem"] and "id" in q:
            return pages.eval_problem_page(self.layout, base, ev, q["id"], target, tab)
        if rest == ["sample"] and "id" in q and _int(q.get("i")) is not None:
            html = pages.eval_sample_page(self.layout, base, ev, q["id"], int(q["i"]), target, tab)
            if html is not None:
                return html
        raise NotFound("/".join(rest))


def _int(v: str | None) -> int | None:
    return int(v) if v is not None and re.fullmatch(r"-?\d+", v) else None


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Handler(BaseHTTPRequestHandler):
    viewer: Viewer
    loopback_only: bool
    server_version = "spo-agent-view"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: one line per request at debug level
        log.debug("%s - %s", self.address_string(), format % args)

    def do_HEAD(self) -> None:
        self.do_GET(head=True)

    def do_GET(self, head: bool = False) -> None:
        if self.loopback_only and not _is_loopback(_host_name(self.headers.get("Host", ""))):
            self._send(
                HTTPStatus.FORBIDDEN,
                "text/plain; charset=utf-8",
                "this viewer answers requests for localhost only\n",
                head,
            )
            return
        url = urlsplit(self.path)
        if url.path in FILES:
            ctype, body = FILES[url.path]
            self._send(HTTPStatus.OK, ctype, body, head, cache=True)
            return
        if url.path == "/favicon.ico":
            self._send(HTTPStatus.NO_CONTENT, "text/plain", "", head)
            return
        try:
            html = self.viewer.page(url.path, parse_qs(url.query))
        except NotFound:
            body = self.viewer.layout.render(
                "not found", '<h1>Not found</h1><p>No page at this address.</p><p><a href="/">all runs</a></p>'
            )
            self._send(HTTPStatus.NOT_FOUND, "text/html; charset=utf-8", body, head)
            return
        except SPOError as e:
            body = self.viewer.layout.render(
                "error", f'<h1>Cannot show this page</h1><p class="notice">{pages.esc(e)}</p>'
            )
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, "text/html; charset=utf-8", body, head)
            return
        except Exception:  # noqa: BLE001 - a broken file should not stop the viewer; the traceback says what
            log.error("page %s failed:\n%s", self.path, traceback.format_exc())
            body = self.viewer.layout.render(
                "error", f"<h1>Internal error</h1><pre>{pages.esc(traceback.format_exc())}</pre>"
            )
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, "text/html; charset=utf-8", body, head)
            return
        if html.startswith("redirect:"):
            self.send_response(HTTPStatus.FOUND)
            self.send_header("Location", html.removeprefix("redirect:"))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._send(HTTPStatus.OK, "text/html; charset=utf-8", html, head)

    def _send(self, status: HTTPStatus, ctype: str, body: str, head: bool, cache: bool = False) -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "max-age=300" if cache else "no-store")
        self.end_headers()
        if not head and status != HTTPStatus.NO_CONTENT:
            self.wfile.write(data)


def _host_name(host: str) -> str:
    """The name part of a Host header (`[::1]:8000` -> `::1`, `localhost:8000` -> `localhost`)."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class ViewServer:
    """`spo-agent view`'s server; `start()` serves in a background thread, `serve_forever()` here."""

    def __init__(
        self, paths: Sequence[str | Path], host: str = "127.0.0.1", port: int = 8765, refresh_s: int = pages.REFRESH_S
    ) -> None:
        viewer = Viewer(paths, refresh_s)
        handler = type("Handler", (_Handler,), {"viewer": viewer, "loopback_only": _is_loopback(host)})
        self.viewer = viewer
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}/"

    def start(self) -> ViewServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="spo-view", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
