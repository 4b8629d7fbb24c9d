"""DistillModule: one student forward pass, three kinds of embeddings, weighted loss terms.

From one pass over a window the student yields the whole-text embedding (``whole_pooling``,
CLS by default) and one embedding per chunk (``chunk_pooling``, the mean of the chunk's
tokens); a shared projection maps them to the teacher's dimension. Each loss term compares them
with the teacher's vectors, read from the cache by the data module.

Every checkpoint records each head's class path and init arguments (``checkpoint["dewey_heads"]``)
beside its weights (the state dict), so ``dewey-lab eval`` / ``export`` and ``dewey_lab.encode`` rebuild
the heads that were trained and pool with the whole-text one by default.

Validation logs the mean student-teacher cosine on held-out documents (``val/cos_whole``,
``val/cos_chunk``) beside the same figure for the best constant predictor, the mean teacher
vector of the training set (``val/cos_whole_baseline``, ``val/cos_chunk_baseline``): a student
that learned nothing about its input cannot beat the baseline.
"""

from __future__ import annotations

import logging
import shutil
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torchmetrics import MeanMetric
from transformers import get_linear_schedule_with_warmup

from dewey_lab.distributed import all_ranks, gather_rows
from dewey_lab.model.attention import forward_rows
from dewey_lab.model.losses import LossTerm, default_losses
from dewey_lab.model.pooling import ChunkMeanPooling, CLSPooling, PoolingHead
from dewey_lab.model.student import StudentConfig, build_student

log = logging.getLogger(__name__)

VAL_METRICS = ("cos_whole", "cos_chunk", "cos_whole_baseline", "cos_chunk_baseline")


def _fp32(device: torch.device):
    """Autocast off: under ``trainer.precision: bf16-mixed`` the forward runs in bf16, the losses and metrics in
    fp32 (autocast would run the Gram matrix S S^T of the similarity term in bf16 even over fp32 inputs: ~3
    significant digits). Parameters, gradients and optimizer state are fp32 anyway (tests/test_precision.py)."""
    return torch.autocast(device.type, enabled=False)


class DistillModule(L.LightningModule):
    HEADS = ("whole_pooling", "chunk_pooling")  # recorded in every checkpoint (``checkpoint["dewey_heads"]``)

    def __init__(
        self,
        student: StudentConfig = StudentConfig(),  # noqa: B008 (a frozen-in-use dataclass; jsonargparse nests it)
        whole_pooling: PoolingHead | None = None,
        chunk_pooling: PoolingHead | None = None,
        losses: dict[str, LossTerm] | None = None,
        projection: Literal["auto", "linear", "none"] = "auto",
        teacher_dim: int | None = None,
        lr: float = 1e-4,
        warmup_steps: int = 2000,
        weight_decay: float = 0.0,
        compile: bool | str = False,
        max_bad_steps: int = 20,
        init_from: str | None = None,
    ) -> None:
        """
        Args:
            student: which ModernBERT to build and how (thetas, attention backend).
            whole_pooling: whole-text embedding head (``dewey_lab.model.pooling``; default CLS, Dewey's). Eval,
                export, encode and the passkey check pool with it unless told otherwise (``--pooling``).
            chunk_pooling: chunk embedding head (default: mean of the chunk's tokens, Dewey's).
            losses: the loss terms by name (``dewey_lab.model.losses``), summed with their weights and logged
                as ``train/loss_<name>_<target>``. Default: ``cosine`` (weight 10) and ``similarity``
                (weight 200) on whole and chunk, Jasper's recipe; ``experiments/base.yaml`` spells it out.
            projection: head from the student's hidden size to the teacher's dimension. ``auto``:
                linear when they differ, none when equal; ``linear``: always; ``none``: never.
            teacher_dim: the teacher's vector size; filled from the data module when None.
            lr: peak learning rate of StableAdamW (paper: 1e-4).
            warmup_steps: linear warmup steps, then linear decay to 0 (paper: 2000).
            weight_decay: StableAdamW weight decay (paper: 0).
            compile: ``torch.compile`` the student (dynamic shapes): ``true`` for inductor, or a
                backend name. Off by default: it pays back on GPU runs of hours, not on a CPU smoke run.
            max_bad_steps: steps with a non-finite loss or gradient are skipped (no weight update)
                and counted (``train/skipped_steps``); past this many the run stops with a message.
            init_from: start from another run's student and projection (train short, then long, as
                ModernBERT extends its context): a ``.ckpt``, a run directory, or an experiment's run folder
                (``runs/tiny``: its newest finished run). The student's shape must match; its RoPE thetas and
                window may differ (rotary positions hold no weights). A resumed run keeps its own weights.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["whole_pooling", "chunk_pooling", "losses"])
        self.spec = student
        self.student = build_student(self.spec)
        self.whole_pooling = whole_pooling if whole_pooling is not None else CLSPooling()
        self.chunk_pooling = chunk_pooling if chunk_pooling is not None else ChunkMeanPooling()
        for head in (self.whole_pooling, self.chunk_pooling):  # weights sized by the student's width, if any
            head.bind(self.student.config.hidden_size)
        self.losses = nn.ModuleDict(losses if losses is not None else default_losses())
        if projection not in ("auto", "linear", "none"):
            raise ValueError(f"model.projection must be auto, linear or none, got {projection!r}")
        self.projection_mode, self.lr, self.warmup_steps, self.weight_decay = projection, lr, warmup_steps, weight_decay
        self.projection: nn.Module | None = None
        if teacher_dim is not None:
            self._build_projection(teacher_dim)
        self.val_metrics = nn.ModuleDict({name: MeanMetric() for name in VAL_METRICS})
        self.teacher_means: dict[str, Tensor] = {}
        self.compile_backend = "inductor" if compile is True else compile or None
        self.max_bad_steps, self.bad_steps = max_bad_steps, 0
        self.init_from = init_from

    def configure_model(self) -> None:
        if self.device_mesh is not None and not getattr(self, "_sharded", False):
            self._shard(self.device_mesh)
        if not self.compile_backend or getattr(self, "_compiled", False):
            return
        if self.compile_backend == "inductor" and not (torch.cuda.is_available() or shutil.which("cc")):
            log.warning("model.compile: inductor needs CUDA or a C compiler (cc); training uncompiled")
            return
        # in place: parameter names (and so checkpoints) stay those of the uncompiled student
        self.student.compile(backend=self.compile_backend, dynamic=True)
        self._compiled = True

    def _shard(self, mesh) -> None:
        """FSDP2 (``trainer.strategy: ModelParallelStrategy``): each encoder layer is one unit, and the
        rest (embeddings, final norm, projection, any pooling weights) the outer one. Parameters become
        DTensors, so StableAdamW's per-tensor update clipping sees whole tensors, as on one process.
        A 2-d mesh (Lightning's data_parallel x tensor_parallel) is HSDP: replicated over its first
        dimension, sharded over its second; there is no tensor parallelism."""
        from torch.distributed.fsdp import fully_shard

        for layer in self.student.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)  # the root: its forward gathers the outer parameters
        self._sharded = True

    # -- wiring to the data ----------------------------------------------------------------------
    def _build_projection(self, teacher_dim: int) -> None:
        hidden = self.student.config.hidden_size
        if self.projection_mode == "none" and hidden != teacher_dim:
            raise ValueError(f"teacher vectors are {teacher_dim}-d but the student outputs {hidden}-d and "
                             "model.projection is none; set model.projection: auto (adds a linear head)")
        linear = self.projection_mode == "linear" or (self.projection_mode == "auto" and hidden != teacher_dim)
        # built in setup, where the global RNG has been used differently by 1 or N processes: seed it
        # from the run's seed so one process and DDP start from the same head
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch.initial_seed())
            self.projection = nn.Linear(hidden, teacher_dim) if linear else nn.Identity()
        self.hparams["teacher_dim"] = teacher_dim  # checkpoints rebuild the same head

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            return
        if self.projection is None:
            self._build_projection(dm.teacher_dim)
        elif self.hparams["teacher_dim"] != dm.teacher_dim:
            raise ValueError(f"this model was built for {self.hparams['teacher_dim']}-d teacher vectors but the "
                             f"cache holds {dm.teacher_dim}-d; use the same teacher or a new data.cache.dir")
        self.teacher_means = dict(dm.teacher_means)
        if self.init_from and stage == "fit" and not getattr(self, "_started_from", None):
            self._start_from(self.init_from)  # a resume then loads its own checkpoint over these weights

    def _start_from(self, spec: str) -> None:
        """Load another run's student, projection and pooling weights (``init_from``); one line if they do not fit."""
        from dewey_lab.runs.checkpoint import peek_checkpoint, start_checkpoint

        path = start_checkpoint(spec)
        saved = peek_checkpoint(path)
        state = {k: v for k, v in saved["state_dict"].items()
                 if k.split(".", 1)[0] in ("student", "projection", *self.HEADS)}
        mine = {k: v for k, v in self.state_dict().items() if k.split(".", 1)[0] in ("student", "projection", *self.HEADS)}
        bad = sorted(set(state) ^ set(mine)) or [k for k in state if state[k].shape != mine[k].shape]
        if bad:
            raise ValueError(f"model.init_from {path}: its model does not match this one at {bad[0]} (and "
                             f"{len(bad) - 1} more); give model.student the start's shape and the same heads")
        self.load_state_dict(state, strict=False)
        self._started_from = str(path)
        log.info("student: starts from %s (step %s)", path, saved.get("global_step"))

    def on_fit_start(self) -> None:
        stats = getattr(getattr(self.trainer, "datamodule", None), "fill_stats", None)
        if stats is not None and self.logger is not None:
            self.logger.log_metrics({"teacher/cache_hits": stats.hits, "teacher/cache_misses": stats.misses,
                                     "teacher/hit_rate": stats.hit_rate, "teacher/seconds": stats.teacher_seconds,
                                     # share of the texts this fill embedded that were over the teacher's window
                                     "teacher/truncated": stats.long_fraction},
                                    step=0)

    # -- model -------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        hidden = forward_rows(self.student, batch)  # (R, T, H): one text per row, or packed
        whole = self.projection(self.whole_pooling(hidden, batch))  # (B, D)
        chunk = self.projection(self.chunk_pooling(hidden, batch))  # (N, D)
        return {"whole": whole, "chunk": chunk}

    def compute_losses(self, batch: dict[str, Tensor], emb: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        with _fp32(emb["whole"].device):
            return self._losses(batch, emb)

    def _losses(self, batch: dict[str, Tensor], emb: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        # the global batch on every rank (one process: this batch): in-batch similarities span all ranks
        pairs = {kind: (gather_rows(emb[kind].float()), gather_rows(batch[f"t_{kind}"].to(emb[kind].device).float()))
                 for kind in ("whole", "chunk")}
        total, parts = emb["whole"].new_zeros((), dtype=torch.float32), {}
        for name, term in self.losses.items():
            term: LossTerm
            if term.weight == 0:
                continue
            for target, value in term(pairs).items():
                parts[f"{name}_{target}"] = value
                total = total + term.weight * value
        return total, parts

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        total, parts = self.compute_losses(batch, self(batch))
        B = batch["doc_row"].numel()  # texts, whatever the number of rows
        if not torch.isfinite(total):  # returning None skips backward and the optimizer step
            self._bad_step("loss")
            return None
        self.log_dict({f"train/loss_{k}": v for k, v in parts.items()}, batch_size=B)
        self.log("train/loss", total, prog_bar=True, batch_size=B)
        self.log("train/chunks_per_batch", float(batch["chunk_row"].numel()), batch_size=B)
        mask = batch["attention_mask"]  # padding share of the tokens computed: what packing removes
        self.log("train/padding", 1.0 - float(mask.sum()) / mask.numel(), batch_size=B)
        return total

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad  # FSDP2: this rank's shard
                 for p in self.parameters() if p.grad is not None]
        finite = not grads or bool(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]).isfinite().all())
        # FSDP: each rank holds a shard of the gradients; all skip the step, or none does
        if not all_ranks(finite, self.device):
            for p in self.parameters():  # optimizers skip parameters without a gradient: no update at all
                p.grad = None
            self._bad_step("gradient")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = self.trainer.strategy.model
        if isinstance(model, FullyShardedDataParallel) and gradient_clip_val and gradient_clip_algorithm != "value":
            model.clip_grad_norm_(gradient_clip_val)  # the norm over every rank's shard (Lightning refuses FSDP here)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _bad_step(self, what: str) -> None:
        self.bad_steps += 1
        self.log("train/skipped_steps", float(self.bad_steps), batch_size=1)
        log.warning("step %d: non-finite %s; step skipped (%d so far, limit model.max_bad_steps=%d)",
                    self.global_step, what, self.bad_steps, self.max_bad_steps)
        if self.bad_steps > self.max_bad_steps:
            raise RuntimeError(f"{self.bad_steps} steps had a non-finite loss or gradient (limit model.max_bad_steps="
                               f"{self.max_bad_steps}); the saved checkpoints are finite. Lower model.lr, use "
                               "trainer.precision bf16-mixed rather than 16-mixed, or check the data")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["dewey_lab"] = {"bad_steps": self.bad_steps, "torch_rng": torch.get_rng_state(),
                                   "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        # the heads are not hyper-parameters (modules); their class and arguments go here, weights in the state dict
        checkpoint["dewey_heads"] = {key: getattr(self, key).config() for key in self.HEADS}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._load_heads(checkpoint.get("dewey_heads") or {})  # before load_state_dict reads their weights
        state = checkpoint.get("dewey_lab")
        if state:  # a resumed run continues the count and the random stream (dropout, if any)
            self.bad_steps = state["bad_steps"]
            torch.set_rng_state(state["torch_rng"])
            if state["cuda_rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])

    def _load_heads(self, record: dict) -> None:
        """Rebuild the heads a checkpoint trained (``load_from_checkpoint``: eval, export, encode). A checkpoint
        written before heads were recorded keeps the defaults it was built with (CLS, chunk mean). A resumed
        fit must already have built the same heads: its config is the checkpoint's."""
        for key, want in record.items():
            head: PoolingHead = getattr(self, key)
            if head.config() == want:
                continue
            if self._trainer is not None:
                have = head.config()
                raise ValueError(f"the checkpoint trained model.{key} {want['class_path']} {want['init_args']} but "
                                 f"this run builds {have['class_path']} {have['init_args']}; resume with the config "
                                 "it ran with")
            setattr(self, key, PoolingHead.from_config(want, self.student.config.hidden_size))

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        emb = self(batch)
        total, _ = self.compute_losses(batch, emb)
        self.log("val/loss", total, batch_size=batch["doc_row"].numel(), prog_bar=True)
        with _fp32(emb["whole"].device):
            self._val_cosines(batch, emb)

    def _val_cosines(self, batch: dict[str, Tensor], emb: dict[str, Tensor]) -> None:
        for kind in ("whole", "chunk"):
            teacher = batch[f"t_{kind}"]
            if len(teacher) == 0:
                continue
            self.val_metrics[f"cos_{kind}"].update(F.cosine_similarity(emb[kind].float(), teacher.float(), dim=-1))
            if kind in self.teacher_means:
                const = self.teacher_means[kind].to(teacher).expand_as(teacher)
                self.val_metrics[f"cos_{kind}_baseline"].update(F.cosine_similarity(const, teacher, dim=-1))

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.val_metrics.items():
            if metric.update_called:
                self.log(f"val/{name}", metric.compute(), prog_bar=name in ("cos_whole", "cos_chunk"))
            metric.reset()

    def configure_optimizers(self):
        from optimi import StableAdamW  # lazy: the model imports where torch-optimi is absent (bench-gpu)

        optimizer = StableAdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = get_linear_schedule_with_warmup(optimizer, min(self.warmup_steps, total // 2), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
