"""The teacher fill: embed the texts the vector store lacks, block by block. One routine (``fill``) for
every caller: ``prepare_data`` (every window up front), ``dewey-lab fill`` (the same, or a stream's
windows in bounded memory: ``fill_blocks``) and a stream's batches that arrive with texts missing
(``streaming.StreamLoader``).

The store is content-addressed (teacher fingerprint + text), so a second fill with the same teacher
is all hits, and every run that shares text shares teacher work. Each block is committed as it is
embedded: a killed fill loses one block at most.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)


@dataclass
class CacheConfig:
    """Where the teacher's vectors live and how the fill writes them; YAML keys under ``data.cache``."""

    dir: str = "data/teacher_cache"
    """The teacher's vector store (content-addressed by teacher and text; shared by every run)."""
    dtype: Literal["float32", "float16"] = "float32"
    """Storage precision of the cached vectors."""
    fill_block: int = 2048
    """Texts per teacher call and store commit during the fill (a kill loses at most one block)."""
    fill_shard: str | None = None
    """``"k/N"``: this process embeds only the k-th of N disjoint shards of the texts (by key; a stream's
    by document), e.g. one job of a ``dewey-lab fill`` array; the store takes N writers at once."""


@dataclass
class FillStats:
    unique_texts: int = 0
    hits: int = 0
    misses: int = 0
    teacher_seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.unique_texts)

    def add(self, other: FillStats) -> None:
        self.unique_texts += other.unique_texts
        self.hits += other.hits
        self.misses += other.misses
        self.teacher_seconds += other.teacher_seconds


def fill(texts: Mapping[bytes, str], teacher, store, block: int = 2048, progress: bool = False) -> FillStats:
    """Embed every text of ``texts`` (cache key -> text) that ``store`` lacks with ``teacher``, ``block``
    texts per teacher call and commit, longest first (similar lengths share a teacher batch)."""
    missing = store.missing(list(texts))
    stats = FillStats(len(texts), len(texts) - len(missing), len(missing))
    if not missing:
        return stats
    from tqdm.auto import tqdm

    missing.sort(key=lambda k: len(texts[k]), reverse=True)
    t0 = time.perf_counter()
    with tqdm(total=len(missing), desc="teacher fill", unit="text", disable=not progress) as bar:
        for i in range(0, len(missing), block):
            keys = missing[i:i + block]
            store.put_many(keys, teacher.encode([texts[k] for k in keys]))  # committed: a kill loses this block
            bar.update(len(keys))
    stats.teacher_seconds = time.perf_counter() - t0
    return stats


def fill_blocks(groups: Iterable[Mapping[bytes, str]], teacher, store, block: int = 2048) -> FillStats:
    """``fill`` of a huge or endless stream of text groups (a window's: key -> text), in bounded memory:
    whole groups are gathered until ``block`` distinct texts, then filled."""
    total, texts = FillStats(), {}
    for group in groups:
        texts.update(group)
        if len(texts) >= block:
            total.add(fill(texts, teacher, store, block))
            texts.clear()
    total.add(fill(texts, teacher, store, block))
    return total


def report(stats: FillStats, store) -> None:
    msg = (f"teacher cache {store.file}: {stats.unique_texts} unique texts, {stats.hits} hits, "
           f"{stats.misses} misses (hit rate {stats.hit_rate:.1%}), teacher time {stats.teacher_seconds:.1f}s")
    log.info(msg)
    print(msg, flush=True)


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """``"k/N"`` -> (k, N); None -> None."""
    if shard is None:
        return None
    try:
        k, n = (int(x) for x in str(shard).split("/"))
    except ValueError:
        k, n = -1, 0
    if not 0 <= k < n:
        raise ValueError(f"data.cache.fill_shard must be 'k/N' with 0 <= k < N (e.g. 0/4), got {shard!r}")
    return k, n


def key_in_shard(key: bytes, shard: tuple[int, int] | None) -> bool:
    """Whether the text with cache key ``key`` is this fill shard's to embed (all are without a shard)."""
    return shard is None or int.from_bytes(key[:8], "little") % shard[1] == shard[0]
