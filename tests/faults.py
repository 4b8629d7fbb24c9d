"""Fault injection for tests/test_faults.py, imported by the processes those tests start and kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import yaml

from dewey_lab.cli import REPO
from dewey_lab.teacher import Teacher

TINY = str(REPO / "experiments" / "tiny.yaml")
# the processes a test starts import this module (faults.KillAt in a config): tests/ on their path
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent),
                                                   os.environ.get("PYTHONPATH", "")])}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit, no flush: what a pre-emption does


class KillAt(L.Callback):
    """SIGKILL this process at ``step`` (optimizer steps done): after the step (``batch_end``),
    between backward and the optimizer update (``before_optimizer``), or while a checkpoint is
    being assembled, before any byte of it lands (``checkpoint``)."""

    def __init__(self, step: int, where: str = "batch_end") -> None:
        self.step, self.where = step, where

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.where == "batch_end" and trainer.global_step == self.step:
            die()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.where == "before_optimizer" and trainer.global_step == self.step:
            die()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.where == "checkpoint" and trainer.global_step >= self.step:
            die()


class LoggingTeacher(Teacher):
    """Deterministic vectors from a text's bytes; appends every text it embeds to ``log`` (fsynced
    before it returns), so a test can count what was embedded twice across kills."""

    def __init__(self, log: str, dim: int = 12, delay: float = 0.02) -> None:
        self.log, self.dim, self.delay = log, dim, delay

    @property
    def fingerprint(self) -> str:
        return f"logging-{self.dim}"

    def encode(self, texts):
        time.sleep(self.delay)
        with open(self.log, "a", encoding="utf-8") as f:
            f.writelines(t.encode("utf-8", "surrogatepass").hex() + "\n" for t in texts)
            f.flush()
            os.fsync(f.fileno())
        return vectors_of(texts, self.dim)


def vectors_of(texts, dim: int = 12) -> np.ndarray:
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for i, t in enumerate(texts):
        raw = np.frombuffer(t.encode("utf-8", "surrogatepass"), dtype=np.uint8).astype(np.float32)
        for j in range(dim):
            out[i, j] = raw[j::dim].sum() % 97 - 48
        out[i] /= max(1e-6, float(np.linalg.norm(out[i])))
    return out


def write_yaml(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def run_fit(cwd: Path, *configs: str, resume: bool = False) -> subprocess.CompletedProcess:
    """``dewey-lab fit -c tiny.yaml -c <configs>...`` in a process of its own (``--ckpt_path last`` if resume)."""
    cmd = [sys.executable, "-m", "dewey_lab.cli", "fit", "-c", TINY, *(a for c in configs for a in ("-c", c))]
    return subprocess.run(cmd + (["--ckpt_path", "last"] if resume else []), cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600, check=False)


def loss_curve(run_dir: Path) -> dict[int, float]:
    """train/loss by step over every event file of the run, later files winning (a resumed run
    re-logs the steps after its checkpoint)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[int, float] = {}
    for event in sorted(run_dir.rglob("events.out.tfevents*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(event))
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            out.update({e.step: e.value for e in acc.Scalars("train/loss")})
    return out
