"""Looking after a vector store: verify finds and repairs damage, gc compacts without losing a vector
(even when it fails half-way), merge copies what is missing, and a store of the former layout is imported."""

import json
import os
import re
import sqlite3

import numpy as np
import pytest
from test_store import _fill_and_close, _keys, _race, _race_vec, _vecs

from dewey_lab.data.store.cli import main as cache_main
from dewey_lab.data.store.maintenance import gc, merge, verify
from dewey_lab.data.store.vectors import VectorStore, cache_key


def test_verify_finds_a_flipped_byte_and_repair_drops_it(tmp_path):
    cache = VectorStore(tmp_path)
    keys, vecs = _keys(20), _vecs(20)
    cache.put_many(keys, vecs)
    assert verify(cache) == {**verify(cache), "bad": 0, "bad_crc": 0}
    shard = tmp_path / "shards" / "shard-000001.f32"
    raw = bytearray(shard.read_bytes())
    raw[7 * 32 + 5] ^= 0x10  # row 7
    shard.write_bytes(raw)
    report = verify(VectorStore(tmp_path))
    assert report["bad"] == report["bad_crc"] == 1 and report["bad_keys"] == [keys[7].hex()]
    assert report["repaired"] == 0 and cache.missing(keys) == []  # reporting only changes nothing
    fixed = verify(cache, repair=True)
    assert fixed["repaired"] == 1 and cache.missing(keys) == [keys[7]] and len(cache) == 19
    cache.put_many([keys[7]], vecs[7:8])  # the next fill recomputes it
    np.testing.assert_array_equal(cache.get_many(keys), vecs)
    assert verify(cache)["bad"] == 0 and cache.stats()["unreferenced_rows"] == 1


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
    result = gc(a)
    after = a.stats()
    assert result["compacted"] and after["unreferenced_rows"] == 0 and after["vectors"] == total
    assert after["shard_bytes"] == total * 64 and result["bytes_after"] <= result["bytes_before"]
    assert after["shards"] == -(-total // 100) and not old & set((tmp_path / "shards").iterdir())
    for reader in (a, b, VectorStore(tmp_path)):
        np.testing.assert_array_equal(reader.get_many(keys), _race_vec(np.arange(total)))
    assert verify(a)["bad"] == 0
    b.missing = VectorStore.missing.__get__(b)
    b.put_many([cache_key("race", "new")], np.ones((1, 16), np.float32))  # its shard is gone: it claims another
    assert len(a) == total + 1 and verify(a)["bad"] == 0
    np.testing.assert_array_equal(a.get_many([cache_key("race", "new")]), np.ones((1, 16), np.float32))


def test_gc_that_fails_half_way_leaves_the_store_as_it_was(tmp_path, monkeypatch):
    """The disk fills while gc writes its second fresh shard: the index keeps the old shards, the new
    files go, every vector reads back; gc run again then compacts."""
    import errno

    rb = 8 * 4  # 8-d float32 rows
    a = VectorStore(tmp_path, max_shard_bytes=40 * rb)
    keys, vecs = _keys(100), _vecs(100)
    for lo in range(0, 100, 25):
        a.put_many(keys[lo:lo + 25], vecs[lo:lo + 25])
    loser = VectorStore(tmp_path, max_shard_bytes=40 * rb)
    loser.missing = lambda ks: list(dict.fromkeys(ks))  # 30 unreferenced rows for gc to drop
    loser.put_many(keys[:30], vecs[:30] + 1)
    con = sqlite3.connect(tmp_path / "index.sqlite")
    index_before = sorted(con.execute("SELECT key, shard, row FROM vectors"))
    shards_before = dict(con.execute("SELECT id, rows FROM shards"))
    files_before = {p.name: p.read_bytes() for p in (tmp_path / "shards").iterdir()}
    real, calls = os.pwrite, []

    def full(fd, data, offset):
        calls.append(len(data))
        if len(calls) > 1:  # the first fresh shard is written; the second meets a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match="No space left"):
        gc(a)
    monkeypatch.undo()
    assert sorted(con.execute("SELECT key, shard, row FROM vectors")) == index_before
    assert dict(con.execute("SELECT id, rows FROM shards")) == shards_before
    assert {p.name: p.read_bytes() for p in (tmp_path / "shards").iterdir()} == files_before
    for reader in (a, VectorStore(tmp_path)):
        np.testing.assert_array_equal(reader.get_many(keys), vecs)
    assert verify(a)["bad"] == 0
    result = gc(a)
    assert result["compacted"] and result["rows_dropped"] == 30 and result["shards_after"] == 3  # 40 + 40 + 20
    np.testing.assert_array_equal(VectorStore(tmp_path).get_many(keys), vecs)
    con.close()


def test_legacy_store_is_imported_once(tmp_path):
    keys, vecs = _keys(300), _vecs(300).astype(np.float16)
    con = sqlite3.connect(tmp_path / "embeddings.sqlite")
    con.executescript("CREATE TABLE vectors (key BLOB PRIMARY KEY, vec BLOB NOT NULL) WITHOUT ROWID;"
                      "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);"
                      "INSERT INTO meta VALUES ('dtype', 'float16'), ('dim', '8');")
    con.executemany("INSERT INTO vectors VALUES (?, ?)", [(k, v.tobytes()) for k, v in zip(keys, vecs)])
    con.commit()
    con.close()
    with pytest.raises(ValueError, match="cache.dtype: float16"):  # imported, then the dtype guard speaks
        VectorStore(tmp_path, dtype="float32")
    cache = VectorStore(tmp_path, dtype="float16")
    assert not (tmp_path / "embeddings.sqlite").exists() and (tmp_path / "embeddings.sqlite.migrated").exists()
    assert len(cache) == 300 and cache.dim == 8
    np.testing.assert_array_equal(cache.get_many(keys), vecs.astype(np.float32))
    assert verify(cache)["bad"] == 0 and cache.stats()["shard_rows"] == 300


def test_cache_command(tmp_path, capsys):
    _fill_and_close(tmp_path)
    cache_main(["stats", str(tmp_path), "--json"])
    stats = json.loads(capsys.readouterr().out)
    assert stats["vectors"] == 10 and stats["dtype"] == "float32" and stats["unreferenced_rows"] == 0
    cache_main(["verify", str(tmp_path)])
    assert re.search(r"bad\s+0", capsys.readouterr().out)
    cache_main(["gc", str(tmp_path)])
    assert re.search(r"compacted\s+False", capsys.readouterr().out)
    shard = tmp_path / "shards" / "shard-000001.f32"
    shard.write_bytes(b"\0" * shard.stat().st_size)
    with pytest.raises(SystemExit) as exit_:
        cache_main(["verify", str(tmp_path)])
    assert exit_.value.code == 1
    cache_main(["verify", str(tmp_path), "--repair", "--json"])
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["repaired"] == 10
    with pytest.raises(FileNotFoundError, match="no teacher cache"):
        cache_main(["stats", str(tmp_path / "nothing")])


def test_merge_copies_what_is_missing_and_is_idempotent(tmp_path):
    """Caches filled on different nodes merge into one: every vector once, exact, the second merge a no-op."""
    a, b = VectorStore(tmp_path / "a", dtype="float16"), VectorStore(tmp_path / "b", dtype="float16")
    keys = [cache_key("t", str(i)) for i in range(300)]
    vecs = _vecs(300)
    a.put_many(keys[:200], vecs[:200])
    b.put_many(keys[100:], vecs[100:])  # 100 keys in both
    a.close()
    b.close()
    cache_main(["merge", str(tmp_path / "all"), str(tmp_path / "a"), str(tmp_path / "b")])
    merged = VectorStore(tmp_path / "all", dtype=None)
    assert merged.dtype == "float16" and len(merged) == 300 and verify(merged)["bad"] == 0
    np.testing.assert_array_equal(merged.get_many(keys), vecs.astype(np.float16).astype(np.float32))
    assert merge(merged, VectorStore(tmp_path / "b", dtype=None))["copied"] == 0
    with pytest.raises(ValueError, match="different teachers"):
        merge(merged, _filled(tmp_path / "other", d=16))


def _filled(path, d):
    c = VectorStore(path, dtype="float16")
    c.put_many([cache_key("u", "x")], _vecs(1, d=d))
    return c
