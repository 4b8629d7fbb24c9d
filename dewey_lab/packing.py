"""Batches by token count, and several documents per row.

Two independent switches under ``data``:

* ``pack: true`` lays out a batch's texts as documents packed into rows (first-fit decreasing),
  instead of one text per row padded to the longest. Attention never crosses a document
  boundary (a block-diagonal mask on SDPA/eager, ``cu_seqlens`` on flash-attn), positions restart
  at 0 for each document, and pooling reads each document's own tokens: the embeddings are the
  unpacked ones (tested to 1e-5). Packing changes the layout, not the batch: the same texts meet
  in the similarity loss.
* ``batch_tokens: N`` cuts batches to a token budget instead of ``batch_size`` texts: sorted by
  length within pools when padded (little padding), in shuffled order when packed (packing leaves
  no padding to save). The number of texts per batch then varies.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Item indices per row: each item goes into the first row with room, longest items first.

    Rows never exceed ``capacity``; FFD uses at most 11/9 OPT + 1 rows.
    """
    too_long = [n for n in lengths if n > capacity]
    if too_long:
        raise ValueError(f"a text of {max(too_long)} tokens does not fit a packed row of {capacity}; "
                         "set data.pack_length >= data.max_length")
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


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Batches whose cost stays within ``max_tokens``.

    Cost of a batch: ``len(batch) * longest`` when padded, ``sum of lengths`` when packed. Padded
    batches come from pools of ``pool_batches`` batches' worth of texts sorted by length (similar
    lengths share a batch), and the batches are then shuffled, so each epoch mixes differently.
    ``max_texts`` caps texts per batch. The inner ``sampler`` (an ``EpochPermutation``) is where
    Lightning sets the epoch.
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int, packed: bool = False, max_texts: int | None = None,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False, pool_batches: int = 64) -> None:
        if max(lengths, default=0) > max_tokens:
            raise ValueError(f"data.batch_tokens {max_tokens} is smaller than one text ({max(lengths)} tokens); "
                             "raise data.batch_tokens to at least data.max_length")
        self.lengths, self.max_tokens, self.packed = list(lengths), max_tokens, packed
        self.max_texts, self.seed, self.shuffle, self.drop_last = max_texts, seed, shuffle, drop_last
        self.pool_batches = pool_batches
        self.sampler = EpochPermutation(len(self.lengths), seed, shuffle)
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
            if batch and (cost > self.max_tokens or (self.max_texts and len(batch) >= self.max_texts)):
                batches.append(batch)
                batch, longest, total = [], 0, 0
            batch.append(i)
            longest, total = max(longest, n), total + n
        if batch and not (self.drop_last and len(batches) > 0):
            batches.append(batch)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch + 1).shuffle(batches)
        self._cached = (epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())

