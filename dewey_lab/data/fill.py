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
from collections.abc import Collection, Iterable, Mapping
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
    checked: int = 0
    """Embedded texts whose teacher length was counted (0: nothing embedded, or the teacher cannot tell)."""
    checked_whole: int = 0
    """Of those, whole texts (a window's first key); -1: the caller could not tell wholes from chunks."""
    long_whole: int = 0
    """Embedded whole texts longer than the teacher's window (cut with long_text truncate, split with pcw)."""
    long_chunks: int = 0
    """Embedded chunks (or texts, where wholes are not told apart) longer than the teacher's window."""
    long_text: str = "truncate"
    """The teacher's ``long_text``: what happened to the long ones."""

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.unique_texts)

    @property
    def long(self) -> int:
        return self.long_whole + self.long_chunks

    @property
    def long_fraction(self) -> float:
        return self.long / max(1, self.checked)

    def add(self, other: FillStats) -> None:
        split = self.checked_whole >= 0 and other.checked_whole >= 0
        self.unique_texts += other.unique_texts
        self.hits += other.hits
        self.misses += other.misses
        self.teacher_seconds += other.teacher_seconds
        self.checked += other.checked
        self.checked_whole = self.checked_whole + other.checked_whole if split else -1
        self.long_whole += other.long_whole
        self.long_chunks += other.long_chunks
        self.long_text = other.long_text if other.checked else self.long_text

    def truncated(self) -> dict:
        """``teacher/truncated`` for run_info.json: counts and fraction of the texts this fill embedded."""
        out = {"embedded": self.misses, "counted": self.checked, "long": self.long,
               "fraction": round(self.long_fraction, 6), "long_text": self.long_text}
        if self.checked_whole >= 0:
            out.update(whole=self.long_whole, whole_counted=self.checked_whole, chunks=self.long_chunks,
                       chunks_counted=self.checked - self.checked_whole)
        return out


def count_long(texts: Mapping[bytes, str], keys: list[bytes], teacher, wholes: Collection[bytes] | None,
               stats: FillStats) -> None:
    """Add to ``stats`` how many of ``keys`` (texts about to be embedded) exceed the teacher's window: one
    batched tokenizer call; nothing when the teacher cannot tell (``Teacher.too_long`` is None)."""
    long = teacher.too_long([texts[k] for k in keys])
    if long is None:
        return
    whole = [wholes is not None and k in wholes for k in keys]
    stats.checked += len(keys)
    if stats.checked_whole >= 0:
        stats.checked_whole += sum(whole)
    stats.long_whole += int(sum(bool(x) and w for x, w in zip(long, whole)))
    stats.long_chunks += int(sum(bool(x) and not w for x, w in zip(long, whole)))


def fill(texts: Mapping[bytes, str], teacher, store, block: int = 2048, progress: bool = False,
         wholes: Collection[bytes] | None = None) -> FillStats:
    """Embed every text of ``texts`` (cache key -> text) that ``store`` lacks with ``teacher``, ``block``
    texts per teacher call and commit, longest first (similar lengths share a teacher batch). ``wholes``:
    the keys of whole texts (a window's first key), so the long-text count tells them from chunks; None
    counts every text as one kind."""
    missing = store.missing(list(texts))
    stats = FillStats(len(texts), len(texts) - len(missing), len(missing),
                      checked_whole=0 if wholes is not None else -1,
                      long_text=getattr(teacher, "long_text", "truncate"))
    if not missing:
        return stats
    from tqdm.auto import tqdm

    missing.sort(key=lambda k: len(texts[k]), reverse=True)
    t0 = time.perf_counter()
    with tqdm(total=len(missing), desc="teacher fill", unit="text", disable=not progress) as bar:
        for i in range(0, len(missing), block):
            keys = missing[i:i + block]
            count_long(texts, keys, teacher, wholes, stats)
            store.put_many(keys, teacher.encode([texts[k] for k in keys]))  # committed: a kill loses this block
            bar.update(len(keys))
    stats.teacher_seconds = time.perf_counter() - t0
    return stats


def fill_blocks(groups: Iterable[Mapping[bytes, str]], teacher, store, block: int = 2048) -> FillStats:
    """``fill`` of a huge or endless stream of text groups (a window's: key -> text, the whole text's
    key first), in bounded memory: whole groups are gathered until ``block`` distinct texts, then filled."""
    total, texts, wholes = FillStats(), {}, set()
    for group in groups:
        texts.update(group)
        wholes.update(list(group)[:1])
        if len(texts) >= block:
            total.add(fill(texts, teacher, store, block, wholes=wholes))
            texts.clear()
            wholes.clear()
    total.add(fill(texts, teacher, store, block, wholes=wholes))
    return total


LONG_WARN = 0.01  # warn when more than this fraction of the embedded texts is cut by the teacher


def truncation_line(stats: FillStats) -> str:
    """``teacher/truncated ...``: of the texts this fill embedded, those longer than the teacher's window."""
    if not stats.misses:
        return "teacher/truncated: 0 embedded"
    if not stats.checked:
        return f"teacher/truncated: not counted ({stats.misses} embedded; the teacher cannot count its tokens)"
    what = "split (pcw)" if stats.long_text == "pcw" else "truncated"
    line = f"teacher/truncated: {stats.long}/{stats.checked} embedded texts {what} ({stats.long_fraction:.1%})"
    if stats.checked_whole >= 0:
        line += (f": whole {stats.long_whole}/{stats.checked_whole}, "
                 f"chunks {stats.long_chunks}/{stats.checked - stats.checked_whole}")
    return line


def warn_truncation(stats: FillStats) -> None:
    """A warning naming the fix when more than 1% of the embedded texts lost their end to the teacher's window."""
    if stats.long_text == "truncate" and stats.checked and stats.long_fraction > LONG_WARN:
        log.warning("the teacher truncated %d of %d embedded texts (%.1f%%, longer than its window): their "
                    "targets miss their ends; set data.teacher.init_args.long_text: pcw, or raise "
                    "data.teacher.init_args.max_length, or use shorter windows (data.windows.max_length)",
                    stats.long, stats.checked, 100 * stats.long_fraction)


def report(stats: FillStats, store) -> None:
    msg = (f"teacher cache {store.file}: {stats.unique_texts} unique texts, {stats.hits} hits, "
           f"{stats.misses} misses (hit rate {stats.hit_rate:.1%}), teacher time {stats.teacher_seconds:.1f}s; "
           f"{truncation_line(stats)}")
    log.info(msg)
    print(msg, flush=True)
    warn_truncation(stats)


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
