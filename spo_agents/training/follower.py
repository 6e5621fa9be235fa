"""Ranks > 0 of a multi-process learner, and the messages rank 0 sends them.

Rank 0 runs rollouts, the tracker, evaluation, metrics and checkpoints; it broadcasts one
message per collective the other ranks must join: `Update` (score for per-prompt drift, then
update; gradients are summed inside `Learner.update`), `Gather` (a sharded model's full state,
for a weight push or a checkpoint) and `Stop`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from spo_agents.types import Trajectory


@dataclass(frozen=True)
class Update:
    """Score (per-prompt drift) and update with this batch."""

    trajectories: list[Trajectory]
    advantages: list[float]


@dataclass(frozen=True)
class Gather:
    """Join the gather of the sharded model: `weights` (in `model.dtype`, for a push) or `state`
    (fp32 weights and the learner's state, for a checkpoint)."""

    what: Literal["weights", "state"]


@dataclass(frozen=True)
class Stop:
    """The run is over."""


Message = Update | Gather | Stop


@dataclass(frozen=True)
class World:
    """This process's rank and the number of learner processes (0 and 1 without a process group)."""

    rank: int = 0
    size: int = 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def init_distributed(sharding: str, cuda: bool) -> int:
    """This process's rank when launched by torchrun / accelerate with `WORLD_SIZE` > 1, else -1.
    A single process with `train.sharding: fsdp` gets a process group of its own (FSDP needs
    one); it still counts as not distributed (-1)."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        if sharding == "fsdp" and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
        return -1
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank()


def broadcast(obj: Any, *, receive: bool = False) -> Any:
    """Rank 0 sends `obj` to every rank; the other ranks (`receive`) get it."""
    import torch.distributed as dist

    box = [None if receive else obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def send(msg: Message) -> None:
    broadcast(msg)


def receive() -> Message:
    msg = broadcast(None, receive=True)
    if not isinstance(msg, (Update, Gather, Stop)):
        raise TypeError(f"rank 0 sent {type(msg).__name__}, not a follower message")
    return msg


def gather(model: Any, learner: Any, what: Literal["weights", "state"], dtype: str) -> Any:
    """The sharded model's full state on rank 0 (`Gather`): `weights` -> its state in `dtype`;
    `state` -> (fp32 state, learner state). A collective: rank 0 first tells the followers."""
    from spo_agents.models import is_peft
    from spo_agents.sharding import full_model_state

    if world().distributed and world().leader:
        send(Gather(what))
    trainable_only = is_peft(model)  # an adapter's push or checkpoint needs only the adapter
    if what == "weights":
        return full_model_state(model, dtype, trainable_only=trainable_only)
    return full_model_state(model, trainable_only=trainable_only), learner.state_dict()


@dataclass
class Follower:
    """Does what rank 0 sends until `Stop`; `step` counts the updates done."""

    learner: Any
    model: Any
    dtype: str
    scores_drift: bool
    step: int = 0

    def run(self) -> int:
        while not isinstance(msg := receive(), Stop):
            if isinstance(msg, Update):
                if self.scores_drift:
                    self.learner.prompt_drift([t.problem_id for t in msg.trajectories])
                self.learner.update(msg.trajectories, msg.advantages)
                self.step += 1
            else:
                gather(self.model, self.learner, msg.what, self.dtype)
        return self.step
