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
from dewey_lab.data.teacher import Teacher

TINY = str(REPO / "experiments" / "tiny.yaml")
# the processes a test starts import this module (faults.KillAt in a config): tests/ on their path
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent),
                                                   os.environ.get("PYTHONPATH", "")])}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit, no flush: what a pre-emption does


class KillAt(L.Callback):
    """SIGKILL this process at ``step`` (optimizer steps done): after the step (``batch_end``),
    between backward and the optimizer update (``before_optimizer``), or while a checkpoint is
    being assembled, before any byte of it lands (``checkpoint``).

    The kill comes from the environment (``DEWEY_KILL_AT=<step>:<where>``, which ``run_fit(kill=...)``
    sets), not from the config: a killed run is resumed with the very config it ran with, as a user
    reruns the same command, so ``--ckpt_path last`` finds a checkpoint of the same run identity."""

    def __init__(self) -> None:
        step, _, where = os.environ.get("DEWEY_KILL_AT", "-1:").partition(":")
        self.step, self.where = int(step), where or "batch_end"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.where == "batch_end" and trainer.global_step == self.step:
            die()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.where == "before_optimizer" and trainer.global_step == self.step:
            die()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.where == "checkpoint" and trainer.global_step >= self.step:
            die()


class RaiseAt(L.Callback):
    """Raise ``RuntimeError`` at the end of step ``DEWEY_RAISE_AT`` (from the environment, so the resumed
    run keeps the config it crashed with): a crash inside training, not a kill."""

    def __init__(self) -> None:
        self.step = int(os.environ.get("DEWEY_RAISE_AT", "-1"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"injected failure at step {self.step}")


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


KILLABLE = {"trainer": {"callbacks": [{"class_path": "faults.KillAt"}]}}  # a config's callbacks, killable


def run_fit(cwd: Path, *configs: str, resume: bool = False, kill: str | None = None) -> subprocess.CompletedProcess:
    """``dewey-lab fit -c tiny.yaml -c <configs>...`` in a process of its own (``--ckpt_path last`` if resume);
    ``kill="<step>:<where>"`` arms the configs' ``faults.KillAt``."""
    cmd = [sys.executable, "-m", "dewey_lab.cli", "fit", "-c", TINY, *(a for c in configs for a in ("-c", c))]
    env = {**ENV, "DEWEY_KILL_AT": kill} if kill else ENV
    return subprocess.run(cmd + (["--ckpt_path", "last"] if resume else []), cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


def fit_here(*configs: str) -> None:
    """``dewey-lab fit -c tiny.yaml -c <configs>...`` in this process: for the reference run nobody kills
    (a process of its own costs ~10 s of imports on 2 cores)."""
    from dewey_lab.cli import main

    main(["fit", "-c", TINY, *(a for c in configs for a in ("-c", c))])


def in_process(cmd: list[str]) -> int:
    """The sweep's launcher in this process: ``python -m dewey_lab.cli fit ...`` -> ``main(["fit", ...])``.
    A process each costs ~10 s of imports here; what runs in it is the same ``main``."""
    from dewey_lab.cli import main

    assert cmd[1:3] == ["-m", "dewey_lab.cli"]
    try:
        main(cmd[3:])
    except SystemExit as exit_info:
        return exit_info.code or 0
    return 0


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
