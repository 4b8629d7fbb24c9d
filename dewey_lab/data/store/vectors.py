"""Content-addressed store of teacher embeddings, built for 1e8 vectors.

A key is ``sha256(teacher fingerprint + text)``, where the fingerprint covers teacher id,
revision, prompt, max length and normalisation (``Teacher.fingerprint``). Any run that shares
text with an earlier one, under the same teacher, shares its teacher work: a theta ablation
costs zero teacher time after its first variant.

Layout of ``cache_dir``::

    index.sqlite              SQLite (WAL): meta(name, value)        dtype, dim, format, count
                                            vectors(key, shard, row, crc)  WITHOUT ROWID
                                            shards(id, rows)       rows = committed rows
    shards/shard-000001.f16   raw little-endian rows of D * itemsize bytes, no header, append-only
    lock                      flock: writers share it around each put, gc takes it exclusively

Why two parts. The paper's run caches ~1e8 vectors of 4096-d (fp16: 8 KiB each, ~0.8 TB).

* The index is SQLite because SQLite gives, for free, what is hard to get right: atomic commits
  that survive a kill or a power cut, and several writer processes at once (WAL + busy timeout
  serialise their short transactions). An index entry is ~54 bytes, so 1e8 keys are ~5.4 GB.
* The vectors are not SQLite BLOBs: an 8 KiB BLOB does not fit a 4 KiB page, so each lives in a
  chain of overflow pages, every read copies it page by page, and freed chains bloat the file.
  Raw shard files read through ``np.memmap`` make ``get_many`` one fancy-index gather per shard
  (no per-row copy or decode), and appends are plain sequential writes.
* LMDB would need its map size fixed in advance and admits one writer at a time across all
  processes; Arrow / Parquet files are immutable, so appending means new files plus an index of
  which file holds which key, which is what this is, with SQLite as that index.

Writing. Each writing process owns a shard (claimed on its first put by inserting a ``shards``
row; a fresh one once it reaches ``max_shard_bytes``, default 1 GiB), so no two processes ever
write the same file. A block: truncate the shard to its committed ``rows * rowbytes`` (drops a
tail left by a killed writer), append the rows of keys not yet indexed, flush + fsync, then one
``BEGIN IMMEDIATE`` transaction inserts the index rows (``INSERT OR IGNORE``: a key another
process indexed meanwhile keeps that process's row, ours is just unreferenced) and advances
``shards.rows``. The data is durable before the index names it, so a kill at any point leaves the
old or the new committed state; bytes past ``rows`` are never read and are truncated by the
owner's next write, or on open / by ``gc`` when no put is in flight. ``crc`` is ``zlib.crc32`` of
a row's stored bytes: ``verify`` recomputes it, ``verify(repair=True)`` drops bad entries so the
next fill recomputes them, ``gc`` compacts away unreferenced rows (``dewey-lab cache ...``).

On-disk size per million vectors: D * itemsize bytes of shard data plus the index, measured at
54 bytes per vector (53.7 on stores of 200k and of 1M vectors, ``benchmarks/cache_throughput.py``;
random 32-byte keys leave B-tree pages partly empty). The paper's 1e8 x 4096 fp16 is ~825 GB:

    ====  ========  ========
    dim   float32   float16
    ====  ========  ========
    384   1.59 GB   0.82 GB
    768   3.13 GB   1.59 GB
    1024  4.15 GB   2.10 GB
    4096  16.44 GB  8.25 GB
    ====  ========  ========

A directory that cannot be written (a shared read-only copy) opens for reads (``mode=ro``, or
``immutable=1`` when WAL's shared-memory file cannot be made); ``put_many`` then says so.
A store in the former one-SQLite-table layout (``embeddings.sqlite``) is imported once on open
and renamed ``embeddings.sqlite.migrated``.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import sqlite3
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

FORMAT = 2
INDEX_NAME = "index.sqlite"
LEGACY_NAME = "embeddings.sqlite"
_SHARD_RE = re.compile(r"^shard-(\d+)\.f(16|32)$")
_IN_BATCH = 900  # keys per "WHERE key IN (...)" query
_SCAN_CHUNK = 65536  # index rows per step of verify / gc / migration
_INHERITED: list = []  # connections inherited through fork: never used nor closed in the child (SQLite's rule)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vectors (key BLOB PRIMARY KEY, shard INTEGER NOT NULL, row INTEGER NOT NULL,
                                    crc INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS shards (id INTEGER PRIMARY KEY AUTOINCREMENT, rows INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('format', '2');
INSERT OR IGNORE INTO meta VALUES ('count', '0');
"""


def cache_key(fingerprint: str, text: str) -> bytes:
    """The 32-byte content address of ``text`` embedded by the teacher described by ``fingerprint``."""
    h = hashlib.sha256(fingerprint.encode())
    h.update(b"\x00")
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.digest()


def _probe_write(path: Path) -> str | None:
    """None when files can be created in ``path``, else why not (root passes whatever the mode bits)."""
    probe = path / f".probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as err:
        return err.strerror or str(err)
    os.close(fd)
    os.unlink(probe)
    return None


class _ShardGone(Exception):
    """An index entry named a shard that gc has just replaced: look the keys up again."""


class VectorStore:
    """Embedding store at ``path`` (a directory; see the module docstring for its layout).

    Args:
        path: the cache directory, created if missing.
        dtype: ``float32`` or ``float16`` storage; must match what the store holds. None: whatever
            it holds (maintenance tools), float32 for a new store.
        max_shard_bytes: a writer starts a new shard file once its current one would pass this.
    """

    def __init__(self, path: str | Path, dtype: str | None = "float32", max_shard_bytes: int = 1 << 30) -> None:
        if dtype not in (None, "float32", "float16"):
            raise ValueError(f"teacher cache dtype must be 'float32' or 'float16', got {dtype!r}")
        self.dir = Path(path)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(f"cannot create teacher cache dir {self.dir} ({err.strerror}); "
                          "set data.cache_dir to a writable directory") from err
        self.file = self.dir / INDEX_NAME
        self.shard_dir = self.dir / "shards"
        self.max_shard_bytes = int(max_shard_bytes)
        self._ro_reason = _probe_write(self.dir)
        self.read_only = self._ro_reason is not None
        self._conn: sqlite3.Connection | None = None
        self._pid: int | None = os.getpid()
        self._own: int | None = None  # the shard this process appends to
        self._maps: dict[int, np.memmap] = {}  # shard id -> memmap of (at least) its committed rows
        self._dim: int | None = None
        legacy = self.dir / LEGACY_NAME
        if legacy.exists():
            if self.read_only:
                raise PermissionError(self._ro_message(f"it holds {LEGACY_NAME} of the former layout, "
                                                       "which needs a one-time import"))
            self.shard_dir.mkdir(exist_ok=True)
            self._migrate(legacy)
        stored = self._meta("dtype")
        if stored is None and not self.read_only:
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('dtype', ?)", (dtype or "float32",))
            stored = self._meta("dtype")
        self._set_dtype(stored or dtype or "float32")
        if dtype is not None and self.dtype != dtype:
            raise ValueError(f"teacher cache {self.file} stores {self.dtype}, asked for {dtype}; "
                             f"set data.cache_dtype: {self.dtype} or use another data.cache_dir")
        fmt = int(self._meta("format") or FORMAT)
        if fmt > FORMAT:
            raise ValueError(f"teacher cache {self.file} has format {fmt}, this dewey_lab reads up to {FORMAT}; "
                             "upgrade dewey_lab or use another data.cache_dir")
        if not self.read_only:
            self.shard_dir.mkdir(exist_ok=True)
            self._trim_tails()

    def _set_dtype(self, name: str) -> None:
        self.dtype = name
        self._np_dtype = np.dtype(name).newbyteorder("<")

    def _ro_message(self, why: str) -> str:
        return (f"teacher cache {self.dir} is read-only: {why}; set data.cache_dir to a writable directory "
                "(copy this one there to keep its vectors)")

    # -- connection, per process ----------------------------------------------------------------
    @property
    def conn(self) -> sqlite3.Connection:
        # opened lazily, once per process: the object pickles into DataLoader workers and opens there,
        # and a forked child must neither use nor close its parent's connection, nor append to its shard
        if self._pid != os.getpid():
            if self._conn is not None:
                _INHERITED.append(self._conn)
            self._conn, self._own, self._pid = None, None, os.getpid()
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _connect(self) -> sqlite3.Connection:
        if not self.read_only:
            conn = sqlite3.connect(self.file, timeout=60.0, isolation_level=None)
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
            conn.executescript(_SCHEMA)
            return conn
        if not self.file.exists():  # nothing stored yet, and nothing can be: an empty store
            conn = sqlite3.connect(":memory:", isolation_level=None)
            conn.executescript(_SCHEMA)
            return conn
        last: Exception | None = None
        for query in ("?mode=ro", "?mode=ro&immutable=1"):  # immutable: WAL's -shm file cannot be created
            conn = None
            try:
                conn = sqlite3.connect(self.file.resolve().as_uri() + query, uri=True, timeout=60.0,
                                       isolation_level=None)
                conn.execute("SELECT value FROM meta LIMIT 1").fetchall()
                return conn
            except sqlite3.OperationalError as err:
                last = err
                if conn is not None:
                    conn.close()
        raise OSError(f"cannot read teacher cache {self.file} ({last}); copy it to a writable directory")

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_conn=None, _pid=None, _own=None, _maps={})  # memmaps would pickle their data
        return state

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn, self._own, self._maps = None, None, {}

    @contextmanager
    def _locked(self, exclusive: bool = False, block: bool = True) -> Iterator[None]:
        """flock on ``dir/lock``: writers share it around each put, gc holds it alone."""
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if block else fcntl.LOCK_NB))
            yield
        finally:
            os.close(fd)  # releases the lock

    def _meta(self, name: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return None if row is None else row[0]

    @property
    def dim(self) -> int | None:
        if self._dim is None:  # set once by the first write, never changed after
            value = self._meta("dim")
            self._dim = None if value is None else int(value)
        return self._dim

    def _rowbytes(self, dim: int | None = None) -> int:
        return (dim if dim is not None else self.dim or 0) * self._np_dtype.itemsize

    def _shard_path(self, shard: int) -> Path:
        return self.shard_dir / f"shard-{shard:06d}.f{self._np_dtype.itemsize * 8}"

    def _shards(self) -> dict[int, int]:
        return dict(self.conn.execute("SELECT id, rows FROM shards"))

    # -- reads ------------------------------------------------------------------------------
    def __len__(self) -> int:
        count = self._meta("count")
        if count is None:
            return self.conn.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
        return int(count)

    def missing(self, keys: Iterable[bytes]) -> list[bytes]:
        """The keys not stored yet, in first-seen order, without duplicates."""
        uniq = list(dict.fromkeys(keys))
        found: set[bytes] = set()
        conn = self.conn
        for batch in _batched(uniq, _IN_BATCH):
            q = f"SELECT key FROM vectors WHERE key IN ({','.join('?' * len(batch))})"
            found.update(r[0] for r in conn.execute(q, batch))
        return [k for k in uniq if k not in found]

    def get_many(self, keys: Sequence[bytes]) -> np.ndarray:
        """Vectors for ``keys`` as a float32 array (N, D); raises KeyError on a missing key."""
        for attempt in range(5):
            try:
                return self._gather(keys)
            except _ShardGone as gone:  # gc swapped the index between our lookup and our read: again
                self._maps.pop(gone.args[0], None)
                if attempt == 4:
                    raise OSError(f"teacher cache {self.dir}: shard {gone.args[0]} named by the index is gone; "
                                  f"run `dewey-lab cache verify --repair {self.dir}`") from None
        raise AssertionError("unreachable")

    def _lookup(self, keys: list[bytes]) -> dict[bytes, tuple[int, int]]:
        loc: dict[bytes, tuple[int, int]] = {}
        conn = self.conn
        for batch in _batched(keys, _IN_BATCH):
            q = f"SELECT key, shard, row FROM vectors WHERE key IN ({','.join('?' * len(batch))})"
            loc.update((k, (s, r)) for k, s, r in conn.execute(q, batch))
        return loc

    def _gather(self, keys: Sequence[bytes]) -> np.ndarray:
        loc = self._lookup(list(dict.fromkeys(keys)))
        dim = self.dim
        out = np.empty((len(keys), dim or 0), dtype=np.float32)
        if not len(keys):
            return out
        pos = np.empty((len(keys), 2), dtype=np.int64)
        for i, k in enumerate(keys):
            p = loc.get(k)
            if p is None:
                raise KeyError(f"teacher cache {self.file} has no vector for key {k.hex()[:16]}; "
                               "run the data module's prepare_data (it fills the cache) first")
            pos[i] = p
        self._read_rows(pos[:, 0], pos[:, 1], out)
        return out

    def _read_rows(self, shards: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        """out[i] = row ``rows[i]`` of shard ``shards[i]``: one gather per shard, rows in file order."""
        order = np.lexsort((rows, shards))
        s_sorted = shards[order]
        cuts = np.flatnonzero(np.diff(s_sorted)) + 1
        for sel in np.split(order, cuts):
            r = rows[sel]
            out[sel] = self._map(int(shards[sel[0]]), int(r[-1]) + 1)[r]

    def _map(self, shard: int, need: int) -> np.memmap:
        """A memmap of shard ``shard`` covering at least ``need`` committed rows."""
        m = self._maps.get(shard)
        if m is not None and len(m) >= need:
            return m
        row = self.conn.execute("SELECT rows FROM shards WHERE id=?", (shard,)).fetchone()
        if row is None:
            raise _ShardGone(shard)
        if row[0] < need:
            raise OSError(f"teacher cache {self.dir}: index names row {need - 1} of shard {shard}, which commits "
                          f"{row[0]} rows; run `dewey-lab cache verify --repair {self.dir}`")
        try:
            m = np.memmap(self._shard_path(shard), dtype=self._np_dtype, mode="r", shape=(row[0], self.dim))
        except FileNotFoundError:
            raise _ShardGone(shard) from None
        except ValueError as err:  # the file is shorter than its committed rows
            raise OSError(f"teacher cache {self.dir}: {self._shard_path(shard).name} is shorter than its "
                          f"{row[0]} committed rows ({err}); run `dewey-lab cache verify --repair {self.dir}`"
                          ) from None
        self._maps[shard] = m
        return m

    # -- writes -----------------------------------------------------------------------------
    def put_many(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        """Store ``vectors`` (N, D) under ``keys``: one commit, all or nothing; keys already stored are kept."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or len(keys) != len(vectors):
            raise ValueError(f"put_many needs N keys and an (N, D) array, got {len(keys)} and {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise ValueError("refusing to cache non-finite teacher vectors; run the teacher in bf16/fp32, not fp16")
        dim = self.dim
        if dim is not None and vectors.shape[1] != dim:
            raise ValueError(f"teacher returned {vectors.shape[1]}-d vectors but cache {self.file} holds {dim}-d; "
                             "a different teacher needs its own data.cache_dir")
        if self.read_only:
            err = PermissionError(self._ro_message(self._ro_reason or "cannot create files in it"))
            err.errno = errno.EACCES
            raise err
        if not len(keys):
            return
        with self._locked():
            self._append(list(keys), vectors)

    def _append(self, keys: list[bytes], vectors: np.ndarray) -> None:
        """Append the rows of keys not yet indexed and commit them; the caller holds the lock."""
        first: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)  # a key twice in one block: its first vector, as INSERT OR IGNORE did
        new = self.missing(first)
        if not new:
            return
        idx = [first[k] for k in new]
        block = np.ascontiguousarray(vectors[idx] if len(idx) < len(vectors) else vectors, dtype=self._np_dtype)
        n, dim = block.shape
        rb = self._rowbytes(dim)
        data = memoryview(block).cast("B")
        crcs = [zlib.crc32(data[i * rb:(i + 1) * rb]) for i in range(n)]
        cap = max(1, self.max_shard_bytes // rb)
        plan: list[tuple[int, int, int, int]] = []  # (shard, first row, block offset, count)
        opened: list[tuple[int, int]] = []  # (fd, committed bytes) of each shard this block writes
        try:
            shard, rows = self._current_shard()
            lo = 0
            while lo < n:  # a fresh shard whenever this one is full
                if rows >= cap:
                    shard, rows = self._claim_shard()
                take = min(n - lo, cap - rows)
                plan.append((shard, rows, lo, take))
                rows, lo = rows + take, lo + take
            for shard, start, lo, take in plan:
                fd = os.open(self._shard_path(shard), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                opened.append((fd, start * rb))
                os.ftruncate(fd, start * rb)  # drop what a killed or failed write left past the commit
                _write_all(fd, data[lo * rb:(lo + take) * rb], start * rb)
                os.fsync(fd)  # durable before the index names it
        except OSError as err:
            for fd, size in opened:
                try:
                    os.ftruncate(fd, size)
                except OSError:
                    pass  # the next write or open truncates it
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self._disk_full(err.strerror, n) from err
            raise
        finally:
            for fd, _ in opened:
                os.close(fd)
        try:
            with _write_txn(self.conn) as conn:
                self._index(conn, new, crcs, plan, dim)
        except sqlite3.OperationalError as err:
            if getattr(err, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(err):
                raise self._disk_full(str(err), n) from err
            raise
        self._dim = dim

    def _disk_full(self, why: str | None, n: int) -> OSError:
        err = OSError(f"teacher cache {self.dir}: disk full while writing ({why}, {n} vectors of this block not "
                      "stored); free space or move data.cache_dir; every vector committed before is kept")
        err.errno = errno.ENOSPC
        return err

    def _index(self, conn: sqlite3.Connection, new: list[bytes], crcs: list[int], plan: list, dim: int) -> None:
        """The index rows of one written block, inside the caller's transaction."""
        stored = conn.execute("SELECT value FROM meta WHERE name='dim'").fetchone()
        if stored is None:
            conn.execute("INSERT INTO meta VALUES ('dim', ?)", (str(dim),))
        elif int(stored[0]) != dim:  # another process committed another size first
            raise ValueError(f"teacher returned {dim}-d vectors but cache {self.file} holds {stored[0]}-d; "
                             "a different teacher needs its own data.cache_dir")
        inserted = conn.executemany(
            "INSERT OR IGNORE INTO vectors VALUES (?, ?, ?, ?)",
            ((new[lo + j], shard, start + j, crcs[lo + j])
             for shard, start, lo, take in plan for j in range(take))).rowcount
        for shard, start, _, take in plan:
            conn.execute("UPDATE shards SET rows=? WHERE id=?", (start + take, shard))
        conn.execute("UPDATE meta SET value=CAST(value AS INTEGER)+? WHERE name='count'", (inserted,))

    def _current_shard(self) -> tuple[int, int]:
        """(id, committed rows) of the shard this process appends to, claimed on first use."""
        conn = self.conn  # first: resets the shard a forked child inherited
        if self._own is not None:
            row = conn.execute("SELECT rows FROM shards WHERE id=?", (self._own,)).fetchone()
            if row is not None:
                return self._own, row[0]
        return self._claim_shard()  # first put, or gc replaced ours

    def _claim_shard(self) -> tuple[int, int]:
        with _write_txn(self.conn) as conn:
            shard = conn.execute("INSERT INTO shards (rows) VALUES (0)").lastrowid
        fd = os.open(self._shard_path(shard), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        os.close(fd)
        _fsync_dir(self.shard_dir)
        self._own = shard
        return shard, 0

    def _trim_tails(self) -> None:
        """Truncate every shard to its committed rows, if no put is in flight anywhere (else skip)."""
        try:
            with self._locked(exclusive=True, block=False):
                rb = self._rowbytes()
                for shard, rows in self._shards().items():
                    path = self._shard_path(shard)
                    try:
                        if path.stat().st_size > rows * rb:
                            os.truncate(path, rows * rb)
                    except FileNotFoundError:
                        pass
        except BlockingIOError:
            pass

    # -- legacy import ------------------------------------------------------------------------
    def _migrate(self, legacy: Path) -> None:
        """Import the former one-table store, block by block (resumable), then rename it."""
        with self._locked(exclusive=True):
            if not legacy.exists():  # another process imported it while we waited
                return
            src = sqlite3.connect(legacy, timeout=60.0)
            try:
                meta = dict(src.execute("SELECT name, value FROM meta"))
                old = meta.get("dtype", "float32")
                ours = self._meta("dtype")
                if ours is None:
                    self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('dtype', ?)", (old,))
                elif ours != old:
                    raise ValueError(f"teacher cache {self.dir}: {LEGACY_NAME} stores {old} but {INDEX_NAME} holds "
                                     f"{ours}; move one of them to another data.cache_dir")
                self._set_dtype(old)
                last = b""
                while True:
                    rows = src.execute("SELECT key, vec FROM vectors WHERE key > ? ORDER BY key LIMIT ?",
                                       (last, _SCAN_CHUNK // 16)).fetchall()
                    if not rows:
                        break
                    vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=self._np_dtype).reshape(len(rows), -1)
                    self._append([r[0] for r in rows], vecs)
                    last = rows[-1][0]
            finally:
                src.close()
            os.replace(legacy, legacy.with_name(LEGACY_NAME + ".migrated"))

    # -- maintenance --------------------------------------------------------------------------
    def stats(self) -> dict:
        """Counts and sizes: vectors, shards, bytes, unreferenced rows, bytes per vector."""
        shards = self._shards()
        shard_bytes = 0
        for shard in shards:
            try:
                shard_bytes += self._shard_path(shard).stat().st_size
            except FileNotFoundError:
                pass
        # the database's own size, committed pages still in the WAL included (the file lags until a checkpoint)
        index_bytes = self.conn.execute("PRAGMA page_count").fetchone()[0] * self.conn.execute(
            "PRAGMA page_size").fetchone()[0] if self.file.exists() else 0
        wal = self.file.with_name(INDEX_NAME + "-wal")
        wal_bytes = wal.stat().st_size if wal.exists() else 0
        n, rows = len(self), sum(shards.values())
        return {"dir": str(self.dir), "vectors": n, "dim": self.dim, "dtype": self.dtype, "shards": len(shards),
                "shard_rows": rows, "shard_bytes": shard_bytes, "index_bytes": index_bytes, "wal_bytes": wal_bytes,
                "unreferenced_rows": rows - n,
                "index_bytes_per_vector": round(index_bytes / n, 1) if n else None,
                "bytes_per_vector": round((shard_bytes + index_bytes) / n, 1) if n else None,
                "read_only": self.read_only}

    def _scan(self, step: int = _SCAN_CHUNK) -> Iterator[list[tuple[bytes, int, int, int]]]:
        """The index in key order, in chunks of ``step`` (key, shard, row, crc)."""
        last = b""
        while True:
            rows = self.conn.execute("SELECT key, shard, row, crc FROM vectors WHERE key > ? ORDER BY key LIMIT ?",
                                     (last, step)).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield rows

    def merge(self, other: VectorStore, block: int = 8192) -> dict:
        """Copy every vector of ``other`` that this cache lacks (e.g. caches filled on different
        nodes, since SQLite's WAL cannot be shared over a network filesystem). Block by block,
        each block one commit, so a killed merge resumes where it stopped."""
        if other.dim is not None and self.dim is not None and other.dim != self.dim:
            raise ValueError(f"cannot merge {other.dir} ({other.dim}-d) into {self.dir} ({self.dim}-d): "
                             "different teachers need different caches")
        copied = seen = 0
        for chunk in other._scan(block):
            keys = [row[0] for row in chunk]
            seen += len(keys)
            new = self.missing(keys)
            if new:
                self.put_many(new, other.get_many(new))
                copied += len(new)
        return {"source_vectors": seen, "copied": copied, "already_here": seen - copied, "vectors": len(self)}

    def verify(self, repair: bool = False) -> dict:
        """Check every index entry against its shard: committed row, file long enough, crc32 of its bytes.

        ``repair=True`` deletes the bad entries (so ``missing`` reports them and the next fill recomputes
        them) and corrects the stored vector count.
        """
        if repair and self.read_only:
            raise PermissionError(self._ro_message(self._ro_reason or "cannot create files in it"))
        with (self._locked() if not self.read_only else nullcontext()):  # no gc meanwhile
            rb, dim = self._rowbytes(), self.dim
            shards = self._shards()
            maps: dict[int, np.ndarray] = {}  # shard -> its committed rows that the file holds
            counts = {"checked": 0, "bad_crc": 0, "past_committed": 0, "no_shard": 0, "short_file": 0}
            bad: list[tuple[bytes, int, int]] = []
            for chunk in self._scan():
                chunk.sort(key=lambda e: (e[1], e[2]))  # file order within the chunk
                for key, shard, row, crc in chunk:
                    counts["checked"] += 1
                    if shards.get(shard, -1) <= row:  # maybe committed after we listed shards
                        shards = self._shards()
                    m = maps.get(shard)
                    if shard in shards and row < shards[shard] and (m is None or row >= len(m)):
                        path = self._shard_path(shard)
                        size = path.stat().st_size if path.exists() else 0
                        rows = min(shards[shard], size // rb)
                        m = maps[shard] = (np.memmap(path, dtype=self._np_dtype, mode="r", shape=(rows, dim))
                                           if rows else np.empty((0, dim), self._np_dtype))
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
            conn = self.conn
            conn.execute("BEGIN")  # one snapshot for both counts
            stored, actual = len(self), conn.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
            conn.execute("COMMIT")
            out = {**counts, "bad": len(bad), "bad_keys": [k.hex() for k, _, _ in bad[:10]],
                   "count_ok": stored == actual, "repaired": 0}
            if repair and (bad or stored != actual):
                with _write_txn(conn):
                    out["repaired"] = conn.executemany("DELETE FROM vectors WHERE key=? AND shard=? AND row=?",
                                                       bad).rowcount
                    conn.execute("UPDATE meta SET value=(SELECT COUNT(*) FROM vectors) WHERE name='count'")
            return out

    def gc(self) -> dict:
        """Compact: copy every referenced row into fresh shards, swap the index in one transaction,
        delete the old shard files. Holds the lock alone: writers wait, readers go on."""
        if self.read_only:
            raise PermissionError(self._ro_message(self._ro_reason or "cannot create files in it"))
        t0 = time.perf_counter()
        with self._locked(exclusive=True):
            before = self.stats()
            conn, dim = self.conn, self.dim
            old = self._shards()
            rb = self._rowbytes()
            cap = max(1, self.max_shard_bytes // rb) if rb else 1
            n = before["vectors"]
            orphans = self._orphan_files(old)
            needed = -(-n // cap)
            if before["unreferenced_rows"] == 0 and len(old) <= needed and not orphans and dim is not None:
                return {**_gc_result(before, before, t0), "compacted": False}
            new: dict[int, int] = {}
            shard, fd, rows = None, -1, cap
            step = max(1024, min(_SCAN_CHUNK, (64 << 20) // max(rb, 1)))  # ~64 MB of rows in memory at a time
            conn.execute("BEGIN IMMEDIATE")
            try:
                for chunk in self._scan(step) if dim is not None else ():
                    pos = np.array([(s, r) for _, s, r, _ in chunk], dtype=np.int64)
                    buf = np.empty((len(chunk), dim), dtype=self._np_dtype)
                    try:
                        self._read_rows(pos[:, 0], pos[:, 1], buf)
                    except _ShardGone as gone:
                        raise OSError(f"teacher cache {self.dir}: shard {gone.args[0]} named by the index is gone; "
                                      f"run `dewey-lab cache verify --repair {self.dir}` before gc") from None
                    data = memoryview(buf).cast("B")
                    moves, lo = [], 0
                    while lo < len(chunk):
                        if rows >= cap:
                            if fd >= 0:
                                os.fsync(fd)
                                os.close(fd)
                                fd = -1
                            shard = conn.execute("INSERT INTO shards (rows) VALUES (0)").lastrowid
                            fd = os.open(self._shard_path(shard), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                                         0o644)
                            rows = 0
                        take = min(len(chunk) - lo, cap - rows)
                        _write_all(fd, data[lo * rb:(lo + take) * rb], rows * rb)
                        moves.extend((shard, rows + j, chunk[lo + j][0]) for j in range(take))
                        rows, lo = rows + take, lo + take
                        new[shard] = rows
                    conn.executemany("UPDATE vectors SET shard=?, row=? WHERE key=?", moves)
                if fd >= 0:
                    os.fsync(fd)
                    os.close(fd)
                    fd = -1
                _fsync_dir(self.shard_dir)
                for shard, rows in new.items():
                    conn.execute("UPDATE shards SET rows=? WHERE id=?", (rows, shard))
                conn.executemany("DELETE FROM shards WHERE id=?", ((s,) for s in old))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if fd >= 0:
                    os.close(fd)
                for shard in new:  # their ids went back with the rollback
                    self._shard_path(shard).unlink(missing_ok=True)
                raise
            for shard in old:
                self._shard_path(shard).unlink(missing_ok=True)
            for path in self._orphan_files(new):
                path.unlink(missing_ok=True)
            _fsync_dir(self.shard_dir)
            self._maps = {}
            self._own = None
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return {**_gc_result(before, self.stats(), t0), "compacted": True}

    def _orphan_files(self, shards: dict[int, int]) -> list[Path]:
        """Shard files no ``shards`` row names (a gc killed after its commit, or before it)."""
        out = []
        for path in self.shard_dir.iterdir() if self.shard_dir.exists() else ():
            m = _SHARD_RE.match(path.name)
            if m and int(m.group(1)) not in shards:
                out.append(path)
        return out


def _gc_result(before: dict, after: dict, t0: float) -> dict:
    return {"vectors": after["vectors"], "shards_before": before["shards"], "shards_after": after["shards"],
            "bytes_before": before["shard_bytes"] + before["index_bytes"],
            "bytes_after": after["shard_bytes"] + after["index_bytes"],
            "rows_dropped": before["shard_rows"] - after["shard_rows"], "seconds": round(time.perf_counter() - t0, 2)}


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _write_txn(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (unless SQLite already did)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _batched(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]
