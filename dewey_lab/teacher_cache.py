"""Content-addressed store of teacher embeddings.

A key is ``sha256(teacher fingerprint + text)``, where the fingerprint covers teacher id,
revision, prompt, max length and normalisation (``Teacher.fingerprint``). Any run that shares
text with an earlier one, under the same teacher, shares its teacher work: a theta ablation
costs zero teacher time after its first variant.

Storage is one SQLite database in WAL mode: SQLite is well kept, every ``put_many`` is one
transaction, so a process killed mid-write loses at most the batch it was writing and never
corrupts what was committed; several processes may write at once (SQLite serialises them,
``busy_timeout`` makes them wait). Vectors are stored as raw little-endian float32 or float16
bytes (``dtype``), 4*D or 2*D bytes each plus ~40 bytes of key and row overhead.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vectors (key BLOB PRIMARY KEY, vec BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def cache_key(fingerprint: str, text: str) -> bytes:
    """The 32-byte content address of ``text`` embedded by the teacher described by ``fingerprint``."""
    h = hashlib.sha256(fingerprint.encode())
    h.update(b"\x00")
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.digest()


class TeacherCache:
    """Embedding store at ``path`` (a directory; the database is ``path/embeddings.sqlite``)."""

    def __init__(self, path: str | Path, dtype: str = "float32") -> None:
        if dtype not in ("float32", "float16"):
            raise ValueError(f"teacher cache dtype must be 'float32' or 'float16', got {dtype!r}")
        self.dir = Path(path)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(f"cannot create teacher cache dir {self.dir} ({err.strerror}); "
                          "set data.cache_dir to a writable directory") from err
        self.file = self.dir / "embeddings.sqlite"
        self._np_dtype = np.dtype(dtype).newbyteorder("<")
        self._conn: sqlite3.Connection | None = None
        self.dtype = self._meta("dtype", dtype)
        if self.dtype != dtype:
            raise ValueError(f"teacher cache {self.file} stores {self.dtype}, asked for {dtype}; "
                             f"set data.cache_dtype: {self.dtype} or use another data.cache_dir")

    # -- connection -------------------------------------------------------------------------
    @property
    def conn(self) -> sqlite3.Connection:
        # opened lazily so the object pickles into DataLoader workers and opens there
        if self._conn is None:
            self._conn = sqlite3.connect(self.file, timeout=60.0, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable commits, no corruption
            self._conn.executescript(_SCHEMA)
        return self._conn

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_conn"] = None
        return state

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _meta(self, name: str, default: str | None = None) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        if row is None and default is not None:
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (name, default))
            return self._meta(name)
        return None if row is None else row[0]

    @property
    def dim(self) -> int | None:
        value = self._meta("dim")
        return None if value is None else int(value)

    # -- reads ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]

    def missing(self, keys: Iterable[bytes]) -> list[bytes]:
        """The keys not stored yet, in first-seen order, without duplicates."""
        out, seen = [], set()
        for batch in _batched(list(dict.fromkeys(keys)), 500):
            q = f"SELECT key FROM vectors WHERE key IN ({','.join('?' * len(batch))})"
            seen.update(r[0] for r in self.conn.execute(q, batch))
            out.extend(k for k in batch if k not in seen)
        return out

    def get_many(self, keys: Sequence[bytes]) -> np.ndarray:
        """Vectors for ``keys`` as a float32 array (N, D); raises KeyError on a missing key."""
        found: dict[bytes, bytes] = {}
        for batch in _batched(list(dict.fromkeys(keys)), 500):
            q = f"SELECT key, vec FROM vectors WHERE key IN ({','.join('?' * len(batch))})"
            found.update(self.conn.execute(q, batch))
        dim = self.dim
        out = np.empty((len(keys), dim or 0), dtype=np.float32)
        for i, k in enumerate(keys):
            blob = found.get(k)
            if blob is None:
                raise KeyError(f"teacher cache {self.file} has no vector for key {k.hex()[:16]}; "
                               "run the data module's prepare_data (it fills the cache) first")
            out[i] = np.frombuffer(blob, dtype=self._np_dtype)
        return out

    # -- writes -----------------------------------------------------------------------------
    def put_many(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        """Store ``vectors`` (N, D) under ``keys`` in one transaction (all or nothing)."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or len(keys) != len(vectors):
            raise ValueError(f"put_many needs N keys and an (N, D) array, got {len(keys)} and {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise ValueError("refusing to cache non-finite teacher vectors; run the teacher in bf16/fp32, not fp16")
        dim = self.dim
        if dim is not None and vectors.shape[1] != dim:
            raise ValueError(f"teacher returned {vectors.shape[1]}-d vectors but cache {self.file} holds {dim}-d; "
                             "a different teacher needs its own data.cache_dir")
        blobs = vectors.astype(self._np_dtype, copy=False)
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            if dim is None:
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('dim', ?)", (str(vectors.shape[1]),))
            conn.executemany("INSERT OR IGNORE INTO vectors VALUES (?, ?)",
                             ((k, blobs[i].tobytes()) for i, k in enumerate(keys)))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _batched(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]
