"""Streaming corpora (``data.stream.enabled: true``): train on a corpus read as it goes, never held whole,
and resume mid-stream exactly.

The in-memory path builds every window up front and fills the teacher cache before training; a
10M-document corpus (fineweb-edu + Infinity-Instruct, streamed from the hub or read from local
parquet/jsonl shards) cannot be held that way. Here:

* **Shards.** Every process (rank r of W, DataLoader worker k of K) reads the corpus' documents in
  order and keeps those whose text hashes (SHA-256, first 8 bytes) to its shard
  ``r * K + k`` of ``W * K``. Parsing every record is cheap next to tokenising a 1/(W K) share.
  Hashing the content sends exact duplicates to one shard, which drops them as the in-memory path
  does; documents held out for validation (by id hash) never enter the stream.
* **Blocks.** A shard cuts its documents into windows (``windows.Windower``, the in-memory path's rule:
  tokenised once, chunks and cache keys included) and collects ``data.stream.block`` of them; each
  block is shuffled with a seed of (seed, epoch, shard, block start) and cut into this rank's batches:
  ``data.batching.batch_size / W`` texts, or ``batch_tokens / W`` tokens (the samplers of
  ``packing``). With fixed batch sizes a block's leftover (fewer than a batch) is carried into the
  next block, across epochs too, so no window is dropped. The loss gathers every rank's rows, so the
  similarity matrix still spans the global batch.
* **Epochs.** The stream never ends: at its end a shard starts again, with new shuffles. Training
  stops at ``trainer.max_steps`` (required; epochs x texts / batch_size gives it).
* **Teacher vectors.** Workers read them from the cache. A text it lacks is embedded by the training
  process itself (the rank's GPU) when its batch arrives (``data.stream.fill: true``; the one fill
  routine, ``fill.fill``), or is an error naming ``dewey-lab fill`` (``false``): the fill job array
  can embed the whole stream beforehand.
* **Resume.** Each batch carries its shard's position after it: (epoch, where its block starts in the
  document order, the windows carried into that block, batches of the block served). The loader
  keeps the positions after the last batch training consumed (optimizer steps x accumulation; the
  batches Lightning and the workers fetched ahead do not count), the data module's ``state_dict``
  gathers them from every rank into the checkpoint, and a resumed run re-reads each shard up to
  its block start (parsing, not tokenising), forms the same block and skips the batches served: the
  batches an uninterrupted run would have seen, in order. Resuming needs the same W and K.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dewey_lab.data.corpus import CorpusSource, Document
from dewey_lab.data.fill import FillStats, fill
from dewey_lab.data.items import item_of
from dewey_lab.data.packing import FixedBatchSampler, TokenBudgetBatchSampler
from dewey_lab.data.windows import Example, Windower, unique_documents

log = logging.getLogger(__name__)

GROUP_DOCS = 64  # documents per tokenizer call; blocks end on group boundaries (so a resume re-forms them)


@dataclass
class StreamConfig:
    """Reading the corpus as a stream while training; every field is a YAML key under ``data.stream``."""

    enabled: bool = False
    """Read the corpus as a stream while training instead of building every window first: per-rank and
    per-worker shards, resumable mid-stream, endless (set ``trainer.max_steps``); a list of corpora is
    interleaved, not chained."""
    block: int = 4096
    """Windows shuffled together in a stream (more: better mixing, more memory)."""
    fill: bool = True
    """Embed texts the cache lacks as their batch arrives (the training process's device); false: a
    missing text is an error (fill first with ``dewey-lab fill``)."""
    val_docs: int = 100_000
    """A stream's validation windows come from its first this-many documents."""


@dataclass
class ShardState:
    """Where a shard's stream stands: the block that starts at document ``pos`` of epoch ``epoch``,
    with ``carry`` windows (``Example.to_plain``) before it, ``done`` of its batches served."""

    epoch: int = 0
    pos: int = 0
    carry: list = field(default_factory=list)
    done: int = 0

    def as_dict(self) -> dict:  # plain types: a checkpoint loads them with weights_only
        return {"epoch": self.epoch, "pos": self.pos, "carry": self.carry, "done": self.done}


def shard_of(text_hash: bytes, n_shards: int) -> int:
    return int.from_bytes(text_hash[:8], "little") % n_shards


class WindowStream(IterableDataset):
    """This rank's batches of a streamed corpus, collated, each with its shard's position after it
    (``batch["_stream"]``) and the rows whose teacher vectors the cache lacked (``batch["_missing"]``)."""

    def __init__(self, corpus: CorpusSource, windower: Windower, cache, collate, *, rank: int, world_size: int,
                 batch_size: int | None, batch_tokens: int | None, packed: bool, block: int, seed: int) -> None:
        self.corpus, self.windower, self.cache = corpus, windower, cache
        self.collate, self.rank, self.world_size = collate, rank, world_size
        self.batch_size, self.batch_tokens, self.packed, self.block, self.seed = (batch_size, batch_tokens, packed,
                                                                                  block, seed)
        self.resume: dict[int, dict] = {}  # logical worker -> ShardState fields, set by the loader
        self.offset = 0  # the logical worker whose batch comes first

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        k, w = (info.num_workers, info.id) if info is not None else (1, 0)
        logical = (w + self.offset) % k
        state = ShardState(**self.resume[logical]) if logical in self.resume else ShardState()
        for batch, after in self.batches(self.rank * k + logical, self.world_size * k, state):
            batch["_stream"] = (logical, after.as_dict())
            yield batch

    # -- documents -> blocks -> batches --------------------------------------------------------
    def documents(self, shard: int, n_shards: int) -> Iterator[tuple[int, Document]]:
        """(position in the corpus, document) of this shard's training documents, duplicates dropped."""
        for pos, doc in unique_documents(self.corpus, keep=lambda digest: shard_of(digest, n_shards) == shard):
            if not self.windower.is_val(doc):
                yield pos, doc

    def blocks(self, shard: int, n_shards: int, start: int) -> Iterator[tuple[int, int | None, list]]:
        """(block start, next block's start or None at the epoch's end, training windows) from ``start``."""
        block_start, group, windows = start, [], []
        for pos, doc in self.documents(shard, n_shards):
            if pos < start:
                continue  # read (and hashed: the duplicate filter must see it) but not tokenised again
            group.append(doc)
            if len(group) < GROUP_DOCS:
                continue
            windows += [ex for split, ex in self.windower.windows(group) if split == "train"]
            group = []
            if len(windows) >= self.block:
                yield block_start, pos + 1, windows
                block_start, windows = pos + 1, []
        windows += [ex for split, ex in self.windower.windows(group) if split == "train"]
        yield block_start, None, windows

    def batches(self, shard: int, n_shards: int, state: ShardState) -> Iterator[tuple[dict, ShardState]]:
        epoch, start, skip = state.epoch, state.pos, state.done
        carry = [Example.from_plain(plain) for plain in state.carry]
        while True:
            any_windows = False
            for block_start, next_pos, windows in self.blocks(shard, n_shards, start):
                any_windows = any_windows or bool(windows)
                block = carry + windows
                cut, left = self.cut(block, epoch, shard, block_start)
                after_block = (ShardState(epoch, next_pos, _plain(left)) if next_pos is not None
                               else ShardState(epoch + 1, 0, _plain(left)))
                carried = _plain(carry)  # once a block: every batch of it names the same carried windows
                for j in range(skip, len(cut)):
                    after = after_block if j == len(cut) - 1 else ShardState(epoch, block_start, carried, j + 1)
                    yield self.make_batch([block[i] for i in cut[j]]), after
                carry, skip = left, 0
            if not any_windows:
                raise ValueError(f"stream shard {shard} of {n_shards} holds no training text: the corpus is too small "
                                 "for this many ranks x data.batching.num_workers; lower data.batching.num_workers or "
                                 "use more documents")
            epoch, start = epoch + 1, 0

    def cut(self, block: list, epoch: int, shard: int, block_start: int) -> tuple[list[list[int]], list]:
        """The block's batches (indices, shuffled by a seed of its place in the stream) and its leftover."""
        seed = int.from_bytes(hashlib.sha256(f"{self.seed}/{epoch}/{shard}/{block_start}".encode()).digest()[:6],
                              "little")
        if self.batch_tokens is not None:
            sampler = TokenBudgetBatchSampler([e.n_tokens for e in block], self.batch_tokens, packed=self.packed,
                                              seed=seed)
            return sampler._batches(), []
        batches = FixedBatchSampler(len(block), self.batch_size, seed=seed, drop_last=False)._batches()
        if batches and len(batches[-1]) < self.batch_size:
            return batches[:-1], [block[i] for i in batches[-1]]
        return batches, []

    def make_batch(self, examples: list[Example]) -> dict:
        """Collated examples with their teacher vectors; rows the cache lacks are zeros, listed in ``_missing``
        as (row of [whole vectors; chunk vectors], key, text)."""
        items = [item_of(ex) for ex in examples]
        keys = [ex.keys for ex in examples]
        texts = [ex.teacher_texts() for ex in examples]
        flat_keys = [k[0] for k in keys] + [c for k in keys for c in k[1:]]
        flat_texts = [t[0] for t in texts] + [c for t in texts for c in t[1:]]
        lacking = set(self.cache.missing(flat_keys))
        vecs = np.zeros((len(flat_keys), self.cache.dim), dtype=np.float32)
        have = [i for i, k in enumerate(flat_keys) if k not in lacking]
        if have:
            vecs[have] = self.cache.get_many([flat_keys[i] for i in have])
        at = len(items)
        for b, item in enumerate(items):
            n = len(keys[b]) - 1
            item["t_whole"], item["t_chunk"] = vecs[b], vecs[at:at + n]
            at += n
        batch = self.collate(items)
        batch["_missing"] = [(i, flat_keys[i], flat_texts[i]) for i in range(len(flat_keys)) if flat_keys[i] in lacking]
        return batch


def _plain(examples: list[Example]) -> list:
    return [e.to_plain() for e in examples]


def _first(batch):  # the stream yields whole batches: the loader's collate passes them through
    return batch


class StreamLoader(DataLoader):
    """The training loader of a stream: fills the teacher vectors a batch lacks, in this process, and
    keeps each shard's position after the batches training consumed (``state_at``)."""

    def __init__(self, stream: WindowStream, *, num_workers: int, teacher, fill: bool,
                 batches_done, resume: dict | None = None) -> None:
        super().__init__(stream, batch_size=None, collate_fn=_first, num_workers=num_workers)
        self.stream, self.teacher, self.fill, self.batches_done = stream, teacher, fill, batches_done
        self.workers = max(1, num_workers)
        self.base = {"next": 0, "shards": {}, "batches_done": 0} if resume is None else resume
        self.records: deque = deque()  # (batch index since the run began, logical worker, state after it)
        self.served = 0  # batches this loader has handed out (the index of the next one is base + served)
        self.filled, self.teacher_seconds = 0, 0.0
        self.fill_stats = FillStats()  # the teacher work done inside training (its long-text count included)

    def state_at(self, consumed: int) -> dict:
        """Every shard's position after the first ``consumed`` batches of the run (what a checkpoint keeps)."""
        shards = dict(self.base["shards"])
        for index, logical, state in self.records:
            if index < consumed:
                shards[logical] = state
        start = self.base["batches_done"]
        return {"world_size": self.stream.world_size, "workers": self.workers, "batches_done": consumed,
                "next": (self.base["next"] + consumed - start) % self.workers, "shards": shards}

    def __iter__(self):
        # a new pass (the first, or after an epoch cut by limit_train_batches): continue after what was consumed
        self.base = self.state_at(self.batches_done()) if self.served or self.records else self.base
        self.records.clear()
        self.stream.resume, self.stream.offset = self.base["shards"], self.base["next"]
        index = self.base["batches_done"]
        for batch in super().__iter__():
            logical, state = batch.pop("_stream")
            missing = batch.pop("_missing")
            if missing:
                self._fill(batch, missing)
            self.records.append((index, logical, state))
            while len(self.records) > 4 * self.workers + 64:  # far behind anything still in flight
                _, old_logical, old_state = self.records.popleft()
                self.base["shards"][old_logical] = old_state
            index += 1
            self.served += 1
            yield batch

    def _fill(self, batch: dict, missing: list) -> None:
        cache = self.stream.cache
        keys = [k for _, k, _ in missing]
        if not self.fill:
            raise RuntimeError(f"{len(keys)} texts of a streamed batch are not in the teacher cache {cache.dir}; "
                               "fill it first (dewey-lab fill -c <experiment>) or set data.stream.fill: true")
        # another rank or an earlier batch may have embedded some: the fill embeds only what is still missing
        n_whole = len(batch["t_whole"])
        stats = fill({k: t for _, k, t in missing}, self.teacher, cache, block=max(1, len(keys)),
                     wholes={k for row, k, _ in missing if row < n_whole})
        self.fill_stats.add(stats)
        if stats.misses and not self.filled:
            log.info("stream: embedded %d texts the teacher cache lacked inside training (data.stream.fill); "
                     "fill the stream first (dewey-lab fill) to keep the teacher out of the training loop",
                     stats.misses)
        self.teacher_seconds += stats.teacher_seconds
        self.filled += stats.misses
        vecs = torch.from_numpy(cache.get_many(keys))
        for (row, _, _), v in zip(missing, vecs):
            if row < n_whole:
                batch["t_whole"][row] = v
            else:
                batch["t_chunk"][row - n_whole] = v
