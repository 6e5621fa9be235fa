"""Training against policy backends: weights published after each update in order (pause, push,
resume), a resumed run's first push, a vLLM server started and stopped with the run (one or two),
a server whose weights cannot follow refused, and the sandbox settings reaching the envs.
"""

from __future__ import annotations

import types

import pytest
import torch
from training_fixtures import tiny_components, tiny_config

from spo_agents.config import Config, from_dict, load_config, to_dict
from spo_agents.rollout.policy.base import PolicyBackend
from spo_agents.serving.weight_sync import WeightSync
from spo_agents.training.loop import Trainer, train


# --- weights to a server backend: update -> pause -> push -> resume(version) ---------------------
class RecordingPolicy(PolicyBackend):
    """The tiny in-process policy, recording the calls `publish` makes."""

    def __init__(self, inner, events):
        super().__init__()
        self.inner, self.events = inner, events

    @property
    def tokenizer(self):
        return self.inner.tokenizer

    async def generate(self, prompt_ids, params):
        async with self._gate.request() as version:
            g = await self.inner.generate(prompt_ids, params)
        g.policy_version = version
        return g

    async def pause(self):
        self.events.append(("pause",))
        await super().pause()

    def resume(self, version):
        self.events.append(("resume", version))
        super().resume(version)

    def set_served_model(self, name):
        self.events.append(("serve", name))

    async def close(self):
        await self.inner.close()


class FakeSync(WeightSync):
    name = "fake"

    def __init__(self, events, served_model=None):
        self.events, self._served = events, served_model

    @property
    def served_model(self):
        return self._served

    async def push(self, model, version):
        self.events.append(("push", version))


@pytest.mark.parametrize("served_model", [None, "adapter"])
def test_server_backend_pushes_weights_after_each_update_in_order(tmp_path, monkeypatch, served_model):
    events: list = []
    comp = tiny_components()
    comp.policy = RecordingPolicy(comp.policy, events)
    comp.weight_sync = FakeSync(events, served_model)
    comp.inplace = False
    cfg = tiny_config(tmp_path, train={"steps": 2, "checkpoint_every": 0})
    from spo_agents.training.learner import Learner

    real_update = Learner.update

    def update(self, trajs, adv):
        events.append(("update",))
        return real_update(self, trajs, adv)

    monkeypatch.setattr(Learner, "update", update)
    train(cfg, run_dir=tmp_path / "run", components=comp)
    serve = [("serve", served_model)] if served_model else []
    one = [("pause",), ("push", 1), *serve, ("resume", 1)]
    two = [("pause",), ("push", 2), *serve, ("resume", 2)]
    assert events == [("resume", 0), ("update",), *one, ("update",), *two]


async def test_in_process_vllm_sync_loads_every_weight_between_pause_and_resume():
    from spo_agents.serving.weight_sync import InProcessVLLMSync, publish

    events = []

    class FakeVLLM(PolicyBackend):
        tokenizer = None

        async def generate(self, prompt_ids, params):
            raise AssertionError("not called")

        async def pause(self):
            events.append("pause")

        async def load_weights(self, named):
            events.append(("load", sorted(name for name, _ in named)))

        def resume(self, version):
            events.append(("resume", version))

    policy = FakeVLLM()
    sync = InProcessVLLMSync(policy)
    stats = await publish(policy, sync, torch.nn.Linear(2, 2), 7)
    assert events == ["pause", ("load", ["bias", "weight"]), ("resume", 7)]
    assert stats.version == 7 and sync.version == 7


def test_a_resumed_server_run_pushes_the_checkpoint_weights_before_any_rollout(tmp_path):
    cfg = tiny_config(tmp_path, train={"steps": 1, "checkpoint_every": 1})
    train(cfg, run_dir=tmp_path / "run", components=tiny_components())
    events: list = []
    comp = tiny_components()

    class RecordingGenerations(RecordingPolicy):
        async def generate(self, prompt_ids, params):
            g = await super().generate(prompt_ids, params)
            events.append(("generate", g.policy_version))
            return g

    comp.policy = RecordingGenerations(comp.policy, events)
    comp.weight_sync = FakeSync(events)
    comp.inplace = False
    more = from_dict(Config, {**to_dict(cfg), "train": {**to_dict(cfg)["train"], "steps": 2}})
    train(more, run_dir=tmp_path / "run", resume=True, components=comp)
    generated = [i for i, e in enumerate(events) if e[0] == "generate"]
    assert generated and generated[0] > events.index(("push", 1))
    assert {events[i][1] for i in generated} == {1}  # every rollout token is from the checkpoint's weights
    seq = [e for e in events if e[0] not in ("serve", "generate")]
    # the server still serves the initial weights (version 0) until the checkpoint's are pushed,
    # before any rollout; then the one update of the resumed run is published as version 2
    assert seq == [("resume", 0), ("pause",), ("push", 1), ("resume", 1), ("pause",), ("push", 2), ("resume", 2)]


def _fake_servers(monkeypatch, calls: list):
    """`VLLMServer`, `connect` and the weight-sync factory replaced by recorders."""
    import spo_agents.serving.multi_sync as ms
    import spo_agents.serving.vllm_server as vs

    class FakeServer:
        def __init__(self, port):
            self.port = port
            self.openai_base_url = f"http://127.0.0.1:{port}/v1"

        @classmethod
        def from_config(cls, cfg, *, log_dir=None, port=None, **kw):
            calls.append(("from_config", cfg.model.name, log_dir))
            return cls(port)

        def launch(self):
            calls.append(("launch", self.openai_base_url))
            return self

        def wait_ready(self):
            calls.append(("ready", self.openai_base_url))
            return self

        def stop(self):
            calls.append(("stop", self.openai_base_url))

    def sync(name, endpoint, **kw):
        calls.append(("sync", name))
        return types.SimpleNamespace(name=name, close=lambda: None)

    monkeypatch.setattr(vs, "VLLMServer", FakeServer)
    monkeypatch.setattr(vs, "connect", lambda url, **kw: calls.append(("connect", url)) or object())
    monkeypatch.setattr(ms, "make_weight_sync", sync)


def _close(comp) -> None:
    import asyncio

    for closer in comp.closers:
        r = closer()
        if hasattr(r, "__await__"):
            asyncio.run(r)


def test_vllm_server_rollout_without_a_url_starts_a_server_and_stops_it_with_the_run(tmp_path, monkeypatch):
    from spo_agents.training.components import build_components

    calls: list = []
    _fake_servers(monkeypatch, calls)
    cfg = tiny_config(tmp_path, rollout={"backend": "vllm-server"}, env={"id": "countdown-python"})
    comp = build_components(cfg, log_dir=tmp_path)
    url = comp.policy.base_url
    assert calls == [("from_config", "tiny-random", tmp_path), ("launch", url), ("ready", url), ("connect", url)] + [
        ("sync", "reload")
    ]
    assert comp.policy.mode == "tokens"  # a text-only server cannot train
    _close(comp)
    assert calls[-1] == ("stop", url)


def test_rollout_servers_2_starts_two_servers_side_by_side_and_spreads_over_both(tmp_path, monkeypatch):
    from spo_agents.rollout.policy.multi import MultiServerPolicy
    from spo_agents.serving.multi_sync import MultiSync
    from spo_agents.training.components import build_components

    calls: list = []
    _fake_servers(monkeypatch, calls)
    cfg = tiny_config(tmp_path, rollout={"backend": "vllm-server", "servers": 2}, env={"id": "countdown-python"})
    comp = build_components(cfg, log_dir=tmp_path)
    urls = [s.url for s in comp.policy.servers]
    assert isinstance(comp.policy, MultiServerPolicy) and len(set(urls)) == 2  # one port each
    # both launched before either is waited for: they load side by side
    assert [c[0] for c in calls[:6]] == ["from_config", "launch", "from_config", "launch", "ready", "ready"]
    assert [c for c in calls if c[0] == "connect"] == [("connect", u) for u in urls]
    assert isinstance(comp.weight_sync, MultiSync) and len(comp.weight_sync.syncs) == 2
    comp.weight_sync.close()
    _close(comp)
    assert sorted(c[1] for c in calls if c[0] == "stop") == sorted(urls)


def test_sandbox_limits_in_options_reach_the_training_envs_sessions():
    from spo_agents.config import load_config
    from spo_agents.training.components import make_env_factory

    cfg = load_config(overrides=["sandbox.options={max_output_bytes: 200}", "sandbox.timeout_s=7"])
    env = make_env_factory(cfg)("train")
    try:
        env.reset(options={"problem_id": env.problem_ids[0]})
        reply, *_ = env.step("<code>print('x' * 5000)</code>")
        assert reply.count("x") <= 200 and "truncated" in reply.lower()
        assert env._session is not None
    finally:
        env.close()


def test_training_refuses_a_server_whose_weights_it_cannot_update(tmp_path):
    from spo_agents.errors import ConfigError

    cfg = tiny_config(tmp_path, rollout={"backend": "openai", "base_url": "http://127.0.0.1:9/v1"})
    with pytest.raises(ConfigError, match="vllm-server"):
        Trainer(cfg, tmp_path / "run", tiny_components())


def test_a_misspelt_sandbox_backend_fails_before_the_model_loads(tmp_path, monkeypatch):
    import spo_agents.training.components as components
    from spo_agents.errors import SandboxNotFound

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the sandbox backend was resolved")

    monkeypatch.setattr(components, "load_model", no_model)
    cfg = load_config(None, ["sandbox.backend=lokal", f"train.output_dir={tmp_path}", "logging.progress=false"])
    with pytest.raises(SandboxNotFound, match="Did you mean `local`"):
        components.build_components(cfg)
