"""Several vLLM servers on the serving side: `MultiSync` pushes every version to each server that
answers `/health` (recording fakes here; the real servers: tests/vllm_server/test_two_servers.py),
and the servers the trainer starts for `rollout.servers: N` get their own ports and KV cache size."""

from __future__ import annotations

import asyncio

import pytest

from spo_agents.config import load_config
from spo_agents.errors import ConfigError, NoServerLeft, PolicyError
from spo_agents.serving.multi_sync import MultiSync, make_server_sync
from spo_agents.serving.vllm_server import VLLMServer
from spo_agents.serving.weight_sync import ReloadSync

torch = pytest.importorskip("torch")


class Endpoint:
    """A server that answers like vLLM's dev mode and records what it was sent; `up` answers
    `/health`, `fail` makes the weight reload fail."""

    model = "base-model"

    def __init__(self, name: str, *, up: bool = True, fail: bool = False) -> None:
        self.base_url = f"http://{name}:1"
        self.up, self.fail = up, fail
        self.labels: list[str] = []
        self.reloads = 0

    def healthy(self) -> bool:
        return self.up

    def post(self, path, json=None, params=None, ok_404=False):
        if path == "/collective_rpc":
            if self.fail:
                raise PolicyError(f"HTTP 500 on {path}")
            self.reloads += 1
        if path == "/update_weight_version":
            self.labels.append(json["new_version"])
        if path == "/reset_prefix_cache":
            return {"success": True}
        return {"status": "ok"}


def model():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def test_every_version_goes_to_every_server_and_labels_each():
    a, b = Endpoint("a"), Endpoint("b")
    sync = make_server_sync("reload", [a, b])
    assert isinstance(sync, MultiSync)
    for version in (1, 2):
        asyncio.run(sync.push(model(), version))
    assert (a.reloads, b.reloads) == (2, 2)
    assert a.labels == b.labels == ["1", "2"]
    assert sync.pushed == [2, 2] and sync.version == 2
    sync.close()


def test_a_server_that_does_not_answer_or_fails_the_push_is_skipped_and_the_rest_get_it(caplog):
    a, b, c = Endpoint("a"), Endpoint("b", up=False), Endpoint("c", fail=True)
    sync = make_server_sync("reload", [a, b, c])
    asyncio.run(sync.push(model(), 3))
    assert (a.labels, b.labels, c.labels) == (["3"], [], [])
    assert sync.pushed == [3, None, None]
    assert "version 3 reached 1 of 3 policy server(s)" in caplog.text
    b.up, c.fail = True, False  # both back: the next push reaches them
    asyncio.run(sync.push(model(), 4))
    assert sync.pushed == [4, 4, 4] and b.labels == c.labels == ["4"]
    sync.close()


def test_a_push_that_reaches_no_server_stops_the_run():
    sync = make_server_sync("reload", [Endpoint("a", up=False), Endpoint("b", fail=True)])
    with pytest.raises(
        NoServerLeft, match="no policy server took the weights of version 1.*`http://a:1`.*`http://b:1`"
    ):
        asyncio.run(sync.push(model(), 1))
    sync.close()


def test_the_servers_share_one_weight_directory_removed_on_close():
    sync = make_server_sync("reload", [Endpoint("a"), Endpoint("b")])
    dirs = {s.save_dir for s in sync.syncs}
    assert len(dirs) == 1
    asyncio.run(sync.push(model(), 1))
    (shared,) = dirs
    assert (shared / "model.safetensors").is_file()
    sync.close()
    sync.close()  # twice is fine
    assert not shared.exists()


def test_one_server_keeps_the_plain_strategy():
    assert isinstance(make_server_sync("reload", [Endpoint("a")]), ReloadSync)


def _command(*overrides: str) -> list[str]:
    cfg = load_config(overrides=["rollout.backend=vllm-server", *overrides])
    return VLLMServer.from_config(cfg, python="/usr/bin/python3", port=8000).command()


def _kv_bytes(cmd: list[str]) -> int | None:
    return int(cmd[cmd.index("--kv-cache-memory-bytes") + 1]) if "--kv-cache-memory-bytes" in cmd else None


def test_started_servers_get_a_1_gib_kv_cache_each_when_there_are_several():
    assert _kv_bytes(_command("rollout.servers=2")) == 1024**3
    assert _kv_bytes(_command("rollout.servers=1")) is None  # vLLM's own default
    assert _kv_bytes(_command("rollout.servers=2", "rollout.server_kv_cache_gib=0.5")) == 512 * 1024**2
    assert _kv_bytes(_command("rollout.server_kv_cache_gib=2")) == 2 * 1024**3


def test_a_kv_cache_size_that_is_not_positive_is_refused():
    with pytest.raises(ConfigError, match="rollout.server_kv_cache_gib.*> 0"):
        load_config(overrides=["rollout.server_kv_cache_gib=0"])
