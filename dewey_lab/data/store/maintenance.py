"""Looking after a vector store: verify (and repair), gc and merge.

``dewey-lab cache verify|gc|merge DIR`` (``cli.py``) calls these, and code that checks a store calls
``verify(store)``. This module builds on the store (``vectors.VectorStore``, its lock and private readers);
the store never imports it, so the two make no import circle (``tests/test_layout.py``). Each works block
by block over the index in key order (``_scan``), so memory holds one block whatever the store's size,
and writes shard bytes only through ``shards.ShardWriter``, as ``put_many`` does.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dewey_lab.data.store.index import write_txn
from dewey_lab.data.store.shards import SHARD_RE, ShardGone, ShardWriter, fsync_dir

if TYPE_CHECKING:  # this module builds on the store; the store never imports it
    from dewey_lab.data.store.vectors import VectorStore

_SCAN_CHUNK = 65536  # index rows per step of verify / gc


def verify(store: VectorStore, repair: bool = False) -> dict:
    """Check every index entry against its shard: committed row, file long enough, crc32 of its bytes.

    ``repair=True`` deletes the bad entries (so ``missing`` reports them and the next fill recomputes
    them) and corrects the stored vector count.
    """
    if repair and store.read_only:
        raise store._read_only_error()
    with (store._locked() if not store.read_only else nullcontext()):  # no gc meanwhile
        rb, dim = store._rowbytes(), store.dim
        shards = store._shards()
        maps: dict[int, np.ndarray] = {}  # shard -> its committed rows that the file holds, (rows, D)
        counts = {"checked": 0, "bad_crc": 0, "past_committed": 0, "no_shard": 0, "short_file": 0}
        bad: list[tuple[bytes, int, int]] = []
        for chunk in _scan(store):
            chunk.sort(key=lambda e: (e[1], e[2]))  # file order within the chunk
            for key, shard, row, crc in chunk:
                counts["checked"] += 1
                if shards.get(shard, -1) <= row:  # maybe committed after we listed shards
                    shards = store._shards()
                m = maps.get(shard)
                if shard in shards and row < shards[shard] and (m is None or row >= len(m)):
                    path = store._shard_path(shard)
                    size = path.stat().st_size if path.exists() else 0
                    rows = min(shards[shard], size // rb)
                    m = maps[shard] = (np.memmap(path, dtype=store._np_dtype, mode="r", shape=(rows, dim))
                                       if rows else np.empty((0, dim), store._np_dtype))
                if shard not in shards:
                    why = "no_shard"
                elif row >= shards[shard]:
                    why = "past_committed"
                elif row >= len(m):
                    why = "short_file"
                elif zlib.crc32(m[row]) != crc:
                    why = "bad_crc"
                else:
                    continue
                counts[why] += 1
                bad.append((key, shard, row))
        conn = store.conn
        conn.execute("BEGIN")  # one snapshot for both counts
        stored, actual = len(store), conn.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
        conn.execute("COMMIT")
        out = {**counts, "bad": len(bad), "bad_keys": [k.hex() for k, _, _ in bad[:10]],
               "count_ok": stored == actual, "repaired": 0}
        if repair and (bad or stored != actual):
            with write_txn(conn):
                out["repaired"] = conn.executemany("DELETE FROM vectors WHERE key=? AND shard=? AND row=?",
                                                   bad).rowcount
                conn.execute("UPDATE meta SET value=(SELECT COUNT(*) FROM vectors) WHERE name='count'")
        return out


def gc(store: VectorStore) -> dict:
    """Compact: copy every referenced row into fresh shards, swap the index in one transaction,
    delete the old shard files. Holds the lock alone: writers wait, readers go on."""
    if store.read_only:
        raise store._read_only_error()
    t0 = time.perf_counter()
    with store._locked(exclusive=True):
        before = store.stats()
        conn, dim = store.conn, store.dim
        old = store._shards()
        rb = store._rowbytes()
        # the new shards' index rows join the swap's transaction: a failed gc leaves no trace in the index
        writer = None if dim is None else ShardWriter(
            store._shard_path, rb, store.max_shard_bytes,
            claim=lambda: conn.execute("INSERT INTO shards (rows) VALUES (0)").lastrowid)
        orphans = _orphan_files(store, old)
        if (writer is not None and before["unreferenced_rows"] == 0 and not orphans
                and len(old) <= -(-before["vectors"] // writer.cap)):
            return {**_gc_result(before, before, t0), "compacted": False}
        step = max(1024, min(_SCAN_CHUNK, (64 << 20) // max(rb, 1)))  # ~64 MB of rows in memory at a time
        conn.execute("BEGIN IMMEDIATE")
        try:
            for chunk in _scan(store, step) if writer is not None else ():
                pos = np.array([(s, r) for _, s, r, _ in chunk], dtype=np.int64)  # (n, 2): shard, row
                buf = np.empty((len(chunk), dim), dtype=store._np_dtype)  # (n, D)
                try:
                    store._read_rows(pos[:, 0], pos[:, 1], buf)
                except ShardGone as gone:
                    raise OSError(f"teacher cache {store.dir}: shard {gone.args[0]} named by the index is gone; "
                                  f"run `dewey-lab cache verify --repair {store.dir}` before gc") from None
                plan = writer.write(memoryview(buf).cast("B"))
                conn.executemany("UPDATE vectors SET shard=?, row=? WHERE key=?",
                                 ((shard, start + j, chunk[lo + j][0])
                                  for shard, start, lo, take in plan for j in range(take)))
            new = {} if writer is None else writer.ends
            if writer is not None:
                writer.close()
            fsync_dir(store.shard_dir)
            for shard, rows in new.items():
                conn.execute("UPDATE shards SET rows=? WHERE id=?", (rows, shard))
            conn.executemany("DELETE FROM shards WHERE id=?", ((s,) for s in old))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if writer is not None:
                writer.abort()
                for shard in writer.started:  # their ids went back with the rollback
                    store._shard_path(shard).unlink(missing_ok=True)
            raise
        for shard in old:
            store._shard_path(shard).unlink(missing_ok=True)
        for path in _orphan_files(store, new):
            path.unlink(missing_ok=True)
        fsync_dir(store.shard_dir)
        store._maps = {}
        store._own = None
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return {**_gc_result(before, store.stats(), t0), "compacted": True}


def merge(store: VectorStore, other: VectorStore, block: int = 8192) -> dict:
    """Copy every vector of ``other`` that ``store`` lacks (e.g. caches filled on different nodes,
    since SQLite's WAL cannot be shared over a network filesystem). Block by block, each block one
    commit, so a killed merge resumes where it stopped."""
    if other.dim is not None and store.dim is not None and other.dim != store.dim:
        raise ValueError(f"cannot merge {other.dir} ({other.dim}-d) into {store.dir} ({store.dim}-d): "
                         "different teachers need different caches")
    copied = seen = 0
    for chunk in _scan(other, block):
        keys = [row[0] for row in chunk]
        seen += len(keys)
        new = store.missing(keys)
        if new:
            store.put_many(new, other.get_many(new))
            copied += len(new)
    return {"source_vectors": seen, "copied": copied, "already_here": seen - copied, "vectors": len(store)}


def _scan(store: VectorStore, step: int = _SCAN_CHUNK) -> Iterator[list[tuple[bytes, int, int, int]]]:
    """The index in key order, in chunks of ``step`` (key, shard, row, crc)."""
    last = b""
    while True:
        rows = store.conn.execute("SELECT key, shard, row, crc FROM vectors WHERE key > ? ORDER BY key LIMIT ?",
                                  (last, step)).fetchall()
        if not rows:
            return
        last = rows[-1][0]
        yield rows


def _orphan_files(store: VectorStore, shards: dict[int, int]) -> list[Path]:
    """Shard files no ``shards`` row names (a gc killed after its commit, or before it)."""
    out = []
    for path in store.shard_dir.iterdir() if store.shard_dir.exists() else ():
        m = SHARD_RE.match(path.name)
        if m and int(m.group(1)) not in shards:
            out.append(path)
    return out


def _gc_result(before: dict, after: dict, t0: float) -> dict:
    return {"vectors": after["vectors"], "shards_before": before["shards"], "shards_after": after["shards"],
            "bytes_before": before["shard_bytes"] + before["index_bytes"],
            "bytes_after": after["shard_bytes"] + after["index_bytes"],
            "rows_dropped": before["shard_rows"] - after["shard_rows"], "seconds": round(time.perf_counter() - t0, 2)}
