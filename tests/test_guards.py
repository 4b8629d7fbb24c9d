"""Training guards: a non-finite loss or gradient skips its step (no update) and is counted, too
many stop the run with one line, and no checkpoint is ever written torn or with non-finite weights."""

import math

import lightning as L
import pytest
import torch

from dewey_lab.model.module import DistillModule
from dewey_lab.model.student import StudentConfig
from dewey_lab.resolve import OFFLINE_TEACHER
from dewey_lab.runs.checkpoint import SafeCheckpointIO
from tests.test_datamodule import CountingTeacher, _dm


@pytest.fixture(scope="module")
def counting_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("guard_cache")


class Sabotage(L.Callback):
    """NaN teacher targets at ``loss_steps``, an infinite gradient at ``grad_steps``; records
    whether the weights moved in each step."""

    def __init__(self, loss_steps=(), grad_steps=()):
        self.loss_steps, self.grad_steps, self.moved = set(loss_steps), set(grad_steps), {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before = [p.detach().clone() for p in module.parameters()]
        if trainer.global_step in self.loss_steps:
            batch["t_whole"][:] = math.nan

    def on_before_optimizer_step(self, trainer, module, optimizer):  # runs before the module's own hook
        if trainer.global_step in self.grad_steps:
            next(p for p in module.parameters() if p.grad is not None).grad[0] = math.inf

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = len(self.moved)
        self.moved[step] = any(not torch.equal(a, p) for a, p in zip(self.before, module.parameters()))


def _fit(small_corpus_path, cache, tmp_path, sabotage, steps=6, **module_kw):
    dm = _dm(small_corpus_path, cache, CountingTeacher(), max_length=96, batch_size=4)
    spec = StudentConfig(tokenizer=OFFLINE_TEACHER, config={"hidden_size": 32, "intermediate_size": 64,
                                                            "num_hidden_layers": 2, "num_attention_heads": 2})
    module = DistillModule(student=spec, warmup_steps=2, **module_kw)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path,
                        callbacks=[sabotage], plugins=[SafeCheckpointIO()], accelerator="cpu")
    trainer.fit(module, datamodule=dm)
    return module, trainer


def test_bad_steps_are_skipped_counted_and_leave_weights_finite(small_corpus_path, counting_cache, tmp_path):
    sabotage = Sabotage(loss_steps={1}, grad_steps={3})
    module, _ = _fit(small_corpus_path, counting_cache, tmp_path, sabotage)
    assert module.bad_steps == 2
    # the loss step returns no loss (Lightning runs no backward and no optimizer step), the gradient
    # step drops every gradient: neither moves a weight; every other step does (but step 0, whose
    # warmup learning rate is 0)
    assert sabotage.moved[1] is False and sabotage.moved[3] is False
    assert all(sabotage.moved[s] for s in sabotage.moved if s not in (0, 1, 3))
    assert all(torch.isfinite(p).all() for p in module.parameters())
    ckpt = next(tmp_path.rglob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=False)
    assert saved["dewey_lab"]["bad_steps"] == 2  # and a resumed run continues the count


def test_too_many_bad_steps_stop_the_run_with_the_fix(small_corpus_path, counting_cache, tmp_path):
    with pytest.raises(RuntimeError, match=r"limit model.max_bad_steps=1\).*Lower model.lr"):
        _fit(small_corpus_path, counting_cache, tmp_path, Sabotage(loss_steps={0, 2}), max_bad_steps=1)


def test_checkpoints_are_atomic_and_never_non_finite(tmp_path, monkeypatch):
    io = SafeCheckpointIO()
    path = tmp_path / "last.ckpt"
    good = {"state_dict": {"w": torch.ones(3)}, "global_step": 1}
    io.save_checkpoint(good, path)
    with pytest.raises(RuntimeError, match="non-finite weights in w.*last good checkpoint is kept"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, math.nan, 0.0])}}, path)
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(3))

    def torn(obj, f):  # a crash half-way through writing
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1  # the previous checkpoint, whole
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind
