"""Sharded learner (`train.sharding: fsdp`): FSDP2 with an fp32 master copy of the weights.

`shard_model` applies PyTorch's `fully_shard` to every decoder layer and then to the whole
model, over all ranks of the process group (one rank is allowed: a single GPU then gets the
master copy and the mixed precision without any sharding). What that gives:

- **Memory.** Each rank keeps `1 / world_size` of the weights, gradients and AdamW state; a
  layer's full weights exist only while it runs (all-gathered before, freed after).
- **Mixed precision with a master copy.** The weights and the optimiser state are fp32; each
  layer runs in `model.dtype` (`MixedPrecisionPolicy(param_dtype=...)`), and gradients are
  reduced in fp32. So an update of lr 1e-6 on a weight of 1e-2 is kept, which it is not when
  the weights themselves are bf16 (8 bits of mantissa).
- **The same update as one process.** Gradients are *summed* across ranks (divide factor 1):
  the learner already divides each rank's loss by the whole mini-batch's token count
  (`spo_agents.training.learner`), as the data-parallel path does. tests/test_distributed.py checks the
  2-process update against the 1-process one.

Every forward of a sharded model is a collective: all ranks must run the same number of
forwards in the same order. The learner pads its per-rank micro-batch lists to the same length
(`Learner._passes`), and the trainer has the other ranks join every gather of the full weights
(checkpoints, weight pushes) by sending them a `Gather` message (`spo_agents.training.follower`).

Full state dicts (`full_model_state`, `full_optimizer_state`) are gathered on rank 0 into CPU
memory; other ranks get empty dicts. Checkpoints hold the fp32 master weights, and a weight push
casts them to `model.dtype` first.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from spo_agents.errors import ConfigError
from spo_agents.models import torch_dtype


def is_sharded(model: Any) -> bool:
    """Whether `model` was wrapped by `fully_shard` (FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed support
        return False
    return isinstance(model, FSDPModule)


def _layer_classes(model: Any) -> set[str]:
    """Class names of the blocks to shard one by one: transformers' `_no_split_modules` (the
    decoder layers), looked up through a peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    if not names:
        raise ConfigError(
            f"`train.sharding: fsdp` cannot find the decoder layers of `{type(base).__name__}` "
            "(it has no `_no_split_modules`); use a transformers causal LM, or `train.sharding: none`"
        )
    return names


def shard_model(model: Any, *, compute_dtype: str, device_type: str) -> Any:
    """Shard `model` (fp32 weights, on CPU or already on the device) across the default process
    group with `fully_shard`: each decoder layer, then the root. Returns the same module."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise ConfigError(
            "`train.sharding: fsdp` needs a process group; start training through `spo_agents.training.loop.train`"
        )
    low = [n for n, p in model.named_parameters() if p.dtype != torch.float32]
    if low:
        raise ConfigError(
            f"`train.sharding: fsdp` keeps fp32 master weights; `{low[0]}` is {model.get_parameter(low[0]).dtype}. "
            "Load the model in float32"
        )
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch_dtype(compute_dtype), reduce_dtype=torch.float32)
    layers = _layer_classes(model)
    blocks = [m for m in model.modules() if type(m).__name__ in layers]
    if not blocks:
        raise ConfigError(f"`train.sharding: fsdp` found no module of class {sorted(layers)} in the model")
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    # The learner's loss is already normalised by the whole mini-batch: sum, do not average.
    # (Forced SUM also keeps gloo working, which has no pre-multiplied sum.) Both settings are
    # per sharded module, not inherited.
    for block in [*blocks, model]:
        block.set_gradient_divide_factor(1.0)
        block.set_force_sum_reduction_for_comms(True)
    return model


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def full_model_state(model: Any, dtype: str | None = None, *, trainable_only: bool = False) -> dict[str, Any]:
    """The whole unsharded state dict on rank 0 (CPU tensors, cast to `dtype` when given); an
    empty dict on the other ranks. `trainable_only` leaves out frozen weights (a LoRA base).
    A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(ignore_frozen_params=trainable_only))
    if trainable_only:  # a tied output layer is not a parameter of its own and slips through
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trainable}
    if dtype is not None:
        want = torch_dtype(dtype)
        state = {k: (v.to(want) if v.is_floating_point() else v) for k, v in state.items()}
    return state


def full_optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """The optimiser state, unsharded and keyed by parameter name, on rank 0 (collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_optimizer_state(model: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Load a `full_optimizer_state` dict (every rank passes the whole dict; collective)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def grad_norm_value(norm: Any) -> float:
    """`clip_grad_norm_`'s result as a float (a replicated DTensor for sharded gradients)."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if callable(full) else norm)


class GatheredModel:
    """Rank 0's stand-in for a sharded model where its whole weights are needed (checkpoints,
    weight pushes): `state_dict()`, `named_parameters()` and `parameters()` come from the gathered
    full state; `save_pretrained` writes that state through the model's own method (so a peft
    model still saves only its adapter); anything else (`config`, `peft_config`, ...) is the
    model's."""

    def __init__(self, model: Any, state: dict[str, Any], device: Any = None) -> None:
        self._model = model
        self._state = state
        self._device = device
        self._param_names = [n for n, _ in model.named_parameters()]

    def on(self, device: Any) -> GatheredModel:
        """The same weights, with `named_parameters()` / `parameters()` moving each tensor to
        `device` as it is read (the `nccl` weight sync streams from the GPU, one at a time)."""
        return GatheredModel(self._model, self._state, device)

    def state_dict(self) -> dict[str, Any]:
        return dict(self._state)

    def named_parameters(self) -> Iterator[tuple[str, Any]]:
        for name in self._param_names:
            if name in self._state:  # frozen weights are absent from a `trainable_only` gather
                t = self._state[name]
                yield name, t if self._device is None else t.to(self._device)

    def parameters(self) -> Iterator[Any]:
        for _, p in self.named_parameters():
            yield p

    def save_pretrained(self, path: Any, **kwargs: Any) -> Any:
        return self._model.save_pretrained(path, state_dict=self._state, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)
