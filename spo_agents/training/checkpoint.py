"""Checkpoints of a training run, written atomically.

Layout of a run directory::

    RUN_DIR/config.yaml                      the run's full config (written once, at the start)
    RUN_DIR/metrics.jsonl                    one JSON object per step (spo_agents.training.metrics)
    RUN_DIR/checkpoints/step-000010/
        model/                               `save_pretrained` of the policy (or model.pt)
        trainer_state.pt                     optimiser, scheduler, value tracker, sampler (RNG
                                             and position), step, Python/NumPy/torch RNG states
        checksums.json                       SHA-256 of every other file, verified on load
        meta.json                            step, wall time, written last inside the directory
    RUN_DIR/checkpoints/latest               name of the newest complete checkpoint

Atomicity: a checkpoint is built in a hidden temporary sibling (`.tmp-step-000010-*`), every file
is fsync'ed, the directory is renamed into place (one atomic `rename`), the parent directory is
fsync'ed, and only then `latest` is replaced (write a temp file, fsync, `os.replace`). A crash at
any point leaves either the previous checkpoint as `latest` or the new one, never a torn one;
leftover temporary directories are ignored and removed by the next save. Only the newest
`keep` checkpoints are kept, so a run needs disk room for `keep + 1` while one is written.

Resume takes the newest complete checkpoint (a crash between the rename and the `latest` update
loses nothing). Its files are checked against `checksums.json`; a damaged checkpoint is
reported and the next older one is used, and an error says what to do when none is intact.
A full disk during a save is a `CheckpointError` naming the directory and the space it needs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spo_agents.errors import CheckpointError
from spo_agents.files import fsync_path, fsync_tree, write_text_atomic

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d{6,})$")
CHECKSUMS = "checksums.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name not in (CHECKSUMS, "meta.json"))


def write_checksums(root: Path) -> None:
    sums = {str(p.relative_to(root)): _sha256(p) for p in _files(root)}
    (root / CHECKSUMS).write_text(json.dumps(sums, indent=1), encoding="utf-8")


def verify_checksums(root: Path) -> None:
    """Raise `CheckpointError` when a file of checkpoint `root` is missing or differs from its
    recorded SHA-256 (checkpoints written before checksums were recorded are not checked)."""
    listing = root / CHECKSUMS
    if not listing.is_file():
        return
    try:
        sums = json.loads(listing.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint `{root}`: `{CHECKSUMS}` is damaged ({e})") from e
    for rel, digest in sums.items():
        p = root / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint `{root}` is missing `{rel}`")
        if _sha256(p) != digest:
            raise CheckpointError(
                f"checkpoint `{root}`: `{rel}` does not match its recorded checksum (damaged on disk)"
            )


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    state: dict[str, Any]

    @property
    def model_dir(self) -> Path:
        return self.path / "model"


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch global RNG states (restored on resume)."""
    import numpy as np
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class CheckpointManager:
    """Saves, lists, loads and prunes the checkpoints of one run directory."""

    def __init__(self, run_dir: str | Path, keep: int = 2) -> None:
        if keep < 1:
            raise CheckpointError(f"`train.keep_checkpoints` must be >= 1, got {keep}")
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.keep = keep

    # -- listing ----------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and (p / "meta.json").is_file():
                out.append(int(m.group(1)))
        return sorted(out)

    def path_for(self, step: int) -> Path:
        return self.root / f"step-{step:06d}"

    def latest(self) -> Path | None:
        """The newest complete checkpoint (also when a crash left `latest` pointing at an older one)."""
        steps = self.steps()
        return self.path_for(steps[-1]) if steps else None

    # -- writing ----------------------------------------------------------------------------
    def save(self, step: int, *, model: Any, state: dict[str, Any], tokenizer: Any = None) -> Path:
        """Write checkpoint `step` atomically, point `latest` at it and prune old ones."""
        import torch

        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_temporaries()
        final = self.path_for(step)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=self.root))
        try:
            model_dir = tmp / "model"
            if hasattr(model, "save_pretrained"):
                model.save_pretrained(model_dir, safe_serialization=True)
            else:
                model_dir.mkdir()
                torch.save(model.state_dict(), model_dir / "model.pt")
            if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(model_dir)
            torch.save({**state, "step": step}, tmp / "trainer_state.pt")
            write_checksums(tmp)
            (tmp / "meta.json").write_text(json.dumps({"step": step, "time": time.time()}), encoding="utf-8")
            fsync_tree(tmp)
            if final.exists():  # a re-save of the same step (after a resume): replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_path(self.root)
        except BaseException as e:
            written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) if tmp.exists() else 0
            shutil.rmtree(tmp, ignore_errors=True)
            if _disk_full(e):
                raise CheckpointError(self._no_space(final, written)) from e
            raise
        write_text_atomic(self.root / "latest", final.name + "\n")
        self._prune()
        return final

    def _no_space(self, final: Path, written: int) -> str:
        previous = self.latest()
        size = sum(p.stat().st_size for p in previous.rglob("*") if p.is_file()) if previous is not None else written
        free = shutil.disk_usage(self.root).free
        return (
            f"the disk filled up while writing checkpoint `{final}` ({written / 1e9:.2f} GB written, "
            f"{free / 1e9:.2f} GB free now; a checkpoint of this run takes about {size / 1e9:.2f} GB). "
            "Free space or lower `train.keep_checkpoints`: "
            "keeping N checkpoints needs room for N + 1 while one is written"
        )

    def _remove_temporaries(self) -> None:
        for p in self.root.glob(".tmp-step-*"):
            shutil.rmtree(p, ignore_errors=True)

    def _prune(self) -> None:
        latest = self.latest()
        for step in self.steps()[: -self.keep]:
            p = self.path_for(step)
            if latest is not None and p == latest:
                continue
            shutil.rmtree(p, ignore_errors=True)

    # -- reading ----------------------------------------------------------------------------
    def load(self, path: str | Path | None = None) -> LoadedCheckpoint:
        """Load the trainer state of `path`; by default the newest intact checkpoint (a damaged
        one is reported and skipped)."""
        if path is not None:
            return self._load(Path(path))
        steps = self.steps()
        if not steps:
            raise CheckpointError(
                f"no checkpoint found under `{self.root}`; a run writes one every `train.checkpoint_every` "
                f"steps. Start a new run without `--resume`, or point `--resume` at a run directory that has one."
            )
        damaged = []
        for step in reversed(steps):
            try:
                return self._load(self.path_for(step))
            except CheckpointError as e:
                damaged.append(str(e))
                log.warning("%s; trying an older checkpoint", e)
        raise CheckpointError(
            "no intact checkpoint to resume from: "
            + "; ".join(damaged)
            + ". Start the run again without `--resume` (or with another `train.run_name`)"
        )

    def _load(self, p: Path) -> LoadedCheckpoint:
        import torch

        state_file = p / "trainer_state.pt"
        if not state_file.is_file() or not (p / "meta.json").is_file():
            raise CheckpointError(
                f"checkpoint `{p}` is incomplete (no `trainer_state.pt` or `meta.json`); "
                "delete it to fall back to an older one"
            )
        verify_checksums(p)
        try:
            state = torch.load(state_file, map_location="cpu", weights_only=False)
        except Exception as e:  # corrupt file: say which and what to do
            raise CheckpointError(
                f"cannot read `{state_file}`: {e}. Delete `{p}` to resume from an older checkpoint"
            ) from e
        return LoadedCheckpoint(path=p, step=int(state["step"]), state=state)

    @staticmethod
    def load_model_weights(model: Any, ckpt: LoadedCheckpoint) -> None:
        """Copy the checkpoint's weights into an already built `model` (same architecture)."""
        import torch

        d = ckpt.model_dir
        if (d / "model.pt").is_file():
            model.load_state_dict(torch.load(d / "model.pt", map_location="cpu"))
            return
        from safetensors.torch import load_file

        files = sorted(d.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                f"checkpoint `{ckpt.path}` holds no model weights (`model/*.safetensors` or `model/model.pt`)"
            )
        sd: dict[str, Any] = {}
        for f in files:
            sd.update(load_file(str(f)))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied embeddings
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint `{ckpt.path}` does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )


def _disk_full(e: BaseException) -> bool:
    """ENOSPC itself, or torch's serializer failing on a short write (it raises RuntimeError)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(e, RuntimeError) and "unexpected pos" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False
