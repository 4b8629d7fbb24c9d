"""Checkpoints that are never half-written and never hold non-finite weights.

``SafeCheckpointIO`` is the Trainer's checkpoint plugin (``dewey-lab fit`` installs it): a
checkpoint is written to a temporary file in the same directory, fsynced, and renamed over the
target, so a SIGKILL at any moment leaves the previous checkpoint or the new one, never a torn
file. A checkpoint whose weights hold a NaN or an infinity is refused with one line, and the last
good one stays in place. Loading is weights-only, with our ``StudentConfig`` allowed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO


def non_finite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of floating-point tensors in ``state`` that hold a NaN or an infinity."""
    return [name for name, v in state.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


class SafeCheckpointIO(TorchCheckpointIO):
    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        from dewey_lab.model.student import StudentConfig

        with torch.serialization.safe_globals([StudentConfig]):  # our hparams dataclass; weights-only load
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        bad = non_finite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            raise RuntimeError(f"refusing to write checkpoint {path}: non-finite weights in {bad[0]} "
                               f"({len(bad)} tensors); the last good checkpoint is kept. Lower model.lr or "
                               "use trainer.precision bf16-mixed rather than 16-mixed")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fd = os.open(path.parent, os.O_RDONLY)  # the rename itself survives a power cut
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def peek_checkpoint(path) -> dict:
    """A checkpoint's contents with its tensors memory-mapped, not read: cheap for a look at its step, its
    run identity (``checkpoint["dewey_run"]``) or its pooling heads (``checkpoint["dewey_heads"]``: class path
    and init arguments per head, which ``DistillModule.on_load_checkpoint`` rebuilds before the weights load)
    however large the weights."""
    from dewey_lab.model.student import StudentConfig

    with torch.serialization.safe_globals([StudentConfig]):
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def start_checkpoint(spec: str) -> Path:
    """The checkpoint ``model.init_from`` names: a ``.ckpt``; a run directory (its ``checkpoints/last.ckpt``);
    or an experiment's run folder (``runs/tiny``: the newest finished run in it). One-line error otherwise."""
    import json

    path = Path(spec)
    if path.suffix == ".ckpt":
        if not path.is_file():
            raise FileNotFoundError(f"model.init_from: {spec} does not exist; train that run first")
        return path
    runs = [path] if (path / "run_info.json").is_file() else sorted(p for p in path.glob("*") if p.is_dir())
    finished = []
    for run in runs:
        try:
            info = json.loads((run / "run_info.json").read_text())
        except (OSError, ValueError):
            continue
        if info.get("finished") and (run / "checkpoints" / "last.ckpt").is_file():
            finished.append((info.get("started", ""), run))
    if not finished:
        raise FileNotFoundError(f"model.init_from: no finished run with checkpoints/last.ckpt under {spec}; train it "
                                "first (make train EXP=<its experiment>), or name a .ckpt")
    return max(finished)[1] / "checkpoints" / "last.ckpt"
