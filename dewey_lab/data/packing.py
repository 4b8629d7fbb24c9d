"""Batches by token count, and several documents per row.

Two independent switches under ``data.batching`` (``BatchConfig``):

* ``pack: true`` lays out a batch's texts as documents packed into rows (first-fit decreasing),
  instead of one text per row padded to the longest. Attention never crosses a document
  boundary (a block-diagonal mask on SDPA/eager, ``cu_seqlens`` on flash-attn), positions restart
  at 0 for each document, and pooling reads each document's own tokens: the embeddings are the
  unpacked ones (tested to 1e-5). Packing changes the layout, not the batch: the same texts meet
  in the similarity loss.
* ``batch_tokens: N`` cuts batches to a token budget instead of ``batch_size`` texts: sorted by
  length within pools when padded (little padding), in shuffled order when packed (packing leaves
  no padding to save). The number of texts per batch then varies.

Both batch samplers make *global* batches (``data.batching.batch_size`` texts, or ``batch_tokens``
tokens, per optimizer step over all ranks): under DDP each rank takes its share of every global
batch, split by token count (``distributed.balance``), and the loss gathers the global batch back.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from torch.utils.data import DataLoader, Sampler

from dewey_lab.distributed import balance, world


@dataclass
class BatchConfig:
    """How windows become batches; every field is a YAML key under ``data.batching``."""

    batch_size: int = 64
    """Texts per training step over all ranks (paper: 64)."""
    batch_tokens: int | None = None
    """Cut batches to this many tokens instead of ``batch_size`` texts (padded tokens when unpacked: texts
    are then sorted by length within pools; real tokens when packed). None: fixed ``batch_size``."""
    pack: bool = False
    """Lay several texts into each row (no padding between them) with attention kept inside each text;
    the same embeddings as unpacked, fewer wasted tokens."""
    pack_length: int | None = None
    """Tokens per packed row; default ``data.windows.max_length``."""
    num_workers: int = 0
    """DataLoader workers (a stream: each worker reads a shard of its rank's stream)."""


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Item indices per row: each item goes into the first row with room, longest items first.

    Rows never exceed ``capacity``; FFD uses at most 11/9 OPT + 1 rows.
    """
    too_long = [n for n in lengths if n > capacity]
    if too_long:
        raise ValueError(f"a text of {max(too_long)} tokens does not fit a packed row of {capacity}; "
                         "set data.batching.pack_length >= data.windows.max_length")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if free >= lengths[i]:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


class EpochPermutation(Sampler[int]):
    """A seeded permutation of ``range(n)``, new each epoch (Lightning calls ``set_epoch``)."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        order = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return iter(order)


class EpochBatchSampler(Sampler[list[int]]):
    """Base of the batch samplers: global batches that are a function of (seed, epoch), served one
    epoch per ``__iter__`` in the sampler's own epoch count, each rank taking its share.

    ``_batches()`` (the current epoch's global batches) and ``__len__`` are the subclass's.
    ``start_at`` (set by ``ResumableLoader``: a callable, batches done since training began) makes
    the next first batch seek there; by then a checkpoint's step is restored, even if the iterator
    was created before. The epoch count is the sampler's own because Lightning's is one behind after
    resuming from a checkpoint written on an epoch's last batch. The inner ``sampler`` (an
    ``EpochPermutation``) is where the epoch is set.
    """

    def __init__(self, lengths: Sequence[int] | None, n: int, seed: int, shuffle: bool) -> None:
        self.lengths = None if lengths is None else list(lengths)
        self.sampler = EpochPermutation(n, seed, shuffle)
        self.cursor, self.skip = 0, 0  # the epoch the next __iter__ serves, and batches of it already done
        self.start_at: Callable[[], int] | None = None

    def _batches(self) -> list[list[int]]:  # pragma: no cover
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.next_epoch()  # a generator: runs when the first batch is asked for

    def next_epoch(self) -> list[list[int]]:
        """This rank's share of the next epoch's batches, minus those a resumed run had done."""
        if self.start_at is not None:
            start_at, self.start_at = self.start_at, None
            self.seek(start_at())
        epoch, skip = self.cursor, self.skip
        self.sampler.set_epoch(epoch)
        self.cursor, self.skip = epoch + 1, 0
        return rank_share(self._batches()[skip:], self.lengths)

    def seek(self, batches_done: int) -> None:
        """Point at the batch that follows ``batches_done`` batches since the start of training:
        epoch by epoch, from the lengths of the deterministic (seed, epoch) epochs."""
        epoch = 0
        while True:
            self.sampler.set_epoch(epoch)
            n = len(self)
            if batches_done < n or n == 0:
                break
            batches_done -= n
            epoch += 1
        self.cursor, self.skip = epoch, batches_done


class TokenBudgetBatchSampler(EpochBatchSampler):
    """Batches whose cost stays within ``max_tokens``.

    Cost of a batch: ``len(batch) * longest`` when padded, ``sum of lengths`` when packed. Padded
    batches come from pools of ``pool_batches`` batches' worth of texts sorted by length (similar
    lengths share a batch), and the batches are then shuffled, so each epoch mixes differently.
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int, packed: bool = False, seed: int = 0,
                 shuffle: bool = True, pool_batches: int = 64) -> None:
        if max(lengths, default=0) > max_tokens:
            raise ValueError(f"data.batching.batch_tokens {max_tokens} is smaller than one text ({max(lengths)} "
                             "tokens); raise data.batching.batch_tokens to at least data.windows.max_length")
        super().__init__(lengths, len(lengths), seed, shuffle)
        self.max_tokens, self.packed, self.seed, self.shuffle = max_tokens, packed, seed, shuffle
        self.pool_batches = pool_batches
        self._cached: tuple[int, list[list[int]]] | None = None

    def _batches(self) -> list[list[int]]:
        epoch = self.sampler.epoch
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        order = list(self.sampler)
        if not self.packed:  # sort within pools: long texts with long ones, short with short
            mean = sum(self.lengths) / max(1, len(self.lengths))
            pool = max(1, int(self.pool_batches * self.max_tokens / max(1.0, mean)))
            order = [i for s in range(0, len(order), pool)
                     for i in sorted(order[s:s + pool], key=lambda i: -self.lengths[i])]
        batches, batch, longest, total = [], [], 0, 0
        for i in order:
            n = self.lengths[i]
            cost = (len(batch) + 1) * max(longest, n) if not self.packed else total + n
            if batch and cost > self.max_tokens:
                batches.append(batch)
                batch, longest, total = [], 0, 0
            batch.append(i)
            longest, total = max(longest, n), total + n
        if batch:
            batches.append(batch)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch + 1).shuffle(batches)
        self._cached = (epoch, batches)
        return batches

    def __len__(self) -> int:
        return len(self._batches())


class FixedBatchSampler(EpochBatchSampler):
    """``batch_size`` texts per batch from an ``EpochPermutation``: the same batches for the same
    (seed, epoch), so a resumed run can skip exactly the batches it had done."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 lengths: Sequence[int] | None = None) -> None:
        super().__init__(lengths, n, seed, shuffle)
        self.batch_size, self.drop_last = batch_size, drop_last

    def _batches(self) -> list[list[int]]:
        order = list(self.sampler)
        cut = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        return [order[i:i + self.batch_size] for i in range(0, cut, self.batch_size)]

    def __len__(self) -> int:
        n = self.sampler.n
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def rank_share(batches: list[list[int]], lengths: Sequence[int] | None) -> list[list[int]]:
    """This rank's part of each global batch, split by token count across ranks (one process:
    the batches themselves). Every rank sees the same number of batches, so DDP stays in step."""
    rank, size = world()
    if size == 1:
        return batches
    if lengths is None:
        raise ValueError("splitting batches over ranks needs the texts' token counts (lengths=)")
    return [[b[i] for i in balance([lengths[j] for j in b], size)[rank]] for b in batches]


class ResumableLoader(DataLoader):
    """A DataLoader that resumes mid-epoch exactly where training stopped.

    When the first batch of a process is asked for, the batch sampler seeks to the batch after
    ``batches_done()`` (optimizer steps x accumulation: the one exact count a checkpoint
    restores; Lightning's own epoch and batch counters are not settled yet at that point, and a
    checkpoint written on an epoch's last batch is one epoch behind). A fresh run seeks to batch
    0. So a resumed run sees the batches the uninterrupted one would have, in the same order.
    ``state_dict`` / ``load_state_dict`` tell Lightning the loader is resumable.
    """

    def __init__(self, *args, batches_done: Callable[[], int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done = batches_done
        self.batch_sampler.start_at = batches_done

    def state_dict(self) -> dict:
        return {"batches_done": self.batches_done()}

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.start_at = self.batches_done  # seek again on the next first batch
