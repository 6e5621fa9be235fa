"""Weight-sync strategies against a recording fake server (call order, payloads, failures),
the client-side version gate, and the server-vs-learner log-prob check. The real vLLM server
is exercised by the `vllm`-marked tests in tests/vllm_server/."""

from __future__ import annotations

import asyncio
import random
import sys

import pytest

from spo_agents.errors import ConfigError, PolicyError
from spo_agents.rollout.policy.base import PolicyBackend
from spo_agents.serving.weight_sync import (
    LoraSync,
    NcclSync,
    ReloadSync,
    VersionGate,
    WeightSync,
    check_sync,
    learner_logprobs,
    make_weight_sync,
    publish,
)

torch = pytest.importorskip("torch")


class FakeEndpoint:
    """Records every call; answers like vLLM's dev-mode server unless told otherwise."""

    base_url = "http://fake:1"
    model = "base-model"

    def __init__(
        self,
        *,
        pause_404: bool = False,
        reset_success: bool = True,
        fail: str | None = None,
        prompt_logprobs: list | None = None,
    ) -> None:
        self.calls: list[tuple[str, str, object, object]] = []
        self.pause_404 = pause_404
        self.reset_success = reset_success
        self.fail = fail
        self.prompt_logprobs = prompt_logprobs

    def post(self, path, json=None, params=None, ok_404=False):
        self.calls.append(("POST", path, json, params))
        if path == self.fail:
            raise PolicyError(f"HTTP 500 on {path}")
        if path == "/pause" and self.pause_404:
            assert ok_404, "/pause must be probed with ok_404"
            return None
        if path == "/reset_prefix_cache":
            return {"success": self.reset_success}
        if path == "/v1/completions":
            return {"choices": [{"prompt_logprobs": self.prompt_logprobs}]}
        return {"status": "ok"}

    def get(self, path, **kw):
        self.calls.append(("GET", path, None, kw.get("params")))
        return {}

    def paths(self) -> list[str]:
        return [c[1] for c in self.calls]


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def tiny_peft(seed: int = 0):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(tiny_llama(seed), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


# ------------------------------------------------------------------------------------ reload
def test_reload_call_order_and_payload(tmp_path):
    ep = FakeEndpoint()
    sync = ReloadSync(ep, save_dir=tmp_path / "w")
    stats = sync.sync(tiny_llama(), 3)
    assert ep.paths() == ["/pause", "/collective_rpc", "/reset_prefix_cache", "/update_weight_version", "/resume"]
    assert ep.calls[0][3] == {"mode": "wait"}  # drain, never abort in-flight requests
    assert ep.calls[1][2] == {"method": "reload_weights", "kwargs": {"weights_path": str(tmp_path / "w")}}
    assert ep.calls[3][2] == {"new_version": "3"}
    assert stats.strategy == "reload" and stats.version == 3 and sync.version == 3
    assert stats.bytes > 0 and stats.total_s >= stats.save_s + stats.load_s
    assert sync.served_model == "base-model"


def test_reload_writes_every_weight_including_tied_lm_head(tmp_path):
    """save_pretrained drops the tied `lm_head.weight`; vLLM's in-place reload then keeps the
    old output embedding. The checkpoint we write must hold it, equal to the learner's."""
    from safetensors.torch import load_file

    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)
    ReloadSync(FakeEndpoint(), save_dir=tmp_path).sync(model, 1)
    saved = load_file(str(tmp_path / "model.safetensors"))
    expected = model.state_dict()
    assert set(saved) == set(expected) and "lm_head.weight" in saved
    for name, tensor in expected.items():
        assert torch.equal(saved[name], tensor), name
    assert (tmp_path / "config.json").is_file()
    assert not list(tmp_path.glob("*.tmp"))


def test_reload_without_server_pause_endpoint_probes_once(tmp_path):
    ep = FakeEndpoint(pause_404=True)
    sync = ReloadSync(ep, save_dir=tmp_path)
    sync.sync(tiny_llama(), 1)
    sync.sync(tiny_llama(), 2)
    assert ep.paths().count("/pause") == 1 and "/resume" not in ep.paths()
    assert ep.paths().count("/collective_rpc") == 2


def test_reload_failure_resumes_server_and_keeps_old_version(tmp_path):
    ep = FakeEndpoint(fail="/collective_rpc")
    sync = ReloadSync(ep, save_dir=tmp_path)
    with pytest.raises(PolicyError):
        sync.sync(tiny_llama(), 5)
    assert ep.paths()[-1] == "/resume" and "/reset_prefix_cache" not in ep.paths()
    assert sync.version is None


def test_prefix_cache_that_cannot_be_reset_is_an_error(tmp_path):
    ep = FakeEndpoint(reset_success=False)
    sync = ReloadSync(ep, save_dir=tmp_path)
    sync.reset_attempts = 3
    with pytest.raises(PolicyError, match="prefix cache"):
        sync.sync(tiny_llama(), 1)
    assert ep.paths().count("/reset_prefix_cache") == 3 and ep.paths()[-1] == "/resume"


def test_reload_refuses_a_peft_model(tmp_path):
    with pytest.raises(ConfigError, match="weight_sync: lora"):
        ReloadSync(FakeEndpoint(), save_dir=tmp_path).sync(tiny_peft(), 1)


def test_reload_default_dir_is_removed_on_close():
    sync = ReloadSync(FakeEndpoint())
    sync.sync(tiny_llama(), 1)
    assert (sync.save_dir / "model.safetensors").is_file()
    sync.close()
    sync.close()
    assert not sync.save_dir.exists()


# -------------------------------------------------------------------------------------- lora
def test_lora_loads_adapter_in_place_and_serves_it(tmp_path):
    ep = FakeEndpoint()
    sync = LoraSync(ep, lora_name="policy", save_dir=tmp_path)
    assert sync.served_model == "base-model"  # nothing loaded yet
    model = tiny_peft()
    sync.sync(model, 1)
    load = [c for c in ep.calls if c[1] == "/v1/load_lora_adapter"]
    assert load[0][2] == {"lora_name": "policy", "lora_path": str(tmp_path / "v1"), "load_inplace": True}
    assert (tmp_path / "v1" / "adapter_config.json").is_file()
    assert sync.served_model == "policy"
    stats = sync.sync(model, 2)
    assert stats.served_model == "policy" and stats.bytes > 0
    assert not (tmp_path / "v1").exists() and (tmp_path / "v2" / "adapter_model.safetensors").is_file()
    assert ep.paths()[-5:] == [
        "/pause",
        "/v1/load_lora_adapter",
        "/reset_prefix_cache",
        "/update_weight_version",
        "/resume",
    ]


def test_lora_refuses_a_full_model(tmp_path):
    with pytest.raises(ConfigError, match="model.lora.enabled"):
        LoraSync(FakeEndpoint(), save_dir=tmp_path).sync(tiny_llama(), 1)


# -------------------------------------------------------------------------------------- nccl
class FakeClient:
    def __init__(self, log):
        self.log = log

    def init_communicator(self, device):
        self.log.append(("init", device))

    def update_model_params(self, model):
        self.log.append(("update", sum(1 for _ in model.parameters())))

    def reset_prefix_cache(self):
        self.log.append(("reset",))

    def close_communicator(self):
        self.log.append(("close",))


def test_nccl_streams_a_sharded_learners_gathered_weights_from_the_sync_device():
    """A sharded learner pushes weights gathered on the CPU; NCCL sends from the sync's device,
    so each tensor is moved there as the client reads it."""
    from spo_agents.sharding import GatheredModel

    log: list = []

    class DeviceClient(FakeClient):
        def update_model_params(self, model):
            self.log.append(("update", sorted({p.device.type for p in model.parameters()})))

    model = tiny_llama()
    gathered = GatheredModel(model, {k: v.clone() for k, v in model.state_dict().items()})
    NcclSync(FakeEndpoint(), client=DeviceClient(log), device="meta").sync(gathered, 1)
    assert log[:2] == [("init", "meta"), ("update", ["meta"])]


def test_nccl_call_order_with_a_fake_client():
    log: list = []
    ep = FakeEndpoint()
    sync = NcclSync(ep, client=FakeClient(log), device="cuda:1")
    model = tiny_llama()
    sync.sync(model, 1)
    sync.sync(model, 2)
    n = sum(1 for _ in model.parameters())
    assert log == [("init", "cuda:1"), ("update", n), ("reset",), ("update", n), ("reset",)]
    assert ep.paths() == ["/pause", "/update_weight_version", "/resume"] * 2
    sync.close()
    sync.close()
    assert log[-1] == ("close",) and log.count(("close",)) == 1


def test_nccl_without_trl_vllm_says_what_to_use_instead(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl.generation.vllm_client", None)
    with pytest.raises(PolicyError, match="reload"):
        NcclSync(FakeEndpoint()).sync(tiny_llama(), 1)


def test_make_weight_sync_by_name(tmp_path):
    assert isinstance(make_weight_sync("reload", FakeEndpoint(), save_dir=tmp_path), ReloadSync)
    assert isinstance(make_weight_sync("lora", FakeEndpoint(), save_dir=tmp_path), LoraSync)
    assert isinstance(make_weight_sync("nccl", FakeEndpoint(), client=object()), NcclSync)
    with pytest.raises(ConfigError, match="Did you mean `reload`"):
        make_weight_sync("relaod", FakeEndpoint())


# ------------------------------------------------------------------------------- version gate
async def test_gate_pause_waits_for_in_flight_requests():
    gate = VersionGate(0)
    entered, release = asyncio.Event(), asyncio.Event()

    async def request():
        async with gate.request() as v:
            entered.set()
            await release.wait()
            return v

    task = asyncio.create_task(request())
    await entered.wait()
    pausing = asyncio.create_task(gate.pause())
    await asyncio.sleep(0.01)
    assert not pausing.done() and gate.in_flight == 1
    release.set()
    assert await task == 0
    await asyncio.wait_for(pausing, 1)
    late = asyncio.create_task(request())
    await asyncio.sleep(0.01)
    assert gate.in_flight == 0 and not late.done()  # held while paused
    gate.resume(7)
    assert await asyncio.wait_for(late, 1) == 7


class FakePolicy(PolicyBackend):
    """A policy whose requests wait on a simulated server; records what `publish` calls."""

    tokenizer = None

    def __init__(self, model: str = "base-model"):
        super().__init__()
        self.model = model
        self.log = []

    async def generate(self, prompt_ids, params):
        raise AssertionError("not called")

    async def pause(self):
        self.log.append("pause")
        await super().pause()

    def resume(self, version):
        self.log.append(("resume", version))
        super().resume(version)

    def set_served_model(self, name):
        self.model = name


class SimSync(WeightSync):
    """Runs `on_push(version)` as the push; `served_model` as given."""

    name = "sim"

    def __init__(self, on_push, served_model=None):
        self.on_push, self._served = on_push, served_model

    @property
    def served_model(self):
        return self._served

    async def push(self, model, version):
        return self.on_push(version)


async def test_no_request_is_attributed_to_the_wrong_version():
    """A simulated server whose weights change only in `push`; many requests with random
    durations race with repeated publishes. Every request must see, from start to end, the
    weights of the version it was handed."""
    rng = random.Random(0)
    policy = FakePolicy()
    served = {"version": 0}
    in_flight = {"n": 0}

    def push(version):
        assert in_flight["n"] == 0, "weights changed under a running request"
        served["version"] = version

    async def request():
        await asyncio.sleep(rng.random() * 0.05)
        async with policy._gate.request() as v:
            in_flight["n"] += 1
            seen = [served["version"]]
            await asyncio.sleep(rng.random() * 0.004)
            seen.append(served["version"])
            in_flight["n"] -= 1
            return v, seen

    async def trainer():
        for step in range(1, 16):
            await asyncio.sleep(rng.random() * 0.004)
            await publish(policy, SimSync(push), None, step)

    results = await asyncio.gather(trainer(), *[request() for _ in range(300)])
    outcomes = results[1:]
    assert all(seen == [v, v] for v, seen in outcomes)
    assert served["version"] == 15 and policy.version == 15
    assert len({v for v, _ in outcomes}) > 2  # the race really spanned several versions


async def test_publish_pushes_between_pause_and_resume_with_the_new_version():
    policy, log = FakePolicy(), []
    stats = await publish(policy, SimSync(lambda v: log.append(("push", v, policy.version)) or "stats"), None, 4)
    assert stats == "stats"
    assert log == [("push", 4, 0)] and policy.log == ["pause", ("resume", 4)] and policy.version == 4


async def test_publish_without_a_sync_reopens_the_shared_policy_at_the_new_version():
    policy = FakePolicy()
    assert await publish(policy, None, object(), 3) is None
    assert policy.log == ["pause", ("resume", 3)] and policy.version == 3 and policy.model == "base-model"


async def test_publish_points_the_policy_at_the_lora_adapter(tmp_path):
    policy = FakePolicy()
    await publish(policy, LoraSync(FakeEndpoint(), lora_name="adapter", save_dir=tmp_path), tiny_peft(), 1)
    assert policy.model == "adapter" and policy.version == 1


async def test_publish_failure_leaves_the_policy_paused():
    policy = FakePolicy()

    def broken(version):
        raise PolicyError("server gone")

    with pytest.raises(PolicyError):
        await publish(policy, SimSync(broken), None, 2)
    assert policy.log == ["pause"] and policy.version == 0 and policy._gate.paused


# ---------------------------------------------------------------------------- log-prob check
def test_learner_logprobs_are_teacher_forced_next_token_logprobs():
    model = tiny_llama()
    ids = [3, 9, 27, 5, 11]
    got = learner_logprobs(model, ids)
    logits = model(input_ids=torch.tensor([ids])).logits[0].detach()
    want = [torch.log_softmax(logits[i], -1)[ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert got == pytest.approx(want, abs=1e-6)


def test_check_sync_accepts_equal_and_rejects_different_logprobs():
    model = tiny_llama()
    ids = [3, 9, 27, 5]
    lp = learner_logprobs(model, ids)
    entries = [None] + [{str(t): {"logprob": x}} for t, x in zip(ids[1:], lp)]
    assert check_sync(model, FakeEndpoint(prompt_logprobs=entries), ids) < 1e-6
    entries[2] = {str(ids[2]): {"logprob": lp[1] + 0.01}}
    with pytest.raises(PolicyError, match="differ"):
        check_sync(model, FakeEndpoint(prompt_logprobs=entries), ids)
