"""The vector store returns exactly what it stored, keeps its on-disk format, and survives a writer
killed mid-write, concurrent writers, a read-only directory and a full disk."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import zlib

import numpy as np
import pytest

from dewey_lab.data.store.maintenance import gc, verify
from dewey_lab.data.store.vectors import VectorStore, cache_key


def _vecs(n, d=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def test_round_trip_is_exact(tmp_path):
    cache = VectorStore(tmp_path)
    keys = [cache_key("teacher@1", f"text {i}") for i in range(50)]
    vecs = _vecs(50)
    cache.put_many(keys, vecs)
    assert len(cache) == 50 and cache.dim == 8
    order = keys[::-1] + keys[:3]  # any order, repeats allowed
    np.testing.assert_array_equal(cache.get_many(order), np.concatenate([vecs[::-1], vecs[:3]]))
    assert cache.missing(keys + [cache_key("teacher@1", "new")]) == [cache_key("teacher@1", "new")]
    # reopened from disk, in another object
    np.testing.assert_array_equal(VectorStore(tmp_path).get_many(keys), vecs)


def test_float16_storage_and_dtype_guard(tmp_path):
    cache = VectorStore(tmp_path, dtype="float16")
    keys = [cache_key("t", str(i)) for i in range(4)]
    vecs = _vecs(4)
    cache.put_many(keys, vecs)
    np.testing.assert_array_equal(cache.get_many(keys), vecs.astype(np.float16).astype(np.float32))
    with pytest.raises(ValueError, match="cache.dtype: float16"):
        VectorStore(tmp_path, dtype="float32")


def test_key_covers_teacher_and_text():
    assert cache_key("a", "x") == cache_key("a", "x")
    assert len({cache_key("a", "x"), cache_key("b", "x"), cache_key("a", "y"), cache_key("a|", "x")}) == 4


def test_on_disk_format_2_written_by_hand_reads_back_and_put_many_writes_it(tmp_path):
    """Format 2 from its definition (module docstring): an index.sqlite with meta / vectors / shards and
    raw little-endian shard rows. A store written by hand reads back; what put_many writes is that layout."""
    d, (k0, k1, k2) = 6, _keys(3)
    rows = np.arange(3 * d, dtype="<f2").reshape(3, d) / 4  # exact in float16
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "shard-000007.f16").write_bytes(rows.tobytes() + b"\xff" * 5)  # a torn tail
    con = sqlite3.connect(tmp_path / "index.sqlite")
    con.executescript("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);"
                      "CREATE TABLE vectors (key BLOB PRIMARY KEY, shard INTEGER NOT NULL, row INTEGER NOT NULL, "
                      "crc INTEGER NOT NULL) WITHOUT ROWID;"
                      "CREATE TABLE shards (id INTEGER PRIMARY KEY AUTOINCREMENT, rows INTEGER NOT NULL);"
                      "INSERT INTO meta VALUES ('format', '2'), ('count', '2'), ('dtype', 'float16'), ('dim', '6');"
                      "INSERT INTO shards VALUES (7, 3);")  # row 1 committed but no key points to it
    con.executemany("INSERT INTO vectors VALUES (?, 7, ?, ?)",
                    [(k0, 2, zlib.crc32(rows[2].tobytes())), (k1, 0, zlib.crc32(rows[0].tobytes()))])
    con.commit()
    con.close()
    cache = VectorStore(tmp_path, dtype="float16")
    np.testing.assert_array_equal(cache.get_many([k0, k1]), rows[[2, 0]].astype(np.float32))
    assert len(cache) == 2 and cache.dim == d and cache.missing([k0, k1, k2]) == [k2]
    assert (tmp_path / "shards" / "shard-000007.f16").stat().st_size == 3 * d * 2  # opening cut the tail
    assert verify(cache)["bad"] == 0
    new = np.full((1, d), 1.5, dtype=np.float32)
    cache.put_many([k2], new)  # a new writer: a shard of its own, id 8, row 0
    assert (tmp_path / "shards" / "shard-000008.f16").read_bytes() == new.astype("<f2").tobytes()
    con = sqlite3.connect(tmp_path / "index.sqlite")
    assert con.execute("SELECT shard, row, crc FROM vectors WHERE key=?", (k2,)).fetchone() == (
        8, 0, zlib.crc32(new.astype("<f2").tobytes()))
    assert dict(con.execute("SELECT id, rows FROM shards")) == {7: 3, 8: 1}
    assert dict(con.execute("SELECT name, value FROM meta"))["count"] == "3"
    con.close()


def test_bad_writes_are_refused(tmp_path):
    cache = VectorStore(tmp_path)
    cache.put_many([b"k" * 32], _vecs(1))
    with pytest.raises(ValueError, match="holds 8-d"):
        cache.put_many([b"j" * 32], _vecs(1, d=16))
    with pytest.raises(ValueError, match="non-finite"):
        cache.put_many([b"j" * 32], np.full((1, 8), np.nan, dtype=np.float32))
    with pytest.raises(KeyError, match="prepare_data"):
        cache.get_many([b"z" * 32])
    assert len(cache) == 1


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from dewey_lab.data.store.vectors import VectorStore, cache_key
    cache = VectorStore(sys.argv[1])
    i = 0
    while True:  # blocks of 64 vectors whose values encode their own key index
        keys = [cache_key("t", str(j)) for j in range(i, i + 64)]
        vecs = np.repeat(np.arange(i, i + 64, dtype=np.float32)[:, None], 32, axis=1)
        cache.put_many(keys, vecs)
        print(i, flush=True)
        i += 64
""")


def test_survives_writer_killed_mid_write(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    committed = -1
    deadline = time.time() + 60
    while committed < 64 * 20 and time.time() < deadline:
        committed = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cache = VectorStore(tmp_path)  # opening trims what the killed writer left past its last commit
    n = len(cache)
    assert n % 64 == 0 and n >= committed + 64  # whole blocks only, every reported block kept
    assert cache.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stats = cache.stats()
    assert stats["unreferenced_rows"] == 0 and stats["shard_bytes"] == n * 32 * 4  # no uncommitted tail
    vecs = cache.get_many([cache_key("t", str(j)) for j in range(n)])
    np.testing.assert_array_equal(vecs[:, 0], np.arange(n, dtype=np.float32))
    # and a fresh writer continues after the crash, in a shard of its own
    cache.put_many([cache_key("t", "after")], np.ones((1, 32), np.float32))
    assert len(cache) == n + 1 and cache.stats()["shards"] == 2
    assert verify(cache)["bad"] == 0  # maintenance.verify: the store itself no longer imports its maintenance


def _keys(n, start=0, prefix="t"):
    return [cache_key(prefix, str(j)) for j in range(start, start + n)]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_exact_round_trip_after_reopen(tmp_path, dtype):
    cache = VectorStore(tmp_path, dtype=dtype)
    keys, vecs = _keys(300), _vecs(300, d=24, seed=1)
    for lo in range(0, 300, 100):
        cache.put_many(keys[lo:lo + 100], vecs[lo:lo + 100])
    cache.close()
    again = VectorStore(tmp_path, dtype=dtype)
    want = vecs.astype(dtype).astype(np.float32)
    order = np.random.default_rng(0).permutation(300)
    np.testing.assert_array_equal(again.get_many([keys[i] for i in order]), want[order])
    assert len(again) == 300 and again.dim == 24 and again.dtype == dtype
    ext = "f16" if dtype == "float16" else "f32"
    assert again.file == tmp_path / "index.sqlite"
    assert [p.name for p in (tmp_path / "shards").iterdir()] == [f"shard-000001.{ext}"]
    assert (tmp_path / "shards" / f"shard-000001.{ext}").stat().st_size == 300 * 24 * np.dtype(dtype).itemsize


def test_shard_rollover_reads_back_exactly(tmp_path):
    rb = 8 * 4
    cache = VectorStore(tmp_path, max_shard_bytes=10 * rb)  # 10 rows a shard
    keys, vecs = _keys(95), _vecs(95)
    for lo in range(0, 95, 30):  # blocks larger than a shard are split across shards
        cache.put_many(keys[lo:lo + 30], vecs[lo:lo + 30])
    files = sorted((tmp_path / "shards").iterdir())
    assert len(files) == 10 and all(f.stat().st_size <= 10 * rb for f in files)
    np.testing.assert_array_equal(VectorStore(tmp_path).get_many(keys[::-1]), vecs[::-1])
    assert cache.stats()["unreferenced_rows"] == 0 and verify(cache)["bad"] == 0


def test_duplicate_keys_in_a_block_keep_the_first_vector(tmp_path):
    cache = VectorStore(tmp_path)
    k = _keys(2)
    vecs = _vecs(3)
    cache.put_many([k[0], k[1], k[0]], vecs)
    cache.put_many([k[1]], _vecs(1, seed=5))  # already stored: kept as is
    np.testing.assert_array_equal(cache.get_many(k), vecs[:2])
    assert len(cache) == 2 and cache.stats()["shard_rows"] == 2


RACER = textwrap.dedent("""
    import sys, time, numpy as np
    from dewey_lab.data.store.vectors import VectorStore, cache_key
    path, start, n, block, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    cache = VectorStore(path, max_shard_bytes=int(sys.argv[6]))
    idx = np.random.default_rng(start).permutation(np.arange(start, start + n))  # overlaps meet at random
    while time.time() < go:  # start together
        time.sleep(0.005)
    for lo in range(0, n, block):
        j = idx[lo:lo + block]
        vecs = ((j[:, None] * 7 + np.arange(16)[None, :]) % 1013 / 13).astype(np.float32)
        cache.put_many([cache_key("race", str(i)) for i in j], vecs)
""")


def _race_vec(j):
    return ((np.asarray(j)[:, None] * 7 + np.arange(16)[None, :]) % 1013 / 13).astype(np.float32)


def _race(path, procs=3, n=2000, block=50, max_shard_bytes=1 << 30):
    go = time.time() + 1.5
    ps = [subprocess.Popen([sys.executable, "-c", RACER, str(path), str(p * n // 2), str(n), str(block), str(go),
                            str(max_shard_bytes)]) for p in range(procs)]
    assert [p.wait(timeout=60) for p in ps] == [0] * procs
    return (procs + 1) * n // 2  # keys 0 .. (procs + 1) * n / 2, half of each writer's shared with the next


def test_concurrent_writers_with_overlapping_keys(tmp_path):
    total = _race(tmp_path)
    cache = VectorStore(tmp_path)
    keys = [cache_key("race", str(i)) for i in range(total)]
    assert len(cache) == total and cache.missing(keys) == []
    assert cache.conn.execute("SELECT COUNT(*) FROM vectors").fetchone()[0] == total  # every key once
    np.testing.assert_array_equal(cache.get_many(keys), _race_vec(np.arange(total)))
    report = verify(cache)
    assert report["bad"] == 0 and report["checked"] == total and report["count_ok"]
    assert cache.stats()["shards"] == 3  # one per writer: no two processes appended to one file


def _fill_and_close(path, n=10):
    cache = VectorStore(path)
    keys, vecs = _keys(n), _vecs(n)
    cache.put_many(keys, vecs)
    cache.close()
    return keys, vecs


@pytest.mark.parametrize("wal_shm_writable", [True, False])
def test_read_only_directory_reads_and_refuses_writes(tmp_path, monkeypatch, wal_shm_writable):
    from dewey_lab.data.store import vectors

    keys, vecs = _fill_and_close(tmp_path)
    # root writes through any mode bits, so the probe says what a read-only mount would say
    monkeypatch.setattr(vectors, "_probe_write", lambda path: "Read-only file system")
    if not wal_shm_writable:  # mode=ro cannot make WAL's -shm file: the immutable=1 fallback reads
        connect = sqlite3.connect

        def no_shm(database, *a, **kw):
            if "mode=ro" in str(database) and "immutable" not in str(database):
                raise sqlite3.OperationalError("unable to open database file")
            return connect(database, *a, **kw)
        monkeypatch.setattr(sqlite3, "connect", no_shm)
    cache = VectorStore(tmp_path)
    assert cache.read_only and len(cache) == 10
    np.testing.assert_array_equal(cache.get_many(keys), vecs)
    assert cache.missing(keys + [b"x" * 32]) == [b"x" * 32]
    with pytest.raises(PermissionError, match=r"is read-only: Read-only file system; set data.cache.dir to a "
                                              r"writable directory \(copy this one there"):
        cache.put_many([b"x" * 32], _vecs(1))
    with pytest.raises(PermissionError):
        gc(cache)
    assert verify(cache)["bad"] == 0


def test_read_only_directory_with_chmod(tmp_path):
    keys, vecs = _fill_and_close(tmp_path / "c")
    os.chmod(tmp_path / "c", 0o555)
    try:
        probe = tmp_path / "c" / "probe"
        try:
            probe.touch()
        except PermissionError:
            pass
        else:
            probe.unlink()
            pytest.skip("running as root: chmod does not stop writes (the monkeypatched test covers this)")
        cache = VectorStore(tmp_path / "c")
        np.testing.assert_array_equal(cache.get_many(keys), vecs)
        with pytest.raises(PermissionError, match="is read-only"):
            cache.put_many([b"x" * 32], _vecs(1))
    finally:
        os.chmod(tmp_path / "c", 0o755)


def test_disk_full_keeps_what_was_committed(tmp_path, monkeypatch):
    import errno

    cache = VectorStore(tmp_path)
    keys, vecs = _keys(300), _vecs(300)
    cache.put_many(keys[:100], vecs[:100])
    real = os.pwrite

    def full(fd, data, offset):  # writes 40 rows, then the disk is full
        real(fd, bytes(data[:40 * 32]), offset)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match=r"disk full while writing \(No space left on device.*free space or move "
                                      r"data.cache.dir; every vector committed before is kept") as err:
        cache.put_many(keys[100:200], vecs[100:200])
    assert err.value.errno == errno.ENOSPC and "\n" not in str(err.value)
    monkeypatch.undo()
    shard = tmp_path / "shards" / "shard-000001.f32"
    assert len(cache) == 100 and shard.stat().st_size == 100 * 32  # the partial rows were truncated
    with open(shard, "ab") as f:  # a tail the failed write could not truncate: the next open drops it
        f.write(b"\xff" * 77)
    again = VectorStore(tmp_path)
    assert shard.stat().st_size == 100 * 32
    np.testing.assert_array_equal(again.get_many(keys[:100]), vecs[:100])
    assert again.missing(keys) == keys[100:]
    def index_full(*args):  # the shard write went through, the index commit did not
        raise sqlite3.OperationalError("database or disk is full")
    monkeypatch.setattr(VectorStore, "_index", index_full)
    with pytest.raises(OSError, match=r"disk full while writing \(database or disk is full, 100 vectors"):
        cache.put_many(keys[100:200], vecs[100:200])
    monkeypatch.undo()
    assert len(again) == 100 and shard.stat().st_size == 200 * 32  # rows past the commit: never read
    cache.put_many(keys[100:], vecs[100:])  # space is back: the writer carries on, over that tail
    np.testing.assert_array_equal(again.get_many(keys), vecs)
    assert verify(again)["bad"] == 0 and again.stats()["unreferenced_rows"] == 0
    assert shard.stat().st_size == 300 * 32


def test_pickled_into_a_worker_and_forked(tmp_path):
    import multiprocessing as mp
    import pickle

    cache = VectorStore(tmp_path)
    keys, vecs = _keys(50), _vecs(50)
    cache.put_many(keys[:25], vecs[:25])
    clone = pickle.loads(pickle.dumps(cache))
    np.testing.assert_array_equal(clone.get_many(keys[:25]), vecs[:25])
    ctx = mp.get_context("fork")  # a forked child opens its own connection and claims its own shard
    p = ctx.Process(target=cache.put_many, args=(keys[25:], vecs[25:]))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    np.testing.assert_array_equal(cache.get_many(keys), vecs)
    assert cache.stats()["shards"] == 2 and verify(cache)["bad"] == 0
