"""Weight pushes to several vLLM servers (`rollout.base_url` as a list, `rollout.servers` > 1).

`MultiSync` runs one `rollout.weight_sync` strategy per server and pushes every version to every
server that answers `/health`, one after another (they share one weight directory, written once
per server push). Each push labels its server with the version (`/update_weight_version`), which
is what `MultiServerPolicy` checks before sending a server requests of that version: a server
that missed a push is out of rotation until a later push reaches it, and one that died and came
back is taken in again only after a push of the current weights.
"""

from __future__ import annotations

import logging
import shutil
import time
from typing import Any

from spo_agents.errors import NoServerLeft, PolicyError
from spo_agents.serving.weight_sync import ServerSync, SyncStats, WeightSync, fast_tmp_dir, make_weight_sync

log = logging.getLogger(__name__)


class MultiSync(WeightSync):
    """The same strategy on several servers (module docstring). `syncs`: one `ServerSync` each.
    `pushed[i]` is the last version that reached server i (None: none yet)."""

    def __init__(self, syncs: list[ServerSync], *, own_dir: Any = None) -> None:
        if not syncs:
            raise PolicyError("`MultiSync` needs at least one server")
        self.syncs = syncs
        self.name = syncs[0].name
        self.version: int | None = None
        self.pushed: list[int | None] = [None] * len(syncs)
        self._own_dir = own_dir

    @property
    def served_model(self) -> str | None:
        done = [s for s in self.syncs if s.version is not None]
        return (done or self.syncs)[0].served_model

    async def push(self, model: Any, version: int) -> SyncStats:
        """Push to every server that answers `/health`; raises `NoServerLeft` when none took it."""
        t0 = time.perf_counter()
        first: SyncStats | None = None
        missed = []
        for i, sync in enumerate(self.syncs):
            url = sync.endpoint.base_url
            if not sync.endpoint.healthy():
                missed.append(f"`{url}`: no answer to `/health`")
                continue
            try:
                stats = await sync.push(model, version)
            except PolicyError as e:
                log.warning("the weights of version %d did not reach %s: %s", version, url, e)
                missed.append(f"`{url}`: {e}")
                continue
            self.pushed[i] = int(version)
            first = first or stats
        if first is None:
            raise NoServerLeft(
                f"no policy server took the weights of version {version} ({'; '.join(missed)}); check the servers "
                "(their logs), restart them, then finish the run with `--resume`"
            )
        if missed:
            log.warning(
                "version %d reached %d of %d policy server(s); the others stay out of rotation until a push reaches "
                "them (%s)",
                version,
                len(self.syncs) - len(missed),
                len(self.syncs),
                "; ".join(missed),
            )
        self.version = int(version)
        first.total_s = time.perf_counter() - t0
        return first

    def close(self) -> None:
        for sync in self.syncs:
            sync.close()
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None


def make_server_sync(strategy: str, endpoints: list[Any]) -> WeightSync:
    """`rollout.weight_sync` for one server (a `ServerSync`) or several (a `MultiSync` whose
    strategies share one weight directory)."""
    if len(endpoints) == 1:
        return make_weight_sync(strategy, endpoints[0])
    options: dict[str, Any] = {}
    shared = None
    if strategy in ("reload", "lora"):
        shared = fast_tmp_dir(f"spo-{strategy}-")
        options["save_dir"] = shared
    return MultiSync([make_weight_sync(strategy, e, **options) for e in endpoints], own_dir=shared)
