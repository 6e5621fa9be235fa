"""The training loop on the tiny model and a trivially learnable one-token environment.

`FirstTokenEnv`: the answer is the model's first token; reward 1 when it does not start with a
space (about 35% of the tokenizer's vocabulary, so a random-init model starts near 0.35). The
policy can raise it by shifting probability mass, which SPO does within a few steps.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from spo_agents.config import Config, from_dict, load_config, to_dict
from spo_agents.rollout.policy.base import PolicyBackend
from spo_agents.serving.weight_sync import WeightSync
from spo_agents.training.loop import Components, Trainer, train
from spo_agents.training.metrics import read_metrics, undocumented

HERE = Path(__file__).parent


class FirstTokenEnv(gym.Env):
    """One turn, one token: reward 1 if the text does not start with a space."""

    stop_sequences: list[str] = []
    reply_role = None
    env_id = "first-token-v0"

    def __init__(self, n: int = 48, split: str = "train") -> None:
        self.split = split
        self.problem_ids = [f"{split}-{i}" for i in range(n)]
        self.pid = None

    def reset(self, *, seed=None, options=None):
        self.pid = (options or {})["problem_id"]
        return [{"role": "user", "content": f"Say something about {self.pid}."}], {}

    def step(self, text):
        ok = bool(text) and not text.startswith(" ")
        return "", float(ok), True, False, {"correct": ok, "answer": text[:8]}

    def answers_equivalent(self, a, b):
        return a == b

    def close(self):
        pass


def tiny_components(seed: int = 0) -> Components:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spo_agents.models import tiny_model_dir
    from spo_agents.rollout.policy.hf import HFPolicy

    torch.manual_seed(seed)
    path = tiny_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    policy = HFPolicy(model=model, tokenizer=tok)
    return Components(
        model, tok, policy, lambda split: FirstTokenEnv(split=split), inplace=True, closers=[policy.close]
    )


def tiny_config(tmp_path: Path, **sections) -> Config:
    data = {
        "model": {"name": "tiny-random"},
        "env": {"id": "first-token"},
        "rollout": {"max_in_flight": 16, "max_new_tokens": 1, "max_episode_tokens": 1},
        "optim": {"lr": 3e-3},
        "train": {
            "steps": 2,
            "batch_size": 8,
            "checkpoint_every": 1,
            "keep_checkpoints": 2,
            "output_dir": str(tmp_path),
            "run_name": "run",
        },
        "eval": {"every": 0},
        "logging": {"progress": False},
    }
    for sec, vals in sections.items():
        data.setdefault(sec, {}).update(vals)
    return from_dict(Config, data)


def weights(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def test_two_steps_change_weights_write_documented_metrics_and_checkpoints(tmp_path):
    cfg = tiny_config(tmp_path, eval={"every": 2, "limit": 8})
    comp = tiny_components()
    before = weights(comp.model)
    res = train(cfg, run_dir=tmp_path / "run", components=comp)
    assert res.step == 2
    assert not torch.equal(before, weights(comp.model))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]  # step 0 is the held-out evaluation before training
    keys = set().union(*rows)
    assert undocumented(keys) == []
    assert "eval/avg_at_k" in rows[0] and "eval/avg_at_k" in rows[2]
    for r in rows[1:]:
        assert r["train/batch_size"] == 8
        assert 0.0 <= r["train/reward_mean"] <= 1.0
        assert r["tracker/drift"] > 0
    ck = tmp_path / "run" / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step-000002"
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("step-")) == ["step-000001", "step-000002"]
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    # what the learner trained on is kept for the viewer, with the tracker's per-visit log
    from spo_agents.trajectories import TrajectoryLogReader

    log = TrajectoryLogReader(tmp_path / "run")
    visits = log.visits()
    assert [v.step for v in visits] == [1] * 8 + [2] * 8
    assert sorted(log.steps()) == [1, 2] and len(log.read_step(2)) == 8


def _state_after_setup(cfg, run_dir):
    t = Trainer(cfg, run_dir, tiny_components(), resume=True)
    t._setup()
    return t


def test_resume_restores_tracker_sampler_optimizer_and_weights_exactly(tmp_path):
    cfg = tiny_config(tmp_path)
    run = tmp_path / "run"
    trainer_holder = {}

    import asyncio

    async def go():
        t = Trainer(cfg, run, tiny_components())
        trainer_holder["t"] = t
        await t.run()
        await t.aclose()

    from spo_agents.config import save_config

    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    asyncio.run(go())
    writer = trainer_holder["t"]
    resumed = _state_after_setup(cfg, run)
    assert resumed.step == 2
    a, b = writer.tracker.state_dict(), resumed.tracker.state_dict()
    for k in ("alpha", "beta", "c_last", "id_hash"):
        np.testing.assert_array_equal(a[k], b[k])
    assert a["C"] == b["C"]
    assert writer.sampler.state_dict() == resumed.sampler.state_dict()
    oa, ob = writer.learner.optimizer.state_dict(), resumed.learner.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    for k, sa in oa["state"].items():
        for name, ta in sa.items():
            assert torch.equal(torch.as_tensor(ta), torch.as_tensor(ob["state"][k][name])), (k, name)
    assert torch.equal(weights(writer.model), weights(resumed.model))
    # the restored sampler draws the batch the writer would have drawn next
    v = writer.tracker.v_hat()
    assert writer.sampler.sample(v, 5).tolist() == resumed.sampler.sample(v, 5).tolist()


def test_resume_continues_to_the_requested_step_without_duplicate_metrics(tmp_path):
    cfg = tiny_config(tmp_path)
    run = tmp_path / "run"
    train(cfg, run_dir=run, components=tiny_components())
    more = from_dict(Config, {**to_dict(cfg), "train": {**to_dict(cfg)["train"], "steps": 3}})
    res = train(more, run_dir=run, resume=True, components=tiny_components())
    assert res.step == 3
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    # the resume's override is kept for the next resume, and the checkpoint records the config
    assert load_config(run / "config.yaml").train.steps == 3
    from spo_agents.training.checkpoint import CheckpointManager

    assert CheckpointManager(run, keep=2).load().state["config"]["train"]["steps"] == 3


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
import test_training as T
from spo_agents.config import load_config
from spo_agents.training.loop import train

class SlowEnv(T.FirstTokenEnv):
    def step(self, text):
        time.sleep(0.05)
        return super().step(text)

comp = T.tiny_components()
comp.env_factory = lambda split: SlowEnv(split=split)
cfg = load_config({run!r} + "/config.yaml")
train(cfg, run_dir={run!r}, components=comp)
"""


def test_sigkill_then_resume_continues_from_the_last_checkpoint_with_the_tracker_intact(tmp_path):
    from spo_agents.config import save_config
    from spo_agents.training.checkpoint import CheckpointManager

    cfg = tiny_config(tmp_path, train={"steps": 1000})
    run = tmp_path / "run"
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT.format(tests=str(HERE), run=str(run))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    mgr = CheckpointManager(run)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and (len(mgr.steps()) == 0 or mgr.steps()[-1] < 2):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.1)
        time.sleep(0.3)  # likely mid-step (or mid-checkpoint) now
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    latest = mgr.latest()
    assert latest is not None
    saved = mgr.load()
    assert saved.step >= 2
    assert not latest.name.startswith(".tmp")  # a temporary left by the kill is never taken as a checkpoint
    rows = read_metrics(run / "metrics.jsonl")
    resumed = _state_after_setup(cfg, run)
    assert resumed.step == saved.step
    np.testing.assert_array_equal(resumed.tracker.state_dict()["alpha"], saved.state["tracker"]["alpha"])
    np.testing.assert_array_equal(resumed.tracker.state_dict()["beta"], saved.state["tracker"]["beta"])
    assert resumed.tracker.state_dict()["C"] == saved.state["tracker"]["C"] > 0
    assert max(r["step"] for r in rows) >= saved.step
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == saved.step  # lost steps dropped
    # and it trains on from there
    more = from_dict(Config, {**to_dict(cfg), "train": {**to_dict(cfg)["train"], "steps": saved.step + 1}})
    res = train(more, run_dir=run, resume=True, components=tiny_components())
    assert res.step == saved.step + 1


@pytest.mark.slow
def test_spo_raises_reward_on_a_learnable_env(tmp_path):
    cfg = tiny_config(
        tmp_path, train={"steps": 12, "batch_size": 16, "checkpoint_every": 0, "seed": 0}, optim={"lr": 1e-2}
    )
    train(cfg, run_dir=tmp_path / "run", components=tiny_components())
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    first = np.mean([r["train/reward_mean"] for r in rows[:3]])
    last = np.mean([r["train/reward_mean"] for r in rows[-3:]])
    assert last > first + 0.2, (first, last)


# --- ablations and the GRPO comparison share the loop ------------------------------------------
def _rows(tmp_path, **sections):
    cfg = tiny_config(tmp_path, **sections)
    train(cfg, run_dir=tmp_path / "run", components=tiny_components())
    return read_metrics(tmp_path / "run" / "metrics.jsonl")


def test_grpo_run_logs_only_documented_metrics(tmp_path):
    rows = _rows(
        tmp_path,
        algorithm={"name": "grpo", "group_size": 4},
        sampler={"type": "uniform"},
        train={"steps": 1, "checkpoint_every": 0},
    )
    assert rows[-1]["train/batch_size"] == 8 and "train/degenerate_share" in rows[-1]
    assert undocumented(rows[-1]) == []


def test_constant_rho_uniform_sampling_and_no_baseline_ablations(tmp_path):
    rows = _rows(
        tmp_path,
        tracker={"rho_type": "constant", "rho_constant": 0.9, "baseline": False},
        sampler={"type": "uniform"},
        train={"steps": 2, "checkpoint_every": 0},
    )
    for r in rows:
        assert r["tracker/rho_mean"] == pytest.approx(0.9)
        assert r["sampler/entropy_ratio"] == pytest.approx(1.0)
        assert r["train/advantage_raw_std"] == pytest.approx(r["train/reward_std"])  # no baseline: A = r


def test_grpo_needs_whole_groups_in_a_batch(tmp_path):
    from spo_agents.errors import ConfigError

    with pytest.raises(ConfigError, match="multiple of `algorithm.group_size`"):
        tiny_config(tmp_path, algorithm={"name": "grpo", "group_size": 3})


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


# --- the command line: train, estimate-values, plot ----------------------------------------------
class RegisteredFirstTokenEnv(FirstTokenEnv):
    def __init__(self, split="train", sandbox=None, sandbox_limits=None, n=48):
        super().__init__(n=n, split=split)


@pytest.fixture
def first_token_registered():
    from spo_agents import envs

    envs.register("first-token-v0", RegisteredFirstTokenEnv, override=True)
    yield "first-token"


def test_cli_train_takes_env_args_like_eval(tmp_path, first_token_registered, capsys):
    from spo_agents.cli import main

    args = [
        "train",
        "--env",
        "first-token",
        "--env-arg",
        "n=12",
        "--steps",
        "1",
        "model.name=tiny-random",
        "rollout.max_new_tokens=1",
        "rollout.max_episode_tokens=1",
        "logging.progress=false",
        "train.batch_size=8",
        f"train.output_dir={tmp_path}",
        "train.run_name=envarg",
        "eval.every=0",
    ]
    assert main(args) == 0
    assert load_config(tmp_path / "envarg" / "config.yaml").env.kwargs == {"n": 12}
    assert main(["train", "--env-arg", "n", "--steps", "1"]) == 1
    assert "KEY=VALUE" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_estimate_values_then_train_from_them_then_plot(tmp_path, first_token_registered, capsys):

    from spo_agents.cli import main

    common = [
        "model.name=tiny-random",
        "rollout.max_new_tokens=1",
        "rollout.max_episode_tokens=1",
        "rollout.max_in_flight=16",
        "logging.progress=false",
    ]
    values = tmp_path / "values.json"
    assert (
        main(["estimate-values", "--env", "first-token", "-n", "3", "--limit", "5", "--out", str(values), *common]) == 0
    )
    doc = json.loads(values.read_text())
    assert len(doc["problems"]) == 5 and all(v["samples"] == 3 for v in doc["problems"].values())
    assert doc["sampling"]["temperature"] == 1.0  # the training sampling settings
    assert (
        main(
            [
                "train",
                "--env",
                "first-token",
                "--steps",
                "1",
                *common,
                "train.batch_size=8",
                f"train.output_dir={tmp_path}",
                "train.run_name=cli",
                "eval.every=0",
                f"tracker.init_values={values}",
            ]
        )
        == 0
    )
    run = tmp_path / "cli"
    assert (run / "checkpoints" / "latest").is_file()
    assert main(["plot", str(run)]) == 0
    pngs = sorted(p.name for p in (run / "plots").glob("*.png"))
    assert "train.png" in pngs and "tracker.png" in pngs
    assert (run / "plots" / "train.png").read_bytes()[:4] == b"\x89PNG"


def test_offline_values_initialise_the_tracker_with_actual_counts(tmp_path):
    from spo_agents.algorithm.tracker import ValueTracker
    from spo_agents.config import TrackerConfig
    from spo_agents.training.values import init_tracker, write_values

    path = tmp_path / "v.json"
    write_values(path, {"a": (3, 4), "b": (0, 2), "zzz": (1, 1)}, {"env": "x"})
    tr = ValueTracker.from_config(["a", "b", "c"], TrackerConfig())
    assert init_tracker(tr, path) == 2
    n0 = 1 / (1 - 0.875)
    np.testing.assert_allclose(
        tr.v_hat(tr.indices(["a", "b", "c"])), [(3.5 / 5) / ((3.5 + 1.5) / 5), 0.5 / 3, 0.5], rtol=1e-6
    )
    assert tr.alpha[tr.indices(["a"])[0]] == pytest.approx(n0 * 3.5 / 5, rel=1e-6)


class HalfCreditEnv(FirstTokenEnv):
    """Every answer earns 0.5 and none is fully correct (partial credit)."""

    def step(self, text):
        return "", 0.5, True, False, {"correct": False, "answer": text[:8]}


def test_offline_values_sum_the_reward_training_folds_in(tmp_path):
    import asyncio

    from spo_agents.algorithm.tracker import ValueTracker
    from spo_agents.config import TrackerConfig
    from spo_agents.rollout.policy.base import SamplingParams
    from spo_agents.training.values import estimate, init_tracker, write_values

    comp = tiny_components()
    counts = asyncio.run(
        estimate(
            lambda: HalfCreditEnv(),
            comp.policy,
            ["train-0", "train-1"],
            n=4,
            sampling=SamplingParams(max_new_tokens=1),
            concurrency=4,
            max_episode_tokens=1,
            progress=False,
        )
    )
    assert counts == {"train-0": (2.0, 4), "train-1": (2.0, 4)}  # 4 x 0.5, not 0 fully correct
    write_values(tmp_path / "v.json", counts, {"env": "x"})
    tr = ValueTracker.from_config(["train-0", "train-1"], TrackerConfig())
    init_tracker(tr, tmp_path / "v.json")
    # alpha0 = N0 (s + 0.5) / (n + 1) with s = 2: v_hat0 = 2.5 / 5 = 0.5, the expected reward
    assert tr.v_hat(tr.indices(["train-0"]))[0] == pytest.approx(0.5)


def test_a_bad_values_file_says_how_to_make_one(tmp_path):
    from spo_agents.errors import ConfigError
    from spo_agents.training.values import read_values

    p = tmp_path / "v.json"
    p.write_text('{"problems": {}}')
    with pytest.raises(ConfigError, match="estimate-values"):
        read_values(p)
    with pytest.raises(ConfigError, match="does not exist"):
        read_values(tmp_path / "nope.json")


def test_a_run_without_a_run_dir_is_named_from_the_config(tmp_path):
    """`spo-agent train` passes no run directory: a single-process run must name its own."""
    cfg = tiny_config(tmp_path, train={"steps": 1, "run_name": "named"})
    res = train(cfg, components=tiny_components())
    assert res.step == 1
    run = tmp_path / "named"
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000001"


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


def _one_step_capturing_the_update(tmp_path, **sections):
    """Run one `train_step` and return (trainer, trajectories, advantages handed to the learner,
    tracker alpha/beta before the step, metrics row)."""
    import asyncio

    cfg = tiny_config(tmp_path, **sections)
    run = tmp_path / "run"
    run.mkdir(parents=True)
    t = Trainer(cfg, run, tiny_components())
    t._setup()
    # distinct, known beliefs per problem, so "the baseline before the update" is checkable
    n = len(t.problem_ids)
    t.tracker.init_offline(np.arange(n), np.arange(n) % 9, np.full(n, 8))
    alpha0, beta0 = t.tracker.alpha.copy(), t.tracker.beta.copy()
    seen = {}
    update = t.learner.update

    def spy(trajectories, advantages):
        seen["batch"], seen["adv"] = list(trajectories), np.asarray(advantages, dtype=np.float64)
        seen["alpha_at_update"] = t.tracker.alpha.copy()
        return update(trajectories, advantages)

    t.learner.update = spy

    async def go():
        try:
            return await t.train_step()
        finally:
            await t.aclose()

    row = asyncio.run(go())
    return t, seen, alpha0, beta0, row


def test_a_step_uses_the_value_before_the_update_and_updates_the_tracker_after(tmp_path):
    from spo_agents.algorithm.advantages import compute_advantages

    t, seen, alpha0, beta0, row = _one_step_capturing_the_update(tmp_path, train={"steps": 1, "checkpoint_every": 0})
    batch = seen["batch"]
    idx = t.tracker.indices([x.problem_id for x in batch])
    r = np.array([x.reward for x in batch])
    v_before = alpha0[idx].astype(np.float64) / (alpha0[idx].astype(np.float64) + beta0[idx])
    assert len(set(np.round(v_before, 6))) > 1  # the baselines differ, so the check below can fail
    np.testing.assert_allclose(seen["adv"], compute_advantages("spo", r, v_before), atol=1e-12)
    np.testing.assert_array_equal(seen["alpha_at_update"], alpha0)  # nothing folded in before the learner ran
    # after the update: first visit, so rho = rho_max (docs/algorithm.md section 1)
    rho = t.cfg.tracker.rho_max
    np.testing.assert_allclose(t.tracker.alpha[idx], rho * alpha0[idx] + r, rtol=1e-6)
    np.testing.assert_allclose(t.tracker.beta[idx], rho * beta0[idx] + (1 - r), rtol=1e-6)
    assert row["tracker/v_hat_mean"] == pytest.approx(v_before.mean())
    assert t.tracker.C == pytest.approx(row["tracker/drift"]) and t.tracker.C > 0  # this step's drift joins C after


def test_grpo_delivers_whole_groups_with_group_advantages_and_the_degenerate_share(tmp_path):
    from spo_agents.algorithm.advantages import degenerate_share, grpo_advantages

    t, seen, *_, row = _one_step_capturing_the_update(
        tmp_path,
        algorithm={"name": "grpo", "group_size": 4},
        sampler={"type": "uniform"},
        train={"steps": 1, "checkpoint_every": 0},
    )
    batch = seen["batch"]
    groups: dict = {}
    for x in batch:
        groups.setdefault(x.group_id, []).append(x)
    assert len(batch) == 8 and len(groups) == 2
    for members in groups.values():  # whole groups of one problem, each sample once
        assert len(members) == 4 and len({m.problem_id for m in members}) == 1
        assert sorted(m.sample_index for m in members) == [0, 1, 2, 3]
    r = np.array([x.reward for x in batch])
    gid = [x.group_id for x in batch]
    np.testing.assert_allclose(seen["adv"], grpo_advantages(r, gid), atol=1e-12)
    assert row["train/degenerate_share"] == pytest.approx(degenerate_share(r, gid))


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


def test_per_prompt_drift_runs_through_the_loop(tmp_path):
    # 8 problems, 8 per step, one token each: every problem comes back on the next step, and its
    # D(x) is then exactly the previous update's drift on its last response
    comp = tiny_components()
    comp.env_factory = lambda split: FirstTokenEnv(n=8, split=split)
    cfg = tiny_config(
        tmp_path,
        tracker={"drift": "per-prompt"},
        rollout={"max_in_flight": 8},
        train={"steps": 3, "checkpoint_every": 0, "mini_batches": 2},
    )
    train(cfg, run_dir=tmp_path / "run", components=comp)
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["step"] >= 1]
    assert len(steps) == 3 and all(r["tracker/drift"] > 0 for r in steps)
    assert steps[0]["tracker/drift_per_prompt_mean"] == 0.0  # first visits
    for prev, cur in zip(steps, steps[1:]):
        assert cur["tracker/drift_per_prompt_mean"] == pytest.approx(prev["tracker/drift"], rel=1e-3)


def test_compare_drift_logs_both_estimates_on_revisited_problems(tmp_path):
    comp = tiny_components()
    comp.env_factory = lambda split: FirstTokenEnv(n=10, split=split)  # 10 problems, 8 per step: revisits
    cfg = tiny_config(tmp_path, tracker={"compare_drift": True}, train={"steps": 3, "checkpoint_every": 0})
    train(cfg, run_dir=tmp_path / "run", components=comp)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[0]["tracker/drift_revisited"] == 0  # nothing seen before the first step
    later = [r for r in rows[1:] if r["tracker/drift_revisited"] > 0]
    assert later and all(
        r["tracker/drift_revisited_per_prompt"] > 0 and r["tracker/drift_revisited_cumulative"] > 0 for r in later
    )
    assert undocumented(set().union(*rows)) == []


def test_a_misspelt_sandbox_backend_fails_before_the_model_loads(tmp_path, monkeypatch):
    import spo_agents.training.components as components
    from spo_agents.errors import SandboxNotFound

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the sandbox backend was resolved")

    monkeypatch.setattr(components, "load_model", no_model)
    cfg = load_config(None, ["sandbox.backend=lokal", f"train.output_dir={tmp_path}", "logging.progress=false"])
    with pytest.raises(SandboxNotFound, match="Did you mean `local`"):
        components.build_components(cfg)


class HalfBrokenEnv(FirstTokenEnv):
    """The sandbox of every other problem is broken (an infrastructure error the env reports)."""

    def step(self, text):
        if int(self.pid.split("-")[1]) % 2:
            return "", 0.0, False, True, {"error": "sandbox failure: worker gone"}
        return super().step(text)


def test_steps_that_lose_many_episodes_to_the_infrastructure_are_reported_then_stop_the_run(tmp_path, capsys):
    from spo_agents.errors import RolloutError

    comp = tiny_components()
    comp.env_factory = lambda split: HalfBrokenEnv(split=split)
    cfg = tiny_config(tmp_path, train={"steps": 6, "checkpoint_every": 0}, rollout={"max_error_steps": 2})
    with pytest.raises(RolloutError, match="2 steps in a row"):
        train(cfg, run_dir=tmp_path / "run", components=comp)
    assert "failed for infrastructure reasons" in capsys.readouterr().err
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows and rows[0]["episode/infra_error_share"] > 0.25 and rows[0]["episode/rollout_errors"] > 0


def test_time_shares_split_the_rollout_wait_by_the_episodes_own_timings():
    from spo_agents.training.metrics import StepTimes, time_row

    row = {
        "episode/generate_s": 3.0,  # per episode: 3 s generating, 1 s in the sandbox
        "episode/sandbox_s": 1.0,
        "time/rollout_wait_s": 8.0,
        "time/learner_s": 2.0,
        "perf/generated_tokens": 50,
    }
    t = time_row(row, StepTimes(step_s=10.0, eval_s=0.0, checkpoint_s=0.5, elapsed_s=30.0))
    assert t["time/share_generate"] == pytest.approx(0.6) and t["time/share_sandbox"] == pytest.approx(0.2)
    assert t["time/share_learner"] == pytest.approx(0.2) and t["perf/tokens_per_s"] == pytest.approx(5.0)
    assert t["time/checkpoint_s"] == 0.5 and t["time/elapsed_s"] == 30.0
    assert undocumented(t) == []
    no_tools = time_row({**row, "episode/generate_s": 0.0, "episode/sandbox_s": 0.0}, StepTimes(10.0, 0.0, 0.0, 30.0))
    assert no_tools["time/share_generate"] == pytest.approx(0.8) and no_tools["time/share_sandbox"] == 0.0
