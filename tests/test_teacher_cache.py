"""The teacher cache returns exactly what it stored and survives a writer killed mid-write."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

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
    with pytest.raises(ValueError, match="cache_dtype: float16"):
        VectorStore(tmp_path, dtype="float32")


def test_key_covers_teacher_and_text():
    assert cache_key("a", "x") == cache_key("a", "x")
    assert len({cache_key("a", "x"), cache_key("b", "x"), cache_key("a", "y"), cache_key("a|", "x")}) == 4


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
    assert cache.verify()["bad"] == 0


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
    assert cache.stats()["unreferenced_rows"] == 0 and cache.verify()["bad"] == 0


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
    report = cache.verify()
    assert report["bad"] == 0 and report["checked"] == total and report["count_ok"]
    assert cache.stats()["shards"] == 3  # one per writer: no two processes appended to one file


def test_verify_finds_a_flipped_byte_and_repair_drops_it(tmp_path):
    cache = VectorStore(tmp_path)
    keys, vecs = _keys(20), _vecs(20)
    cache.put_many(keys, vecs)
    assert cache.verify() == {**cache.verify(), "bad": 0, "bad_crc": 0}
    shard = tmp_path / "shards" / "shard-000001.f32"
    raw = bytearray(shard.read_bytes())
    raw[7 * 32 + 5] ^= 0x10  # row 7
    shard.write_bytes(raw)
    report = VectorStore(tmp_path).verify()
    assert report["bad"] == report["bad_crc"] == 1 and report["bad_keys"] == [keys[7].hex()]
    assert report["repaired"] == 0 and cache.missing(keys) == []  # reporting only changes nothing
    fixed = cache.verify(repair=True)
    assert fixed["repaired"] == 1 and cache.missing(keys) == [keys[7]] and len(cache) == 19
    cache.put_many([keys[7]], vecs[7:8])  # the next fill recomputes it
    np.testing.assert_array_equal(cache.get_many(keys), vecs)
    assert cache.verify()["bad"] == 0 and cache.stats()["unreferenced_rows"] == 1


def test_gc_after_a_race_compacts_and_keeps_every_vector(tmp_path):
    total = _race(tmp_path, procs=2, n=600, block=40, max_shard_bytes=100 * 64)
    a = VectorStore(tmp_path, max_shard_bytes=100 * 64)
    keys = [cache_key("race", str(i)) for i in range(total)]
    a.get_many(keys)  # maps the old shards: they must keep working for this reader
    b = VectorStore(tmp_path, max_shard_bytes=100 * 64)
    b.missing = lambda ks: list(dict.fromkeys(ks))  # a writer that lost every race: all its rows unreferenced
    b.put_many(keys[:250], _race_vec(np.arange(250)))
    before = a.stats()
    assert before["unreferenced_rows"] >= 250 and before["vectors"] == total
    old = set((tmp_path / "shards").iterdir())
    result = a.gc()
    after = a.stats()
    assert result["compacted"] and after["unreferenced_rows"] == 0 and after["vectors"] == total
    assert after["shard_bytes"] == total * 64 and result["bytes_after"] <= result["bytes_before"]
    assert after["shards"] == -(-total // 100) and not old & set((tmp_path / "shards").iterdir())
    for reader in (a, b, VectorStore(tmp_path)):
        np.testing.assert_array_equal(reader.get_many(keys), _race_vec(np.arange(total)))
    assert a.verify()["bad"] == 0
    b.missing = VectorStore.missing.__get__(b)
    b.put_many([cache_key("race", "new")], np.ones((1, 16), np.float32))  # its shard is gone: it claims another
    assert len(a) == total + 1 and a.verify()["bad"] == 0
    np.testing.assert_array_equal(a.get_many([cache_key("race", "new")]), np.ones((1, 16), np.float32))


def test_legacy_store_is_imported_once(tmp_path):
    import sqlite3

    keys, vecs = _keys(300), _vecs(300).astype(np.float16)
    con = sqlite3.connect(tmp_path / "embeddings.sqlite")
    con.executescript("CREATE TABLE vectors (key BLOB PRIMARY KEY, vec BLOB NOT NULL) WITHOUT ROWID;"
                      "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);"
                      "INSERT INTO meta VALUES ('dtype', 'float16'), ('dim', '8');")
    con.executemany("INSERT INTO vectors VALUES (?, ?)", [(k, v.tobytes()) for k, v in zip(keys, vecs)])
    con.commit()
    con.close()
    with pytest.raises(ValueError, match="cache_dtype: float16"):  # imported, then the dtype guard speaks
        VectorStore(tmp_path, dtype="float32")
    cache = VectorStore(tmp_path, dtype="float16")
    assert not (tmp_path / "embeddings.sqlite").exists() and (tmp_path / "embeddings.sqlite.migrated").exists()
    assert len(cache) == 300 and cache.dim == 8
    np.testing.assert_array_equal(cache.get_many(keys), vecs.astype(np.float32))
    assert cache.verify()["bad"] == 0 and cache.stats()["shard_rows"] == 300


def _fill_and_close(path, n=10):
    cache = VectorStore(path)
    keys, vecs = _keys(n), _vecs(n)
    cache.put_many(keys, vecs)
    cache.close()
    return keys, vecs


@pytest.mark.parametrize("wal_shm_writable", [True, False])
def test_read_only_directory_reads_and_refuses_writes(tmp_path, monkeypatch, wal_shm_writable):
    import sqlite3

    from dewey_lab.data.store import vectors as teacher_cache

    keys, vecs = _fill_and_close(tmp_path)
    # root writes through any mode bits, so the probe says what a read-only mount would say
    monkeypatch.setattr(teacher_cache, "_probe_write", lambda path: "Read-only file system")
    if not wal_shm_writable:  # mode=ro cannot make WAL's -shm file: the immutable=1 fallback reads
        connect = sqlite3.connect

        def no_shm(database, *a, **kw):
            if "mode=ro" in str(database) and "immutable" not in str(database):
                raise sqlite3.OperationalError("unable to open database file")
            return connect(database, *a, **kw)
        monkeypatch.setattr(teacher_cache.sqlite3, "connect", no_shm)
    cache = VectorStore(tmp_path)
    assert cache.read_only and len(cache) == 10
    np.testing.assert_array_equal(cache.get_many(keys), vecs)
    assert cache.missing(keys + [b"x" * 32]) == [b"x" * 32]
    with pytest.raises(PermissionError, match=r"is read-only: Read-only file system; set data.cache_dir to a "
                                              r"writable directory \(copy this one there"):
        cache.put_many([b"x" * 32], _vecs(1))
    with pytest.raises(PermissionError):
        cache.gc()
    assert cache.verify()["bad"] == 0


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
    import sqlite3

    cache = VectorStore(tmp_path)
    keys, vecs = _keys(300), _vecs(300)
    cache.put_many(keys[:100], vecs[:100])
    real = os.pwrite

    def full(fd, data, offset):  # writes 40 rows, then the disk is full
        real(fd, bytes(data[:40 * 32]), offset)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match=r"disk full while writing \(No space left on device.*free space or move "
                                      r"data.cache_dir; every vector committed before is kept") as err:
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
    assert again.verify()["bad"] == 0 and again.stats()["unreferenced_rows"] == 0
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
    assert cache.stats()["shards"] == 2 and cache.verify()["bad"] == 0


def test_cache_command(tmp_path, capsys):
    import json

    from dewey_lab.data.store.cli import main

    _fill_and_close(tmp_path)
    main(["stats", str(tmp_path), "--json"])
    stats = json.loads(capsys.readouterr().out)
    assert stats["vectors"] == 10 and stats["dtype"] == "float32" and stats["unreferenced_rows"] == 0
    main(["verify", str(tmp_path)])
    assert re.search(r"bad\s+0", capsys.readouterr().out)
    main(["gc", str(tmp_path)])
    assert re.search(r"compacted\s+False", capsys.readouterr().out)
    shard = tmp_path / "shards" / "shard-000001.f32"
    shard.write_bytes(b"\0" * shard.stat().st_size)
    with pytest.raises(SystemExit) as exit_:
        main(["verify", str(tmp_path)])
    assert exit_.value.code == 1
    main(["verify", str(tmp_path), "--repair", "--json"])
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["repaired"] == 10
    with pytest.raises(FileNotFoundError, match="no teacher cache"):
        main(["stats", str(tmp_path / "nothing")])


def test_merge_copies_what_is_missing_and_is_idempotent(tmp_path):
    """Caches filled on different nodes merge into one: every vector once, exact, the second merge a no-op."""
    from dewey_lab.data.store.cli import main as cache_main

    a, b = VectorStore(tmp_path / "a", dtype="float16"), VectorStore(tmp_path / "b", dtype="float16")
    keys = [cache_key("t", str(i)) for i in range(300)]
    vecs = _vecs(300)
    a.put_many(keys[:200], vecs[:200])
    b.put_many(keys[100:], vecs[100:])  # 100 keys in both
    a.close()
    b.close()
    cache_main(["merge", str(tmp_path / "all"), str(tmp_path / "a"), str(tmp_path / "b")])
    merged = VectorStore(tmp_path / "all", dtype=None)
    assert merged.dtype == "float16" and len(merged) == 300 and merged.verify()["bad"] == 0
    np.testing.assert_array_equal(merged.get_many(keys), vecs.astype(np.float16).astype(np.float32))
    assert merged.merge(VectorStore(tmp_path / "b", dtype=None))["copied"] == 0
    with pytest.raises(ValueError, match="different teachers"):
        merged.merge(_filled(tmp_path / "other", d=16))


def _filled(path, d):
    c = VectorStore(path, dtype="float16")
    c.put_many([cache_key("u", "x")], _vecs(1, d=d))
    return c
