"""Content-addressed vector store, built for 1e8 vectors: what a teacher or a model embedded, kept as data.

Two users. Training keeps the teacher's vectors of every window and chunk here (``data.cache.dir``,
filled by the data module's ``prepare_data``, read by its batches); evaluation keeps each model's
passage vectors here (``eval/retrieval.py``, one store per model), so a killed evaluation resumes
and a rerun costs no forward pass. A key is ``sha256(fingerprint + text)`` (``cache_key``); for the
teacher the fingerprint covers teacher id, revision, prompt, max length and normalisation
(``Teacher.fingerprint``), so every run that shares text with an earlier one, under the same
teacher, shares its teacher work: a theta ablation costs zero teacher time after its first variant.

This module is the store: open, ``missing``, ``get_many``, ``put_many``, ``stats``. Its SQLite index
is opened by ``index.py``; its shard files are written only by ``shards.ShardWriter`` (``put_many``
here, ``gc`` there). Looking after a store (verify, gc, merge) is ``maintenance.py``, which builds on this
module (never the reverse); the former layout is read by ``legacy.py``; ``dewey-lab cache`` is ``cli.py``.

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
a row's stored bytes: ``maintenance.verify`` recomputes it, ``verify(store, repair=True)`` drops bad entries so
the next fill recomputes them, ``gc`` compacts away unreferenced rows (``maintenance.py``, ``dewey-lab cache ...``).

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
(``_import_legacy``, reading it through ``legacy.py``) and renamed ``embeddings.sqlite.migrated``.

Length: about 70 lines of this module are the design notes above; the rest is one class, the store's
read and write paths around one lock and one index, which its maintenance (``maintenance.py``) builds on.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import sqlite3
import uuid
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from dewey_lab.data.store.index import IN_BATCH, INDEX_NAME, LEGACY_NAME, batched, connect, write_txn
from dewey_lab.data.store.legacy import legacy_blocks, legacy_dtype, retire
from dewey_lab.data.store.shards import ShardGone, ShardWriter, fsync_dir, shard_name

FORMAT = 2
_INHERITED: list = []  # connections inherited through fork: never used nor closed in the child (SQLite's rule)


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
                          "set data.cache.dir to a writable directory") from err
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
            self._import_legacy(legacy)
        stored = self._meta("dtype")
        if stored is None and not self.read_only:
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('dtype', ?)", (dtype or "float32",))
            stored = self._meta("dtype")
        self._set_dtype(stored or dtype or "float32")
        if dtype is not None and self.dtype != dtype:
            raise ValueError(f"teacher cache {self.file} stores {self.dtype}, asked for {dtype}; "
                             f"set data.cache.dtype: {self.dtype} or use another data.cache.dir")
        fmt = int(self._meta("format") or FORMAT)
        if fmt > FORMAT:
            raise ValueError(f"teacher cache {self.file} has format {fmt}, this dewey_lab reads up to {FORMAT}; "
                             "upgrade dewey_lab or use another data.cache.dir")
        if not self.read_only:
            self.shard_dir.mkdir(exist_ok=True)
            self._trim_tails()

    def _set_dtype(self, name: str) -> None:
        self.dtype = name
        self._np_dtype = np.dtype(name).newbyteorder("<")

    def _ro_message(self, why: str) -> str:
        return (f"teacher cache {self.dir} is read-only: {why}; set data.cache.dir to a writable directory "
                "(copy this one there to keep its vectors)")

    def _read_only_error(self) -> PermissionError:
        err = PermissionError(self._ro_message(self._ro_reason or "cannot create files in it"))
        err.errno = errno.EACCES
        return err

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
            self._conn = connect(self.file, self.read_only)
        return self._conn

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
        return self.shard_dir / shard_name(shard, self._np_dtype.itemsize)

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
        for batch in batched(uniq, IN_BATCH):
            q = f"SELECT key FROM vectors WHERE key IN ({','.join('?' * len(batch))})"
            found.update(r[0] for r in conn.execute(q, batch))
        return [k for k in uniq if k not in found]

    def get_many(self, keys: Sequence[bytes]) -> np.ndarray:
        """Vectors for ``keys`` as a float32 array (N, D); raises KeyError on a missing key."""
        for attempt in range(5):
            try:
                return self._gather(keys)
            except ShardGone as gone:  # gc swapped the index between our lookup and our read: again
                self._maps.pop(gone.args[0], None)
                if attempt == 4:
                    raise OSError(f"teacher cache {self.dir}: shard {gone.args[0]} named by the index is gone; "
                                  f"run `dewey-lab cache verify --repair {self.dir}`") from None
        raise AssertionError("unreachable")

    def _lookup(self, keys: list[bytes]) -> dict[bytes, tuple[int, int]]:
        loc: dict[bytes, tuple[int, int]] = {}
        conn = self.conn
        for batch in batched(keys, IN_BATCH):
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
            raise ShardGone(shard)
        if row[0] < need:
            raise OSError(f"teacher cache {self.dir}: index names row {need - 1} of shard {shard}, which commits "
                          f"{row[0]} rows; run `dewey-lab cache verify --repair {self.dir}`")
        try:
            m = np.memmap(self._shard_path(shard), dtype=self._np_dtype, mode="r", shape=(row[0], self.dim))
        except FileNotFoundError:
            raise ShardGone(shard) from None
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
                             "a different teacher needs its own data.cache.dir")
        if self.read_only:
            raise self._read_only_error()
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
        n, dim = block.shape  # (N, D)
        rb = self._rowbytes(dim)
        data = memoryview(block).cast("B")
        crcs = [zlib.crc32(data[i * rb:(i + 1) * rb]) for i in range(n)]
        writer = ShardWriter(self._shard_path, rb, self.max_shard_bytes, self._claim_shard, self._current_shard())
        try:
            plan = writer.write(data)
            writer.close()  # fsynced: durable before the index names it
        except BaseException as err:
            writer.abort()  # drop the rows past the commit (else the next write or open does)
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self._disk_full(err.strerror, n) from err
            raise
        try:
            with write_txn(self.conn) as conn:
                self._index(conn, new, crcs, plan, dim)
        except sqlite3.OperationalError as err:
            if getattr(err, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(err):
                raise self._disk_full(str(err), n) from err
            raise
        self._dim = dim

    def _disk_full(self, why: str | None, n: int) -> OSError:
        err = OSError(f"teacher cache {self.dir}: disk full while writing ({why}, {n} vectors of this block not "
                      "stored); free space or move data.cache.dir; every vector committed before is kept")
        err.errno = errno.ENOSPC
        return err

    def _index(self, conn: sqlite3.Connection, new: list[bytes], crcs: list[int], plan: list, dim: int) -> None:
        """The index rows of one written block, inside the caller's transaction."""
        stored = conn.execute("SELECT value FROM meta WHERE name='dim'").fetchone()
        if stored is None:
            conn.execute("INSERT INTO meta VALUES ('dim', ?)", (str(dim),))
        elif int(stored[0]) != dim:  # another process committed another size first
            raise ValueError(f"teacher returned {dim}-d vectors but cache {self.file} holds {stored[0]}-d; "
                             "a different teacher needs its own data.cache.dir")
        inserted = conn.executemany(
            "INSERT OR IGNORE INTO vectors VALUES (?, ?, ?, ?)",
            ((new[lo + j], shard, start + j, crcs[lo + j])
             for shard, start, lo, take in plan for j in range(take))).rowcount
        for shard, start, _, take in plan:
            conn.execute("UPDATE shards SET rows=? WHERE id=?", (start + take, shard))
        conn.execute("UPDATE meta SET value=CAST(value AS INTEGER)+? WHERE name='count'", (inserted,))

    def _current_shard(self) -> tuple[int, int] | None:
        """(id, committed rows) of the shard this process appends to; None before its first put."""
        conn = self.conn  # first: resets the shard a forked child inherited
        if self._own is not None:
            row = conn.execute("SELECT rows FROM shards WHERE id=?", (self._own,)).fetchone()
            if row is not None:
                return self._own, row[0]
        return None  # first put, or gc replaced ours: the writer claims one

    def _claim_shard(self) -> int:
        """A fresh shard of this process's own: its ``shards`` row committed, its file created empty."""
        with write_txn(self.conn) as conn:
            shard = conn.execute("INSERT INTO shards (rows) VALUES (0)").lastrowid
        fd = os.open(self._shard_path(shard), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        os.close(fd)
        fsync_dir(self.shard_dir)
        self._own = shard
        return shard

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

    # -- size ---------------------------------------------------------------------------------
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

    def _import_legacy(self, legacy: Path) -> None:
        """Import the former one-table store (``legacy.py``) block by block under the exclusive lock (resumable:
        keys already imported are skipped), then rename it ``embeddings.sqlite.migrated``."""
        with self._locked(exclusive=True):
            if not legacy.exists():  # another process imported it while we waited
                return
            old, ours = legacy_dtype(legacy), self._meta("dtype")
            if ours is None:
                self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('dtype', ?)", (old,))
            elif ours != old:
                raise ValueError(f"teacher cache {self.dir}: {LEGACY_NAME} stores {old} but {INDEX_NAME} holds "
                                 f"{ours}; move one of them to another data.cache.dir")
            self._set_dtype(old)
            for keys, blob in legacy_blocks(legacy):  # not put_many: we hold the lock exclusively
                self._append(keys, np.frombuffer(blob, dtype=self._np_dtype).reshape(len(keys), -1))
            retire(legacy)
