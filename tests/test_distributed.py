"""Multi-process learner on CPU: a 2-process update (torchrun, gloo) equals the 1-process update.

Every rank receives the whole batch; the learner trains each rank on its share of every
mini-batch with the global token normaliser and sums gradients across ranks before clipping
(`spo_agents.training.learner`), whether each rank holds the whole model (`train.sharding: none`) or
an FSDP2 shard of it (`fsdp`, `spo_agents.sharding`). This file is also the worker: `torchrun
--nproc_per_node 2 tests/test_distributed.py OUT_DIR` writes rank 0's updated parameters and
gradient to OUT_DIR.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

LR = 1e-4


def torchrun(script_args: list[str], env: dict[str, str], *, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """This file on 2 processes, under `torchrun` or `accelerate launch` (which, with
    `--multi_gpu` and no GPU, starts gloo ranks on the CPU the same way)."""
    if launcher == "accelerate":
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(port),
        ]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            "127.0.0.1:0",
        ]
    return subprocess.run(
        [*cmd, __file__, *script_args],
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def make_batch():
    import torch

    from spo_agents.types import Trajectory

    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(6):
        p = torch.randint(10, 5000, (3 + i % 3,), generator=g).tolist()
        r = torch.randint(10, 5000, (4 + i,), generator=g).tolist()
        lp = (-torch.rand(len(r), generator=g) * 3 - 8).tolist()  # behaviour log-probs near a random model's
        mask = [1] * len(r)
        mask[1] = 0
        lp[1] = 0.0
        out.append(
            Trajectory(
                problem_id=f"p{i}",
                env_id="fake",
                prompt_ids=p,
                token_ids=r,
                loss_mask=mask,
                logprobs=lp,
                reward=float(i % 2),
            )
        )
    adv = [1.0, -1.0, 0.5, -0.5, 1.5, -1.5]
    return out, adv


def flat(model, state=None):
    """All parameters, in `named_parameters` order, as one vector (from `state` when given)."""
    import torch

    if state is None:
        return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    return torch.cat([state[n].reshape(-1).float() for n, _ in model.named_parameters()])


def run_update(
    out_dir: Path, mini_batches: int, sharding: str = "none", dtype: str = "float32", lr: float = LR
) -> None:
    """Build the tiny model, update it once on the batch, save params and summed gradients.
    `dtype`: the compute dtype when sharded, the weights' dtype otherwise."""
    import torch
    from transformers import AutoModelForCausalLM

    from spo_agents.models import tiny_model_dir
    from spo_agents.sharding import full_model_state, shard_model
    from spo_agents.training.learner import Learner, LearnerSettings

    sharded = sharding == "fsdp"
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir(), dtype=torch.float32 if sharded else getattr(torch, dtype)
    )
    init = flat(model)
    if sharded:
        shard_model(model, compute_dtype=dtype, device_type="cpu")
    learner = Learner(model, LearnerSettings(lr=lr, mini_batches=mini_batches, micro_batch_tokens=24), pad_id=2)
    assert learner.sharded == sharded
    grads: list[torch.Tensor] = []

    def full(g):
        return g.full_tensor() if hasattr(g, "full_tensor") else g

    def record(optimizer, args, kwargs):
        grads.append(torch.cat([full(p.grad).reshape(-1).float().clone() for p in model.parameters()]))

    learner.optimizer.register_step_pre_hook(record)
    trajs, adv = make_batch()
    stats = learner.update(trajs, adv)
    state = full_model_state(model) if sharded else None  # a collective; rank 0 gets it all
    dtypes = {str(p.dtype) for p in model.parameters()}
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        params = flat(model, state)
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "init": init,
                "params": params,
                "grads": grads,
                "loss": stats.loss,
                "drift": stats.drift,
                "tokens": stats.tokens,
                "dtypes": dtypes,
            },
            out_dir / "update.pt",
        )


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["none", "fsdp"])
@pytest.mark.parametrize("mini_batches", [1, 2])
def test_two_process_update_equals_one_process_update(tmp_path, mini_batches, sharding):
    import torch

    single = tmp_path / "single"
    run_update(single, mini_batches)  # one process, whole model, no process group
    proc = torchrun([str(tmp_path / "dist")], {"SPO_MINI_BATCHES": str(mini_batches), "SPO_SHARDING": sharding})
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(single / "update.pt")
    b = torch.load(tmp_path / "dist" / "update.pt")
    assert b["dtypes"] == {"torch.float32"}
    assert len(a["grads"]) == len(b["grads"]) == mini_batches
    for ga, gb in zip(a["grads"], b["grads"]):
        scale = float(ga.abs().max())
        assert scale > 0
        assert torch.allclose(ga, gb, atol=1e-5 * scale, rtol=1e-4)
    # Adam divides by sqrt(v): elements whose gradient is float noise can move by up to lr.
    diff = (a["params"] - b["params"]).abs()
    assert float(diff.max()) <= 2 * LR
    assert float((diff > 1e-3 * LR).float().mean()) < 1e-3
    assert float((a["params"] - a["init"]).abs().max()) > 0.5 * LR  # the update did move the weights
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    assert a["drift"] == pytest.approx(b["drift"], rel=1e-3)
    assert a["tokens"] == b["tokens"]


def test_sharded_bf16_keeps_the_small_updates_that_bf16_weights_round_away(tmp_path):
    """At the paper's lr (1e-6) AdamW's first step moves each weight by about lr. bf16 weights
    (8 mantissa bits, steps of ~1e-4 at |w| ~ 0.02) round that away; the sharded learner with
    bf16 compute keeps fp32 master weights (one process, its own process group) and moves them
    as the fp32 learner does."""
    import torch

    lr = 1e-6
    run_update(tmp_path / "fp32", 1, lr=lr)
    with pytest.warns(UserWarning, match="without an fp32 master copy"):
        run_update(tmp_path / "bf16", 1, dtype="bfloat16", lr=lr)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPO_DIST_MODE": "single-bf16", "SPO_LR": str(lr)}
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path / "sharded")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, plain, sharded = (torch.load(tmp_path / d / "update.pt") for d in ("fp32", "bf16", "sharded"))
    assert sharded["dtypes"] == {"torch.float32"} and plain["dtypes"] == {"torch.bfloat16"}

    def moved(u: dict) -> torch.Tensor:
        return (u["params"] - u["init"]).abs() > 0.1 * lr

    assert float(moved(ref).float().mean()) > 0.5
    assert float(moved(plain).float().mean()) < 0.05  # only weights near 0 (measured: 1.8%)
    both = moved(ref)
    print(
        f"weights moved: fp32 {float(moved(ref).float().mean()):.3f}, bf16 {float(moved(plain).float().mean()):.3f}, "
        f"sharded bf16 compute {float(moved(sharded).float().mean()):.3f}"
    )
    assert float((moved(sharded) & both).float().sum() / both.float().sum()) > 0.9
    du, dv = ref["params"] - ref["init"], sharded["params"] - sharded["init"]
    assert float(torch.nn.functional.cosine_similarity(du, dv, dim=0)) > 0.9  # bf16 compute, same direction


def test_one_process_sharded_training_generates_in_place_and_resumes(tmp_path):
    """`train.sharding: fsdp` on one process with the in-place `hf` policy and bf16 compute:
    the policy generates through the sharded module, the weights stay fp32 and move, the
    checkpoint holds them in fp32, and a resume restores the optimiser state. `train` makes
    the one-rank process group and removes it."""
    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).parent))
    import training_fixtures as T

    from spo_agents.config import Config, from_dict, to_dict
    from spo_agents.sharding import is_sharded
    from spo_agents.training.loop import train

    cfg = T.tiny_config(
        tmp_path, model={"dtype": "bfloat16"}, train={"steps": 2, "mini_batches": 2, "sharding": "fsdp"}
    )
    comp = T.tiny_components()
    before = T.weights(comp.model)
    res = train(cfg, run_dir=tmp_path / "run", components=comp)
    assert res.step == 2 and is_sharded(comp.model)
    assert not torch.distributed.is_initialized()
    assert {p.dtype for p in comp.model.parameters()} == {torch.float32}
    after = torch.cat([p.detach().full_tensor().reshape(-1).cpu() for p in comp.model.parameters()])
    assert float((after - before).abs().max()) > 1e-4
    ck = tmp_path / "run" / "checkpoints" / "step-000002"
    saved = load_file(str(ck / "model" / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert torch.equal(
        saved["model.norm.weight"], dict(comp.model.named_parameters())["model.norm.weight"].full_tensor().cpu()
    )

    more = from_dict(Config, {**to_dict(cfg), "train": {**to_dict(cfg)["train"], "steps": 3}})
    res = train(more, run_dir=tmp_path / "run", resume=True, components=T.tiny_components())
    assert res.step == 3
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-000003" / "trainer_state.pt", weights_only=False)
    assert {int(v["step"]) for v in state["learner"]["optimizer"]["state"].values()} == {6}

    with pytest.raises(Exception, match="train.sharding=fsdp"):  # the optimiser state's format is checked
        train(
            from_dict(Config, {**to_dict(more), "train": {**to_dict(more)["train"], "steps": 4, "sharding": "none"}}),
            run_dir=tmp_path / "run",
            resume=True,
            components=T.tiny_components(),
        )


def test_load_model_for_sharding_keeps_fp32_weights_on_the_cpu():
    """`train.sharding: fsdp` loads the fp32 master weights whatever `model.dtype` says (that is
    the compute dtype) and leaves them on the CPU for `shard_model` to place."""
    import torch

    from spo_agents.config import Config, from_dict
    from spo_agents.models import tiny_model_dir
    from spo_agents.training.components import load_model

    data = {"model": {"name": str(tiny_model_dir()), "dtype": "bfloat16", "device": "cpu"}}
    plain, _ = load_model(from_dict(Config, data))
    sharded, _ = load_model(from_dict(Config, {**data, "train": {"sharding": "fsdp"}}))
    assert {p.dtype for p in plain.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in sharded.parameters()} == {torch.float32}
    assert {p.device.type for p in sharded.parameters()} == {"cpu"}


def test_sharding_refuses_what_it_cannot_do():
    import torch

    from spo_agents.errors import ConfigError
    from spo_agents.sharding import shard_model
    from spo_agents.training.learner import Learner, LearnerSettings

    with pytest.raises(ConfigError, match="needs a process group"):
        shard_model(torch.nn.Linear(2, 2), compute_dtype="bfloat16", device_type="cpu")
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ConfigError, match="fp32 master weights"):
            shard_model(torch.nn.Linear(2, 2).to(torch.bfloat16), compute_dtype="bfloat16", device_type="cpu")
        with pytest.raises(ConfigError, match="cannot find the decoder layers"):
            shard_model(torch.nn.Linear(2, 2), compute_dtype="bfloat16", device_type="cpu")
        from transformers import AutoModelForCausalLM

        from spo_agents.models import tiny_model_dir

        model = shard_model(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir()), compute_dtype="float32", device_type="cpu"
        )
        with pytest.raises(ConfigError, match="kl_coef"):
            Learner(model, LearnerSettings(kl_coef=0.1), pad_id=2)
    finally:
        torch.distributed.destroy_process_group()


def test_sharding_on_several_processes_refuses_the_in_place_policy(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    import training_fixtures as T

    from spo_agents.errors import ConfigError
    from spo_agents.training.follower import World
    from spo_agents.training.loop import Trainer

    t = Trainer(T.tiny_config(tmp_path, train={"sharding": "fsdp"}), tmp_path / "run", T.tiny_components())
    t.world = World(rank=0, size=2)  # as rank 0 of two would see it
    with pytest.raises(ConfigError, match="use `rollout.backend: vllm-server` or `vllm`"):
        t._setup()


@pytest.mark.parametrize("variant", ["lora", "gradient-checkpointing"])
def test_sharding_with_lora_or_gradient_checkpointing(tmp_path, variant):
    """LoRA: only the adapters train, the gather for a push or checkpoint holds only them, and
    the adapter saved from it equals the learner's. Gradient checkpointing: the sharded update
    is the one without it."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from spo_agents.models import is_peft, tiny_model_dir
    from spo_agents.sharding import GatheredModel, full_model_state, shard_model
    from spo_agents.training.learner import Learner, LearnerSettings

    trajs, adv = make_batch()
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        runs = []
        for checkpointing in [False] if variant == "lora" else [False, True]:
            model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32)
            if variant == "lora":
                from peft import LoraConfig, get_peft_model

                model = get_peft_model(
                    model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
                )
            if checkpointing:
                (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
            shard_model(model, compute_dtype="float32", device_type="cpu")
            learner = Learner(model, LearnerSettings(lr=1e-3, micro_batch_tokens=24), pad_id=2)
            learner.update(trajs, adv)
            runs.append((model, full_model_state(model, trainable_only=variant == "lora")))
    finally:
        torch.distributed.destroy_process_group()
    model, state = runs[0]
    if variant == "lora":
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and set(state) == trainable and all("lora_" in n for n in state)
        gathered = GatheredModel(model, state)
        assert is_peft(gathered)
        gathered.save_pretrained(tmp_path / "adapter")
        saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
        assert len(saved) == len(state)
        for name, value in saved.items():  # peft drops the adapter name from the keys
            match = [v for k, v in state.items() if k.replace(".default", "") == name]
            assert len(match) == 1 and torch.equal(match[0], value), name
    else:
        (_, a), (_, b) = runs
        assert set(a) == set(b)
        for name in a:
            assert torch.allclose(a[name], b[name], atol=1e-6), name


def copy_sync(target):
    """Stands in for a server's `reload`: copies each pushed state into the rollout model."""
    from spo_agents.serving.weight_sync import WeightSync

    class CopySync(WeightSync):
        name = "copy"

        def __init__(self) -> None:
            self.target, self.versions = target, []

        async def push(self, model, version):
            self.target.load_state_dict(model.state_dict())
            self.versions.append(version)

    return CopySync()


def run_loop(out_dir: Path, sharding: str = "none", steps: int = 2, resume: bool = False) -> None:
    """The whole training loop under torchrun: rank 0 collects and broadcasts, all ranks update.
    Sharded, rank 0 generates with a separate copy of the model that receives every weight push
    (as a server would)."""
    import copy

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    import training_fixtures as T

    from spo_agents.rollout.policy.hf import HFPolicy
    from spo_agents.sharding import full_model_state
    from spo_agents.training.loop import train

    cfg = T.tiny_config(
        out_dir,
        train={"steps": steps, "batch_size": 8, "checkpoint_every": 1, "mini_batches": 2, "sharding": sharding},
        tracker={"drift": os.environ.get("SPO_DRIFT", "cumulative")},
    )
    comp = T.tiny_components()
    sync = None
    if sharding == "fsdp":
        served = copy.deepcopy(comp.model)
        comp.policy = HFPolicy(model=served, tokenizer=comp.tokenizer)
        comp.weight_sync = sync = copy_sync(served)
        comp.inplace, comp.closers = False, [comp.policy.close]
    res = train(cfg, run_dir=out_dir / "run", components=comp, resume=resume)
    state = full_model_state(comp.model) if sharding == "fsdp" else None  # a collective
    rank = torch.distributed.get_rank()
    if state is None:
        out = {"weights": T.weights(comp.model), "step": res.step}
    else:  # rank 0 holds the gathered weights, the others a shard
        out = {"weights": flat(comp.model, state) if rank == 0 else None, "step": res.step}
    if sync is not None and rank == 0:
        out["served"], out["versions"] = flat(sync.target), sync.versions
    torch.save(out, out_dir / f"rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("drift", ["cumulative", "per-prompt"])
def test_two_process_training_loop_keeps_ranks_in_sync(tmp_path, drift):
    """Per-prompt drift re-scores stored responses on every rank, in step with rank 0."""
    import torch

    proc = torchrun([str(tmp_path)], {"SPO_DIST_MODE": "loop", "SPO_DRIFT": drift})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["step"] == r1["step"] == 2
    assert torch.equal(r0["weights"], r1["weights"])
    from spo_agents.training.metrics import read_metrics

    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-000002"


@pytest.mark.slow
def test_two_process_sharded_loop_pushes_checkpoints_and_resumes(tmp_path):
    """`train.sharding: fsdp` on 2 processes: every step's weights reach the rollout model, the
    checkpoint holds the gathered fp32 weights and the optimiser state, and a resume continues
    with that optimiser state."""
    import torch
    from safetensors.torch import load_file

    from spo_agents.training.metrics import read_metrics

    proc = torchrun([str(tmp_path)], {"SPO_DIST_MODE": "loop", "SPO_SHARDING": "fsdp"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt")
    assert r0["step"] == 2 and r0["versions"] == [1, 2]
    assert torch.equal(r0["served"], r0["weights"])  # the rollout model serves the learner's weights
    ck = tmp_path / "run" / "checkpoints" / "step-000002"
    saved = load_file(str(ck / "model" / "model.safetensors"))
    assert {str(t.dtype) for t in saved.values()} == {"torch.float32"}
    after2 = r0["weights"]
    state = torch.load(ck / "trainer_state.pt", weights_only=False)
    assert state["learner"]["optimizer_format"] == "fsdp-full"
    adam = state["learner"]["optimizer"]["state"]
    assert adam and {int(v["step"]) for v in adam.values()} == {4}  # 2 steps x 2 mini-batches

    # the resume goes through `accelerate launch`, as the multi-GPU command in docs/training.md does
    proc = torchrun(
        [str(tmp_path)],
        {"SPO_DIST_MODE": "loop", "SPO_SHARDING": "fsdp", "SPO_STEPS": "3", "SPO_RESUME": "1"},
        launcher="accelerate",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt")
    assert r0["step"] == 3 and r0["versions"] == [2, 3]  # the resumed run pushes the checkpoint first
    assert not torch.equal(r0["weights"], after2)
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-000003" / "trainer_state.pt", weights_only=False)
    assert {int(v["step"]) for v in state["learner"]["optimizer"]["state"].values()} == {6}  # restored, then 2 more


if __name__ == "__main__":
    import torch

    mode = os.environ.get("SPO_DIST_MODE")
    if mode == "loop":  # `train` initialises the process group itself
        run_loop(
            Path(sys.argv[1]),
            os.environ.get("SPO_SHARDING", "none"),
            int(os.environ.get("SPO_STEPS", "2")),
            bool(os.environ.get("SPO_RESUME")),
        )
    elif mode == "single-bf16":  # one process, its own group: the sharded learner in bf16 compute
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
        run_update(Path(sys.argv[1]), 1, sharding="fsdp", dtype="bfloat16", lr=float(os.environ["SPO_LR"]))
    else:
        torch.distributed.init_process_group("gloo")
        run_update(
            Path(sys.argv[1]),
            int(os.environ.get("SPO_MINI_BATCHES", "1")),
            sharding=os.environ.get("SPO_SHARDING", "none"),
        )
    torch.distributed.destroy_process_group()


def test_a_follower_updates_joins_gathers_and_stops_as_rank_0_says(monkeypatch):
    """The follower's side of the protocol without processes: what rank 0 sends is replayed."""
    import spo_agents.training.follower as fw

    class FakeLearner:
        def __init__(self):
            self.calls = []

        def prompt_drift(self, pids):
            self.calls.append(("drift", pids))

        def update(self, trajs, adv):
            self.calls.append(("update", [t.problem_id for t in trajs], adv))

    class T:
        def __init__(self, pid):
            self.problem_id = pid

    sent = [fw.Update([T("a"), T("b")], [0.5, -0.5]), fw.Gather("weights"), fw.Update([T("c")], [0.0]), fw.Stop()]
    gathered = []
    monkeypatch.setattr(fw, "receive", lambda: sent.pop(0))
    monkeypatch.setattr(fw, "gather", lambda model, learner, what, dtype: gathered.append((what, dtype)))
    learner = FakeLearner()
    assert fw.Follower(learner, object(), "bfloat16", scores_drift=True, step=3).run() == 5
    assert learner.calls == [
        ("drift", ["a", "b"]),
        ("update", ["a", "b"], [0.5, -0.5]),
        ("drift", ["c"]),
        ("update", ["c"], [0.0]),
    ]
    assert gathered == [("weights", "bfloat16")] and sent == []


def test_a_follower_refuses_what_is_not_a_follower_message(monkeypatch):
    import spo_agents.training.follower as fw

    monkeypatch.setattr(fw, "broadcast", lambda obj, receive=False: ("update", [], []))
    with pytest.raises(TypeError, match="not a follower message"):
        fw.receive()
