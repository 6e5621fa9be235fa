"""Publishing the learner's weights to the rollout policy after every update (`publish`), and the
strategies that put them on a vLLM server (`rollout.weight_sync`: `reload`, `lora`, `nccl`) or in an
in-process vLLM engine. Why and how no request mixes two versions: docs/training.md, "Publishing weights".
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from spo_agents.errors import ConfigError, PolicyError, did_you_mean
from spo_agents.models import is_peft
from spo_agents.rollout.policy.base import VersionGate  # noqa: F401 (re-exported)
from spo_agents.rollout.runner import Gated
from spo_agents.serving.vllm_server import endpoint_of
from spo_agents.weight_labels import SET_ROUTE, label_body

if TYPE_CHECKING:
    from spo_agents.rollout.policy.vllm import VLLMPolicy

STRATEGIES = ("reload", "lora", "nccl")


@dataclass
class SyncStats:
    """What one sync did and how long each part took (seconds).

    `save_s`: writing weights / adapter to disk (0 for `nccl`); `load_s`: the server loading
    them (for `nccl`: streaming them); `reset_s`: prefix-cache reset; `pause_s`: server-side
    drain before the update; `bytes`: size written or streamed.
    """

    strategy: str
    version: int
    total_s: float
    save_s: float = 0.0
    load_s: float = 0.0
    reset_s: float = 0.0
    pause_s: float = 0.0
    bytes: int = 0
    served_model: str | None = None


def fast_tmp_dir(prefix: str) -> Path:
    """A fresh directory in `/dev/shm` (memory-backed) when writable, else the system temp dir."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


class WeightSync(abc.ABC):
    """Puts the learner's weights where the rollout policy generates from (`publish` drains the
    policy around it). `version` is the last pushed version; `served_model` the name requests must
    send as `model` afterwards (None: unchanged)."""

    name: ClassVar[str]
    version: int | None = None

    @property
    def served_model(self) -> str | None:
        return None

    @abc.abstractmethod
    async def push(self, model: Any, version: int) -> SyncStats:
        """Put `model`'s weights in place; returns once they serve every new request."""

    def close(self) -> None:
        """Release resources (temporary directories, communicators). Safe to call twice."""


class InProcessVLLMSync(WeightSync):
    """Loads the learner's weights into the in-process vLLM engine of a `VLLMPolicy` (GPU path)."""

    name = "vllm"

    def __init__(self, policy: VLLMPolicy) -> None:
        self.policy = policy

    async def push(self, model: Any, version: int) -> SyncStats:
        t0 = time.perf_counter()
        await self.policy.load_weights([(name, p.detach()) for name, p in model.state_dict().items()])
        self.version = int(version)
        return SyncStats(strategy=self.name, version=int(version), total_s=time.perf_counter() - t0)


class ServerSync(WeightSync):
    """Pushes to a vLLM server: `sync(model, version)` (blocking; `push` runs it off the event loop)
    returns only once the server serves `model`'s weights (prefix cache reset, version label set).
    Call it while no request is in flight (`publish` does). `served_model`: the base model for
    `reload` / `nccl`, the adapter for `lora`.
    """

    name: ClassVar[str]
    #: vLLM refuses a prefix-cache reset while running requests hold blocks: retries, 0.1 s apart.
    reset_attempts: int = 20

    def __init__(self, server: Any, *, server_pause: bool = True, label_version: bool = True) -> None:
        self.endpoint = endpoint_of(server)
        self.server_pause = server_pause
        self.label_version = label_version
        self.version: int | None = None
        self._pause_supported: bool | None = None

    @property
    def served_model(self) -> str | None:
        return self.endpoint.model

    async def push(self, model: Any, version: int) -> SyncStats:
        return await asyncio.to_thread(self.sync, model, version)

    @abc.abstractmethod
    def _update(self, model: Any, version: int, stats: SyncStats) -> None:
        """Put `model`'s weights on the server (fills the timing fields of `stats`)."""

    def _prepare(self, model: Any, version: int, stats: SyncStats) -> None:
        """Work that needs no server pause (saving to disk); runs before the pause."""

    def sync(self, model: Any, version: int) -> SyncStats:
        t0 = time.perf_counter()
        stats = SyncStats(strategy=self.name, version=int(version), total_s=0.0)
        self._prepare(model, version, stats)
        paused = self._pause(stats)
        try:
            self._update(model, version, stats)
            t = time.perf_counter()
            self._reset_prefix_cache()
            stats.reset_s = time.perf_counter() - t
            if self.label_version:
                self.endpoint.post(SET_ROUTE, label_body(version), ok_404=True)
        finally:
            if paused:
                self.endpoint.post("/resume")
        self.version = int(version)
        stats.served_model = self.served_model
        stats.total_s = time.perf_counter() - t0
        return stats

    def _pause(self, stats: SyncStats) -> bool:
        if not self.server_pause or self._pause_supported is False:
            return False
        t = time.perf_counter()
        answer = self.endpoint.post("/pause", params={"mode": "wait"}, ok_404=True)
        self._pause_supported = answer is not None
        stats.pause_s = time.perf_counter() - t
        return self._pause_supported

    def _reset_prefix_cache(self) -> None:
        """`POST /reset_prefix_cache`; vLLM answers `success: false` while running requests
        still hold cache blocks, so retry briefly, then fail: stale blocks would mix versions."""
        attempts = self.reset_attempts
        for _ in range(attempts):
            answer = self.endpoint.post("/reset_prefix_cache")
            if not isinstance(answer, dict) or answer.get("success", True):
                return
            time.sleep(0.1)
        raise PolicyError(
            f"the server at `{self.endpoint.base_url}` refused to reset its prefix cache "
            f"{attempts} times (requests still running). Pause the policy backend before syncing "
            "(`publish` does) so no request is in flight."
        )


class ReloadSync(ServerSync):
    """Full weights through the filesystem: safetensors + `reload_weights` + prefix-cache reset.

    `save_dir`: where the checkpoint is written (default: a fresh directory in `/dev/shm`),
    overwritten at each sync and removed by `close()` when we created it. The server reads it,
    so it must be on a filesystem the server sees (same machine, or shared storage).
    """

    name = "reload"

    def __init__(self, server: Any, *, save_dir: str | Path | None = None, **kw: Any) -> None:
        super().__init__(server, **kw)
        self._own_dir = save_dir is None
        self.save_dir = Path(save_dir) if save_dir is not None else fast_tmp_dir("spo-weights-")
        self.save_dir.mkdir(parents=True, exist_ok=True)

    def _prepare(self, model: Any, version: int, stats: SyncStats) -> None:
        if is_peft(model):
            raise ConfigError(
                "`rollout.weight_sync: reload` got a peft (LoRA) model; use `rollout.weight_sync: lora` "
                "to hot-load the adapter, or merge the adapter into the base model first"
            )
        t = time.perf_counter()
        stats.bytes = save_full_weights(model, self.save_dir)
        stats.save_s = time.perf_counter() - t

    def _update(self, model: Any, version: int, stats: SyncStats) -> None:
        t = time.perf_counter()
        self.endpoint.post(
            "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(self.save_dir)}}
        )
        stats.load_s = time.perf_counter() - t

    def close(self) -> None:
        if self._own_dir:
            shutil.rmtree(self.save_dir, ignore_errors=True)


def save_full_weights(model: Any, directory: str | Path) -> int:
    """Write every state-dict tensor of `model` (tied ones as separate copies) to
    `directory/model.safetensors`, plus `config.json` when the model has a config.
    Returns the bytes written. The file is written under a temporary name and renamed, so a
    reader never sees a half-written checkpoint."""
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    seen: set[tuple[int, int]] = set()
    tensors: dict[str, Any] = {}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            t = tensor.detach()
            key = (t.untyped_storage().data_ptr(), t.storage_offset())
            # safetensors refuses tensors sharing memory; tied weights get their own copy.
            t = t.clone() if key in seen or not t.is_contiguous() else t
            seen.add(key)
            tensors[name] = t.cpu()
    tmp = directory / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / "model.safetensors")
    for stale in directory.glob("model-*.safetensors"):  # a sharded copy from elsewhere
        stale.unlink()
    (directory / "model.safetensors.index.json").unlink(missing_ok=True)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(directory)
    return sum(t.numel() * t.element_size() for t in tensors.values())


class LoraSync(ServerSync):
    """LoRA adapters hot-loaded by name (`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`, `--enable-lora`).

    Each sync saves the adapter to `save_dir/v<version>`, loads it in place under `lora_name`,
    resets the prefix cache (the in-place adapter keeps its id, so cached blocks would be
    reused) and deletes the previous version's directory. The server's `--max-lora-rank` must
    be at least the adapter's rank.
    """

    name = "lora"

    def __init__(
        self, server: Any, *, lora_name: str = "spo-policy", save_dir: str | Path | None = None, **kw: Any
    ) -> None:
        super().__init__(server, **kw)
        self.lora_name = lora_name
        self._own_dir = save_dir is None
        self.save_dir = Path(save_dir) if save_dir is not None else fast_tmp_dir("spo-lora-")
        self.save_dir.mkdir(parents=True, exist_ok=True)
        self._current: Path | None = None
        self._pending: Path | None = None

    @property
    def served_model(self) -> str:
        return self.lora_name if self.version is not None else self.endpoint.model

    def _prepare(self, model: Any, version: int, stats: SyncStats) -> None:
        if not is_peft(model):
            raise ConfigError(
                "`rollout.weight_sync: lora` needs a peft model (set `model.lora.enabled: true`); "
                f"got `{type(model).__name__}`. For full fine-tuning use `rollout.weight_sync: reload`."
            )
        t = time.perf_counter()
        path = self.save_dir / f"v{int(version)}"
        if path.exists():
            shutil.rmtree(path)
        model.save_pretrained(str(path))
        stats.bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        self._pending = path
        stats.save_s = time.perf_counter() - t

    def _update(self, model: Any, version: int, stats: SyncStats) -> None:
        assert self._pending is not None
        t = time.perf_counter()
        self.endpoint.post(
            "/v1/load_lora_adapter",
            {"lora_name": self.lora_name, "lora_path": str(self._pending), "load_inplace": True},
        )
        stats.load_s = time.perf_counter() - t
        previous, self._current, self._pending = self._current, self._pending, None
        if previous is not None and previous != self._current:
            shutil.rmtree(previous, ignore_errors=True)

    def close(self) -> None:
        if self._own_dir:
            shutil.rmtree(self.save_dir, ignore_errors=True)


class NcclSync(ServerSync):
    """TRL's `VLLMClient` over vLLM's NCCL weight-transfer engine (CUDA only).

    The client is created lazily (`trl.generation.vllm_client.VLLMClient`, which needs `trl`
    and `vllm` installed next to the learner) and joins the server's weight-update group on
    `device`. `client` may be passed in (tests use a fake). Parameters are streamed in one
    update (`update_model_params`); peft models are refused (use `lora`).
    """

    name = "nccl"

    def __init__(
        self,
        server: Any,
        *,
        client: Any = None,
        device: str | int = "cuda",
        connection_timeout_s: float = 60.0,
        **kw: Any,
    ) -> None:
        super().__init__(server, **kw)
        self.device = device
        self.connection_timeout_s = connection_timeout_s
        self._client = client
        self._initialised = False

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                from trl.generation.vllm_client import VLLMClient
            except ImportError as e:
                raise PolicyError(
                    "`rollout.weight_sync: nccl` needs TRL's `VLLMClient` (`pip install trl vllm`) next to "
                    f"the learner and a CUDA GPU; import failed: {e}. Without a GPU use "
                    "`rollout.weight_sync: reload` or `lora`."
                ) from e
            self._client = VLLMClient(base_url=self.endpoint.base_url, connection_timeout=self.connection_timeout_s)
        if not self._initialised:
            self._client.init_communicator(device=self.device)
            self._initialised = True
        return self._client

    def _prepare(self, model: Any, version: int, stats: SyncStats) -> None:
        if is_peft(model):
            raise ConfigError(
                "`rollout.weight_sync: nccl` streams full weights; for a peft (LoRA) model use "
                "`rollout.weight_sync: lora`"
            )
        self.client  # noqa: B018 - connect before pausing the server

    def _update(self, model: Any, version: int, stats: SyncStats) -> None:
        from spo_agents.sharding import GatheredModel

        t = time.perf_counter()
        # a sharded learner's gathered weights are on the CPU; NCCL sends from the GPU
        self.client.update_model_params(model.on(self.device) if isinstance(model, GatheredModel) else model)
        stats.load_s = time.perf_counter() - t
        stats.bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def _reset_prefix_cache(self) -> None:
        self.client.reset_prefix_cache()

    def close(self) -> None:
        if self._client is not None and self._initialised:
            with contextlib.suppress(Exception):
                self._client.close_communicator()
            self._initialised = False


def make_weight_sync(strategy: str, server: Any, **options: Any) -> ServerSync:
    """The strategy named by `rollout.weight_sync` (`reload`, `lora` or `nccl`)."""
    classes: dict[str, Callable[..., ServerSync]] = {"reload": ReloadSync, "lora": LoraSync, "nccl": NcclSync}
    if strategy not in classes:
        raise ConfigError(
            f"`rollout.weight_sync` must be one of {', '.join(f'`{s}`' for s in STRATEGIES)}, got "
            f"`{strategy}`.{did_you_mean(strategy, STRATEGIES)}"
        )
    return classes[strategy](server, **options)


async def publish(policy: Gated, sync: WeightSync | None, model: Any, version: int) -> SyncStats | None:
    """Make `policy` generate with `model`'s weights, as `version`: drain it (`pause`), push the
    weights (`sync`; None when the policy shares the learner's module), tell it the served model's
    name (a `lora` sync serves the adapter) and reopen it (`resume(version)`). A failed push leaves
    the policy paused and raises: the served weights are then unknown. `policy` is anything gated
    like a policy: the trainer passes its collector, which gates the learner's client and the
    clients its episodes use (Ray actors' too)."""
    await policy.pause()
    stats = None
    if sync is not None:
        stats = await sync.push(model, version)
        if sync.served_model is not None:
            policy.set_served_model(sync.served_model)
    policy.resume(version)
    return stats


# re-exported: the check that a server serves the learner's weights
from spo_agents.serving.sync_check import check_sync, learner_logprobs, server_logprobs  # noqa: E402, F401
