"""The former one-table layout of a vector store (``embeddings.sqlite``: ``meta(name, value)``, ``vectors(key,
vec BLOB)``), read block by block for its one-time import.

A leaf: it knows the old file, not the store. ``VectorStore`` imports it on open (``vectors.py``, which holds the
store's lock and appends the rows), so the store does not import its maintenance tools (``maintenance.py``
builds on the store, never the other way round: no import circle, ``tests/test_layout.py``).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from dewey_lab.data.store.index import LEGACY_NAME

BLOCK = 4096  # rows per read of the former table


def legacy_dtype(legacy: Path) -> str:
    """The dtype the former store kept its vectors in (``float32`` where its meta table says none)."""
    src = sqlite3.connect(legacy, timeout=60.0)
    try:
        return dict(src.execute("SELECT name, value FROM meta")).get("dtype", "float32")
    finally:
        src.close()


def legacy_blocks(legacy: Path, block: int = BLOCK) -> Iterator[tuple[list[bytes], bytes]]:
    """(keys, their vectors' bytes joined) in key order, ``block`` rows at a time."""
    src = sqlite3.connect(legacy, timeout=60.0)
    try:
        last = b""
        while True:
            rows = src.execute("SELECT key, vec FROM vectors WHERE key > ? ORDER BY key LIMIT ?",
                               (last, block)).fetchall()
            if not rows:
                return
            yield [r[0] for r in rows], b"".join(r[1] for r in rows)
            last = rows[-1][0]
    finally:
        src.close()


def retire(legacy: Path) -> None:
    """Rename the imported file ``embeddings.sqlite.migrated``: kept, never imported again."""
    os.replace(legacy, legacy.with_name(LEGACY_NAME + ".migrated"))
