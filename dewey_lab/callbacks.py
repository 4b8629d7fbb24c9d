"""PasskeyCallback: LongEmbed's passkey and needle checks while a run trains.

Every ``every_n_steps`` optimizer steps the student (with its projection head) scores a small
seeded passkey / needle set at each configured length, single-vector and late-chunked
multi-vector, from one forward pass per passage. TensorBoard gets

* scalars ``val/passkey@<len>``, ``val/needle@<len>`` (single vector, Acc@1), their multi-vector
  twins ``val/passkey_multi@<len>``, and the mean over lengths ``val/passkey_avg``;
* a heat map per task and mode (length x step, Acc@1 in each cell) under ``val/<task>_<mode>_map``,
* the average at step 0 (the run's start: untrained, or its ``model.init_from``) beside every later
  check, ``ref/<task>_avg_step0`` (``ref/<task>_multi_avg_step0``), so a curve reads against where it
  started; a resumed run keeps it (the scores so far are in the checkpoint),

so the effect of a RoPE theta or a loss weight on long-context retrieval shows while the run is
still going. The sets are generated once (same documents at every check) in the student's tokens.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from dewey_lab.eval.embedder import QUERY_AS_CHUNK, Embedder, check_query_pooling
from dewey_lab.eval.metrics import retrieval_metrics
from dewey_lab.eval.retrieval import DenseRetriever
from dewey_lab.eval.stats import per_query as per_query_metrics
from dewey_lab.eval.tasks.deep import SOURCES as DEEP_SOURCES
from dewey_lab.eval.tasks.semantic import KINDS as SEMANTIC_KINDS
from dewey_lab.eval.tasks.task import RetrievalTask
from dewey_lab.model.pooling import PoolingHead
from dewey_lab.runs.compare import PER_QUERY_FILE

log = logging.getLogger(__name__)


class PasskeyCallback(L.Callback):
    def __init__(self, every_n_steps: int = 500, lengths: Sequence[int] = (256, 1024, 4096, 16384),
                 tasks: Sequence[str] = ("passkey", "needle"), n_queries: int = 50, n_docs: int = 100,
                 modes: Sequence[str] = ("single", "multi"), pooling: str | None = None, chunk_size: int = 256,
                 chunk_overlap: int = 64, seed: int = 0, haystack: str | None = None,
                 check_at_start: bool = True, token_budget: int = 16384, query_pooling: str = QUERY_AS_CHUNK) -> None:
        """
        Args:
            every_n_steps: optimizer steps between checks (also one at the end of training).
            lengths: document lengths in the student's tokens.
            tasks: any of passkey, needle, and the real-text checks deep/heldout, deep/langref (a sentence from
                deep inside text no student trained on, ``dewey_lab.eval.tasks.deep``; sentences from
                min(1024, a quarter of the longest length) tokens in; a ``.jsonl`` haystack stands in for the
                pydoc corpus their sentences are checked against), semantic/summary, semantic/concat (a
                module's summary finds its text, ``dewey_lab.eval.tasks.semantic``); documents cut to the
                longest length; logged as ``val/deep_heldout`` nDCG@10 and ``ref/deep_heldout_step0``, no heat map.
            n_queries, n_docs: per length (LongEmbed: 50 over 100 shared candidates).
            modes: single and / or multi (late-chunked, best chunk).
            pooling: single-vector pooling: None scores the whole-text head being trained
                (``model.whole_pooling``), so a pooling study sets its choice once; a head's name
                (``PoolingHead.choices()``: cls, mean, cls_mean, ...) scores that one instead.
            chunk_size, chunk_overlap: multi-vector windows in tokens.
            seed: the generated sets' seed.
            haystack: needle haystack file (.txt / .jsonl); None: the evaluation-only text
                (``dewey_lab.eval.tasks.heldout``).
            check_at_start: score the untrained student too (the heat map's first column).
            token_budget: padded tokens per forward pass.
            query_pooling: how multi pools queries: ``chunk`` (the chunk head over the query's text tokens,
                their mean: dewey_en_beta's rule, the default) or a whole-text head's name (``cls``: the rule
                before 2026-12); ``DenseRetriever``'s argument.
        """
        super().__init__()
        known = ("passkey", "needle", *(f"deep/{s}" for s in DEEP_SOURCES), *(f"semantic/{k}" for k in SEMANTIC_KINDS))
        bad = [t for t in tasks if t not in known]
        if bad:
            raise ValueError(f"PasskeyCallback tasks: unknown {bad[0]!r}; use any of {', '.join(known)}")
        if pooling is not None and pooling not in PoolingHead.choices():
            names = ", ".join(PoolingHead.choices())
            raise ValueError(f"PasskeyCallback pooling: unknown {pooling!r}; use one of {names} or null (the trained head)")
        self.every_n_steps, self.lengths, self.tasks = every_n_steps, sorted(lengths), list(tasks)
        self.n_queries, self.n_docs, self.modes, self.pooling = n_queries, n_docs, list(modes), pooling
        self.chunk_size, self.chunk_overlap, self.seed, self.haystack = chunk_size, chunk_overlap, seed, haystack
        check_query_pooling(query_pooling, "PasskeyCallback query_pooling")
        self.check_at_start, self.token_budget, self.query_pooling = check_at_start, token_budget, query_pooling
        self._tasks: list[RetrievalTask] | None = None
        self._tokenizer = None
        self._last_step = -1
        self._hashes: dict[str, str] = {}  # task label -> set hash (passkey_last.json)
        self.history: dict[str, dict[int, dict[int, float]]] = {}  # "passkey_single" -> step -> length -> acc
        self.real_history: dict[str, dict[int, float]] = {}  # "deep_heldout_multi" -> step -> nDCG@10

    # -- when ---------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.check_at_start:
            self.check(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0:
            self.check(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer, pl_module)

    # -- what ---------------------------------------------------------------------------------------
    def generated(self, tokenizer) -> list[RetrievalTask]:
        if self._tasks is None:
            from dewey_lab.eval.tasks.deep import make_deep
            from dewey_lab.eval.tasks.heldout import read_haystack
            from dewey_lab.eval.tasks.semantic import make_semantic
            from dewey_lab.eval.tasks.synthetic import make_synthetic

            needs = self.haystack and "needle" in self.tasks
            text = read_haystack(self.haystack) if needs else None  # None: the evaluation-only text
            room = max(self.lengths) - tokenizer.num_special_tokens_to_add(pair=False)
            corpus = {"corpus_path": self.haystack} if str(self.haystack).endswith(".jsonl") else {}
            self._tasks = [t for kind in self.tasks if kind in ("passkey", "needle")
                           for t in make_synthetic(kind, tokenizer, self.lengths, n_queries=self.n_queries,
                                                   n_docs=self.n_docs, seed=self.seed, haystack=text)]
            self._tasks += [make_deep(kind.removeprefix("deep/"), tokenizer, n_queries=self.n_queries, max_tokens=room,
                                      min_depth=min(1024, room // 4), seed=self.seed, **corpus)
                            for kind in self.tasks if kind.startswith("deep/")]
            self._tasks += [make_semantic(kind.removeprefix("semantic/"), tokenizer, n_queries=self.n_queries,
                                          n_docs=self.n_docs, max_tokens=room, seed=self.seed)
                            for kind in self.tasks if kind.startswith("semantic/")]
        return self._tasks

    def embedder(self, pl_module) -> Embedder:
        from dewey_lab.model.student import load_tokenizer

        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(pl_module.spec.tokenizer_name)
        whole = PoolingHead.pick(self.pooling, pl_module.whole_pooling, pl_module.student.config.hidden_size,
                                 where="PasskeyCallback pooling")  # None: the head being trained, weights and all
        trainer = getattr(pl_module, "_trainer", None)  # the check embeds in the precision training runs in
        bf16 = trainer is not None and str(trainer.precision).startswith("bf16")
        return Embedder(pl_module.student, self._tokenizer, head=pl_module.projection, pooling=whole,
                        chunk_pooling=pl_module.chunk_pooling, max_length=max(self.lengths),
                        chunk_size=self.chunk_size, chunk_overlap=self.chunk_overlap, token_budget=self.token_budget,
                        name="student", device=pl_module.device, dtype=torch.bfloat16 if bf16 else None)

    @torch.no_grad()
    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Score every task at every length; log scalars and heat maps. Rank zero only."""
        step = trainer.global_step
        if step == self._last_step or not trainer.is_global_zero or getattr(pl_module, "projection", None) is None:
            return {}
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        if isinstance(trainer.strategy, FSDPStrategy | ModelParallelStrategy):  # rank 0 holds a shard only
            if self._last_step != -2:
                log.warning("PasskeyCallback: skipped under FSDP (each rank holds a shard of the student); "
                            "score the checkpoints with dewey-lab eval instead")
            self._last_step = -2
            return {}
        self._last_step = step
        embedder = self.embedder(pl_module)
        retriever = DenseRetriever(embedder, self.modes, cache_dir=None, progress=False,
                                   query_pooling=self.query_pooling)
        scalars: dict[str, float] = {}
        per_query: dict = {}  # task -> mode -> length -> {"qids", "correct"}: passkey_last.json
        for task in self.generated(embedder.tokenizer):
            if task.length is None:  # a real-text check: one score per mode, beside its step-0 value
                self._score_real(task, retriever, step, scalars)
                continue
            for mode, scores in retriever.score(task).items():
                qids = list(task.judged_queries())
                acc = retrieval_metrics(scores, qids, list(task.corpus), task.qrels)["ndcg@1"]
                suffix = "" if mode == "single" else f"_{mode}"
                scalars[f"val/{task.name}{suffix}@{task.length}"] = acc
                self.history.setdefault(f"{task.name}_{mode}", {}).setdefault(step, {})[task.length] = acc
                correct = per_query_metrics(scores, qids, list(task.corpus), task.qrels)["ndcg@1"]  # (Q,) 0 / 1
                per_query.setdefault(task.name, {}).setdefault(mode, {})[str(task.length)] = {
                    "qids": qids, "correct": [int(c) for c in correct], "set": self._set_hash(task)}
        self._write_per_query(trainer, step, per_query)
        for key, per_step in self.history.items():
            name, mode = key.rsplit("_", 1)
            suffix = "" if mode == "single" else f"_{mode}"
            scalars[f"val/{name}{suffix}_avg"] = sum(per_step[step].values()) / len(per_step[step])
            if 0 in per_step and step > 0:  # where the run started, beside every later score
                scalars[f"ref/{name}{suffix}_avg_step0"] = sum(per_step[0].values()) / len(per_step[0])
        if trainer.logger is not None:
            trainer.logger.log_metrics(scalars, step=step)
            if isinstance(trainer.logger, TensorBoardLogger):
                for key in self.history:
                    trainer.logger.experiment.add_figure(f"val/{key}_map", self.heatmap(key), step)
        log.info("step %d: %s", step, ", ".join(f"{k.removeprefix('val/')}={v:.2f}" for k, v in scalars.items()))
        return scalars

    def _score_real(self, task: RetrievalTask, retriever: DenseRetriever, step: int, scalars: dict) -> None:
        name = task.name.replace("/", "_")
        for mode, scores in retriever.score(task).items():
            tag = name + ("" if mode == "single" else f"_{mode}")
            value = retrieval_metrics(scores, list(task.judged_queries()), list(task.corpus), task.qrels)[task.metric]
            scalars[f"val/{tag}"] = value
            per_step = self.real_history.setdefault(tag, {})
            per_step[step] = value
            if 0 in per_step and step > 0:
                scalars[f"ref/{tag}_step0"] = per_step[0]

    @property
    def state_key(self) -> str:
        return self._generate_state_key(tasks=self.tasks, lengths=self.lengths, seed=self.seed)

    def state_dict(self) -> dict:
        """The scores so far (a resumed run keeps its step-0 reference and its heat maps' earlier columns)."""
        return {"history": {k: {int(s): {int(n): a for n, a in v.items()} for s, v in per.items()}
                            for k, per in self.history.items()},
                "real_history": {k: {int(s): a for s, a in per.items()} for k, per in self.real_history.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = {k: {int(s): {int(n): a for n, a in v.items()} for s, v in per.items()}
                        for k, per in state_dict.get("history", {}).items()}
        self.real_history = {k: {int(s): a for s, a in per.items()}
                             for k, per in state_dict.get("real_history", {}).items()}

    def _set_hash(self, task: RetrievalTask) -> str:
        """A short hash of a generated set's queries, documents and judgements: equal hashes, same queries."""
        if task.label not in self._hashes:
            import hashlib

            text = json.dumps([task.queries, task.corpus, task.qrels], sort_keys=True)
            self._hashes[task.label] = hashlib.sha256(text.encode()).hexdigest()[:16]
        return self._hashes[task.label]

    def _write_per_query(self, trainer: L.Trainer, step: int, results: dict) -> None:
        """``passkey_last.json`` next to ``run_info.json``: each query's Acc@1 at this (so finally the last)
        check, which ``make compare`` bootstraps and pairs across variants (the sets are seeded, so every
        variant with the same tokenizer, seed, lengths and sizes scores the same queries; ``set`` checks it)."""
        log_dir = getattr(trainer.logger, "log_dir", None)  # the logger's own: trainer.log_dir broadcasts
        if not log_dir:
            return
        from pathlib import Path

        from dewey_lab.files import atomic_write

        payload = {"step": step, "seed": self.seed, "n_queries": self.n_queries, "n_docs": self.n_docs,
                   "results": results}
        atomic_write(Path(log_dir) / PER_QUERY_FILE, json.dumps(payload) + "\n")

    def heatmap(self, key: str):
        """Figure: rows = lengths (short at the bottom), columns = checked steps, cells = Acc@1."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = sorted(self.history[key])
        grid = torch.tensor([[self.history[key][s].get(n, float("nan")) for s in steps] for n in self.lengths])
        fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(steps), 0.8 + 0.45 * len(self.lengths)))
        ax.imshow(grid.numpy(), origin="lower", aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(steps)), [str(s) for s in steps], rotation=45)
        ax.set_yticks(range(len(self.lengths)), [str(n) for n in self.lengths])
        ax.set_xlabel("step")
        ax.set_ylabel("length (tokens)")
        ax.set_title(key.replace("_", " ") + " Acc@1")
        for i in range(len(self.lengths)):
            for j in range(len(steps)):
                v = float(grid[i, j])
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
        fig.tight_layout()
        return fig


class RunInfo(L.Callback):
    """Writes ``run_info.json`` next to the run's logs and ``config.yaml``: the run's identity (resolved
    config + data fingerprints, ``dewey_lab.runs.identity``), git revision, package versions, the corpus,
    chunker and teacher fingerprints, the teacher cache, wall time and whether the run finished, so any
    run (and any row of a comparison) can be rerun exactly. Every checkpoint carries the identity too
    (``checkpoint["dewey_run"]``), so ``--ckpt_path last`` resumes only its own run. When training
    itself raises, ``crash`` says at which step and where the last good checkpoint is. Added to every
    ``dewey-lab fit`` by the CLI, which sets ``identity``."""

    PACKAGES = ("dewey-lab", "torch", "lightning", "transformers", "sentence-transformers", "torchmetrics",
                "torch-optimi", "langchain-text-splitters", "flash-attn")

    def __init__(self) -> None:
        super().__init__()
        self._t0 = 0.0
        self.info: dict = {}
        self.identity: dict | None = None
        self.training_started = False
        self.crash: dict | None = None  # {"step", "error", "checkpoint", "checkpoint_step"} once training raised

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import sys
        import time
        from datetime import datetime, timezone
        from pathlib import Path

        self._t0 = time.perf_counter()
        dm = getattr(trainer, "datamodule", None)
        data = {}
        if dm is not None and hasattr(dm, "corpus"):
            data = {"corpus": f"{type(dm.corpus).__name__}:{dm.corpus.fingerprint()}",
                    "chunker": {k: v for k, v in vars(dm.chunker).items() if not k.startswith("_")},
                    "teacher": dm.teacher.fingerprint, "teacher_cache": str(dm.cache.dir),
                    "teacher_cache_vectors": len(dm.cache)}
            stats = getattr(dm, "fill_stats", None)
            if stats is not None:
                data["teacher_cache_hit_rate"] = stats.hit_rate
                data["teacher_truncated"] = stats.truncated()  # texts this fill embedded past the teacher's window
        self.info = {"identity": self.identity, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "argv": sys.argv, "git": _git_revision(), "versions": _versions(self.PACKAGES), "data": data,
                     "finished": False}
        if trainer.ckpt_path and Path(trainer.ckpt_path).is_file():  # a resume: where from, under which limits
            self.info["resumed_from"] = _resumed_from(trainer.ckpt_path)
        self._write(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.training_started = True

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self.identity is not None:
            checkpoint["dewey_run"] = self.identity

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not self.training_started or isinstance(exception, KeyboardInterrupt):
            return
        ckpt = _newest_checkpoint(trainer)
        self.crash = {"step": trainer.global_step, "error": f"{type(exception).__name__}: {exception}"[:300],
                      "checkpoint": None if ckpt is None else str(ckpt),
                      "checkpoint_step": None if ckpt is None else _checkpoint_step(ckpt)}
        if self.info:
            self.info.update(crash=self.crash, global_step=trainer.global_step)
            self._write(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import time

        # epochs: whole epochs trained (Lightning counts an epoch cut short by max_steps as processed), so a sweep
        # can tell whether a raised max_epochs asks for more
        loop = trainer.fit_loop
        epochs = loop.epoch_progress.current.processed - (not loop.epoch_loop.batch_progress.is_last_batch)
        self.info.update(finished=not trainer.interrupted, global_step=trainer.global_step, epochs=max(epochs, 0),
                         wall_seconds=round(time.perf_counter() - self._t0, 1))
        self.info.pop("crash", None)
        stream = getattr(getattr(trainer, "datamodule", None), "_stream_loader", None)
        if stream is not None:  # a stream's teacher work done inside training (this rank's)
            self.info["data"].update(stream_texts_embedded=stream.filled,
                                     stream_teacher_seconds=round(stream.teacher_seconds, 1),
                                     stream_teacher_truncated=stream.fill_stats.truncated())
        self._write(trainer)

    def _write(self, trainer: L.Trainer) -> None:
        import json

        from dewey_lab.files import atomic_write

        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask, not only rank 0
        if trainer.is_global_zero and log_dir:
            from pathlib import Path

            atomic_write(Path(log_dir) / "run_info.json", json.dumps(self.info, indent=2, default=str) + "\n")


def _newest_checkpoint(trainer: L.Trainer):
    """The newest complete checkpoint file of this run (SafeCheckpointIO's temporary files never match)."""
    from pathlib import Path

    dirs = {Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)}
    found = [p for d in dirs if d.is_dir() for p in d.glob("*.ckpt")]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def _resumed_from(path) -> dict:
    """{"checkpoint", "step", "limits"}: the checkpoint a fit resumed and the limits its training ran under
    (``dewey_lab.runs.identity``: a run continued past its old limit restarted its learning-rate decay)."""
    from dewey_lab.runs.checkpoint import peek_checkpoint

    try:
        saved = peek_checkpoint(path)
    except (OSError, RuntimeError, ValueError):  # unreadable here: Lightning's own load will say why
        return {"checkpoint": str(path), "step": None, "limits": None}
    return {"checkpoint": str(path), "step": saved.get("global_step"),
            "limits": (saved.get("dewey_run") or {}).get("limits")}


def _checkpoint_step(path) -> int | None:
    from dewey_lab.runs.checkpoint import peek_checkpoint

    try:
        return int(peek_checkpoint(path)["global_step"])
    except (OSError, RuntimeError, KeyError, ValueError, TypeError):  # unreadable: a path without a step
        return None


def _git_revision() -> dict:
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                    capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}  # not a git checkout (an installed wheel)
    return {"commit": commit, "dirty": dirty}


def _versions(packages) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out
