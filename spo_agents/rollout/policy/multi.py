"""Several OpenAI-compatible servers behind one policy (`rollout.base_url` as a list, `rollout.servers`).

Each server has its own `OpenAIPolicy` client and its own `VersionGate`; this class routes.

- Routing: an episode holds a `session()`; its first request goes to the live server with the
  fewest requests outstanding (ties: the one that started fewest sessions), and its later turns
  go to the same server, whose prefix cache holds the conversation so far.
- Versions: `pause()` drains every server's gate and `resume(version)` reopens them all; a
  generation carries the version of the gate of the server that produced it, and the server's
  URL in `Generation.info["server"]`. After each `resume`, a server's weight label (vLLM's
  `GET /weight_info`, which every weight push sets to the pushed version) is read before its
  next request is sent, inside its gate (so no push can land in between): a server whose label
  is not the current version (a push that did not reach it) is taken out of rotation. A server
  without the route (not vLLM, or vLLM without `VLLM_SERVER_DEV_MODE=1`) is not checked.
- Failures: a server that stops answering (the client's `ServerUnavailable`: refused connections,
  timeouts, dropped connections or HTTP 5xx beyond `max_retries`) is taken out of rotation with a
  warning. A session whose server went out before its first generation moves to another server;
  one that had already generated there raises `ServerLost` (its turns would otherwise come from
  two servers), and `run_episode` plays the episode again from its start on a new session. A server
  refusing connections is not waited for (`server_wait_s` does not apply): the others carry on.
  When no server is left, `NoServerLeft` stops the run.
- Re-admission: at most every `recheck_s` seconds while servers are out, each is probed in the
  background: it comes back once `/health` answers and its weight label is the current version,
  i.e. after a push of the current weights reached it (the trainer's weight sync pushes to every
  server that answers `/health`). A server never seen with a label comes back on `/health` alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from spo_agents.errors import NoServerLeft, PolicyError, ServerLost, ServerUnavailable
from spo_agents.rollout.policy.base import Generation, PolicyBackend, SamplingParams, Session, VersionGate
from spo_agents.rollout.policy.openai import OpenAIPolicy
from spo_agents.rollout.policy.openai_client import RequestStats
from spo_agents.weight_labels import GET_ROUTE, HEALTH_ROUTE, label_of, serves

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Server:
    """One server of the pool: its client, gate and what routing needs to know."""

    index: int
    url: str
    policy: OpenAIPolicy
    gate: VersionGate = field(default_factory=VersionGate)
    live: bool = True
    reason: str = ""  # why it is out of rotation
    outstanding: int = 0  # requests routed to it and not answered yet (waiting at its gate included)
    sessions: int = 0  # sessions that started on it
    generations: int = 0  # generations it produced
    checked_version: int | None = None  # the version its weight label was last found to match
    labelled: bool | None = None  # whether it has a weight label (None: not asked yet)

    def root(self) -> str:
        url = self.url.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url


class StickySession(Session):
    """An episode's handle: its generations go to one server (see the module docstring)."""

    def __init__(self, pool: MultiServerPolicy) -> None:
        super().__init__(pool)
        self.pool = pool
        self.server: Server | None = None
        self.turns = 0

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        for _ in range(len(self.pool.servers) + 1):
            if self.server is None:
                self.server = self.pool.pick()
            server = self.server
            try:
                gen = await self.pool.generate_on(server, prompt_ids, params)
            except ServerUnavailable as e:
                self.pool.take_out(server, f"{type(e).__name__}: {e}")
                self._moved(server)
                continue
            except _LeftRotation:
                self._moved(server)
                continue
            self.turns += 1
            return gen
        raise NoServerLeft(self.pool.none_left())  # pragma: no cover - each pass takes a server out

    def _moved(self, server: Server) -> None:
        """The session's server went out of rotation: move on before the first turn, else fail."""
        if not any(s.live for s in self.pool.servers):
            raise NoServerLeft(self.pool.none_left())
        if self.turns:
            raise ServerLost(
                f"the policy server `{server.url}` left rotation during an episode ({server.reason}); the "
                f"episode's {self.turns} earlier turn(s) came from it, so it is not continued on another server"
            )
        self.server = None


class _LeftRotation(Exception):
    """The chosen server was taken out of rotation before the request was sent."""


class MultiServerPolicy(PolicyBackend):
    """One policy over several OpenAI-compatible servers (see the module docstring).

    Args:
        base_urls: the servers' OpenAI base URLs (each e.g. `http://127.0.0.1:8000/v1`), distinct.
        model: the model name the servers know.
        tokenizer: as for `OpenAIPolicy` (loaded once, shared by every client).
        recheck_s: how often servers out of rotation are probed for re-admission.
        health_timeout_s: the wait for `/health` and `/weight_info` answers.
        **kw: the `OpenAIPolicy` settings, applied to each server's client (`server_wait_s` is
            ignored: a server that refuses connections is taken out at once).
    """

    def __init__(
        self,
        base_urls: list[str],
        model: str,
        *,
        tokenizer: Any = None,
        recheck_s: float = 5.0,
        health_timeout_s: float = 5.0,
        **kw: Any,
    ) -> None:
        super().__init__()
        urls = [str(u).rstrip("/") for u in base_urls]
        repeated = sorted(u for u, n in Counter(urls).items() if n > 1)
        if not urls or repeated or not all(urls):
            raise PolicyError(
                f"a multi-server policy needs a non-empty list of distinct base URLs; got {list(base_urls)}"
                + (f" (repeated: {', '.join(f'`{u}`' for u in repeated)})" if repeated else "")
            )
        if not (recheck_s > 0 and health_timeout_s > 0):
            raise PolicyError(f"`recheck_s` and `health_timeout_s` must be > 0, got {recheck_s}, {health_timeout_s}")
        kw["server_wait_s"] = 0.0
        first = OpenAIPolicy(urls[0], model, tokenizer=tokenizer, **kw)
        policies = [first] + [OpenAIPolicy(u, model, tokenizer=first.tokenizer, **kw) for u in urls[1:]]
        self.servers = [Server(i, u, p) for i, (u, p) in enumerate(zip(urls, policies))]
        self.model = model
        self.recheck_s = recheck_s
        self.health_timeout_s = health_timeout_s
        self._last_recheck = -1e9
        self._recheck: asyncio.Task | None = None
        self._http: Any = None

    # --- the protocol ---------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.servers[0].policy.tokenizer

    @property
    def supports_token_io(self) -> bool:  # type: ignore[override]
        return all(s.policy.supports_token_io for s in self.servers if s.live)

    @property
    def stats(self) -> RequestStats:
        """The requests of every server's client, added up."""
        total = RequestStats()
        for s in self.servers:
            st = s.policy.stats
            total.requests += st.requests
            total.outages += st.outages
            total.outage_s += st.outage_s
            for why, n in st.retries.items():
                total.retries[why] = total.retries.get(why, 0) + n
        return total

    def session(self) -> StickySession:
        return StickySession(self)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        """One generation outside any episode (a session of one turn)."""
        return await self.session().generate(prompt_ids, params)

    async def connect(self) -> None:
        """Probe every server; one that does not answer is taken out (a warning), one that refuses
        the model raises. Raises `NoServerLeft` when none answers, `PolicyError` when they differ
        in what they can do (token-in/token-out or text only)."""
        results = await asyncio.gather(*(s.policy.connect() for s in self.servers), return_exceptions=True)
        for s, r in zip(self.servers, results):
            if isinstance(r, ServerUnavailable):
                self.take_out(s, f"{type(r).__name__}: {r}")
            elif isinstance(r, BaseException):
                raise r
        live = [s for s in self.servers if s.live]
        if not live:
            raise NoServerLeft(self.none_left())
        modes = {s.policy.mode for s in live}
        if len(modes) > 1:
            raise PolicyError(
                "the servers differ in what they can do: "
                + ", ".join(f"`{s.url}` {s.policy.mode} ({s.policy.server_kind})" for s in live)
                + "; list servers of one kind (token-in/token-out needs vLLM's server)"
            )

    async def pause(self) -> None:
        await self._gate.pause()
        await asyncio.gather(*(s.gate.pause() for s in self.servers))

    def resume(self, version: int) -> None:
        self._gate.resume(version)
        for s in self.servers:
            s.gate.resume(version)

    def set_served_model(self, name: str) -> None:
        self.model = name
        for s in self.servers:
            s.policy.set_served_model(name)

    async def close(self) -> None:
        if self._recheck is not None:
            self._recheck.cancel()
            with contextlib.suppress(BaseException):
                await self._recheck
            self._recheck = None
        for s in self.servers:
            await s.policy.close()
        if self._http is not None:
            with contextlib.suppress(Exception):
                await self._http.aclose()
            self._http = None

    # --- routing --------------------------------------------------------------------------------
    def pick(self) -> Server:
        """The live server with the fewest outstanding requests (ties: fewest sessions, then order)."""
        self._maybe_recheck()
        live = [s for s in self.servers if s.live]
        if not live:
            raise NoServerLeft(self.none_left())
        server = min(live, key=lambda s: (s.outstanding, s.sessions, s.index))
        server.sessions += 1
        return server

    async def generate_on(self, server: Server, prompt_ids: list[int], params: SamplingParams) -> Generation:
        """Generate on `server` inside its gate, after checking its weight label for this version."""
        server.outstanding += 1
        try:
            async with server.gate.request() as version:
                if not server.live:
                    raise _LeftRotation
                if server.checked_version != version and server.labelled is not False:
                    label = await self._label(server)
                    if not serves(label, version):
                        self.take_out(server, f"it serves weights `{label}`, not version {version}")
                        raise _LeftRotation
                    server.checked_version = version
                gen = await server.policy.generate(list(prompt_ids), params)
        finally:
            server.outstanding -= 1
        server.generations += 1
        gen.policy_version = version
        gen.info["server"] = server.url
        return gen

    def take_out(self, server: Server, reason: str) -> None:
        """Take `server` out of rotation (once; later calls for the same outage are ignored)."""
        if not server.live:
            return
        server.live, server.reason, server.checked_version = False, reason, None
        left = sum(s.live for s in self.servers)
        log.warning(
            "policy server %s taken out of rotation: %s; %d of %d server(s) left%s",
            server.url,
            reason,
            left,
            len(self.servers),
            "" if left else " (nothing can generate)",
        )

    def none_left(self) -> str:
        return (
            "every policy server is out of rotation: "
            + "; ".join(f"`{s.url}`: {s.reason}" for s in self.servers)
            + ". Check the servers (their logs), restart them, then finish the run with `--resume`"
        )

    # --- weight labels and re-admission ---------------------------------------------------------
    def _client(self) -> Any:
        if self._http is None:
            import httpx

            self._http = httpx.AsyncClient(timeout=self.health_timeout_s)
        return self._http

    async def _label(self, server: Server) -> str | None:
        """The server's weight label (`GET /weight_info`), or None when it has no such route.
        Raises `ServerUnavailable` when the server does not answer."""
        import httpx

        try:
            r = await self._client().get(server.root() + GET_ROUTE)
        except httpx.HTTPError as e:
            raise ServerUnavailable(f"`{server.url}` did not answer `GET {GET_ROUTE}`: {e!r}") from e
        if r.status_code in (404, 405):
            server.labelled = False
            return None
        if r.status_code >= 500:
            raise ServerUnavailable(f"`{server.url}` answered `GET {GET_ROUTE}` with HTTP {r.status_code}")
        try:
            label = label_of(r.json())
        except ValueError:
            server.labelled = False
            return None
        server.labelled = True
        return label

    async def _healthy(self, server: Server) -> bool:
        import httpx

        try:
            return (await self._client().get(server.root() + HEALTH_ROUTE)).status_code == 200
        except httpx.HTTPError:
            return False

    def _maybe_recheck(self) -> None:
        """Start a background probe of the servers out of rotation, at most every `recheck_s`."""
        if all(s.live for s in self.servers) or (self._recheck is not None and not self._recheck.done()):
            return
        now = time.monotonic()
        if now - self._last_recheck < self.recheck_s:
            return
        self._last_recheck = now
        self._recheck = asyncio.get_running_loop().create_task(self.recheck())

    async def recheck(self) -> list[Server]:
        """Probe each server out of rotation and take back those that answer `/health` with the
        current weights (module docstring); returns the servers taken back."""
        back = []
        for s in [s for s in self.servers if not s.live]:
            if self._gate.paused or not await self._healthy(s):
                continue
            version = self.version
            try:
                label = await self._label(s)
            except ServerUnavailable:
                continue
            if s.labelled and not serves(label, version):
                log.info(
                    "policy server %s answers again but serves weights `%s`, not version %d", s.url, label, version
                )
                continue
            if self._gate.paused or self.version != version:
                continue  # a push started meanwhile: ask again after it
            s.live, s.reason, s.checked_version = True, "", version if s.labelled else None
            back.append(s)
            log.warning(
                "policy server %s back in rotation at version %d (%d of %d server(s) live)",
                s.url,
                version,
                sum(x.live for x in self.servers),
                len(self.servers),
            )
        return back
