"""The vector store's SQLite index: its schema, how a process opens it, and its write transactions.

Tables (``index.sqlite``; ``vectors.py`` says why the index is SQLite and the vectors are not)::

    meta(name, value)              dtype, dim, format, count
    vectors(key, shard, row, crc)  WITHOUT ROWID; crc = zlib.crc32 of the row's stored bytes
    shards(id, rows)               rows = the shard's committed rows; bytes past them are never read
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

INDEX_NAME = "index.sqlite"  # the store's SQLite index
LEGACY_NAME = "embeddings.sqlite"  # the former one-table layout, imported once on open
IN_BATCH = 900  # keys per "WHERE key IN (...)" query

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vectors (key BLOB PRIMARY KEY, shard INTEGER NOT NULL, row INTEGER NOT NULL,
                                    crc INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS shards (id INTEGER PRIMARY KEY AUTOINCREMENT, rows INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('format', '2');
INSERT OR IGNORE INTO meta VALUES ('count', '0');
"""


def connect(file: Path, read_only: bool) -> sqlite3.Connection:
    """Open the index at ``file`` for this process (autocommit; transactions are explicit).

    Writable: WAL, so several processes write at once and readers never wait. Read-only (the
    directory cannot be written): ``mode=ro``, else ``immutable=1`` when WAL's shared-memory file
    cannot be made; a read-only directory without an index reads as an empty store.
    """
    if not read_only:
        conn = sqlite3.connect(file, timeout=60.0, isolation_level=None)
        for attempt in range(50):  # switching to WAL needs a moment alone with a brand-new file
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError:
                if attempt == 49:
                    raise
                time.sleep(0.1)
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: no corruption; shards are fsynced first
        conn.execute("PRAGMA journal_size_limit=67108864")
        conn.execute("PRAGMA cache_size=-65536")
        conn.executescript(SCHEMA)
        return conn
    if not file.exists():  # nothing stored yet, and nothing can be: an empty store
        conn = sqlite3.connect(":memory:", isolation_level=None)
        conn.executescript(SCHEMA)
        return conn
    last: Exception | None = None
    for query in ("?mode=ro", "?mode=ro&immutable=1"):  # immutable: WAL's -shm file cannot be created
        conn = None
        try:
            conn = sqlite3.connect(file.resolve().as_uri() + query, uri=True, timeout=60.0, isolation_level=None)
            conn.execute("SELECT value FROM meta LIMIT 1").fetchall()
            return conn
        except sqlite3.OperationalError as err:
            last = err
            if conn is not None:
                conn.close()
    raise OSError(f"cannot read teacher cache {file} ({last}); copy it to a writable directory")


@contextmanager
def write_txn(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (unless SQLite already did)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def batched(items: list, n: int) -> Iterator[list]:
    """``items`` in consecutive slices of at most ``n``."""
    for i in range(0, len(items), n):
        yield items[i:i + n]
