"""The teacher cache returns exactly what it stored and survives a writer killed mid-write."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from dewey_lab.teacher_cache import TeacherCache, cache_key


def _vecs(n, d=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def test_round_trip_is_exact(tmp_path):
    cache = TeacherCache(tmp_path)
    keys = [cache_key("teacher@1", f"text {i}") for i in range(50)]
    vecs = _vecs(50)
    cache.put_many(keys, vecs)
    assert len(cache) == 50 and cache.dim == 8
    order = keys[::-1] + keys[:3]  # any order, repeats allowed
    np.testing.assert_array_equal(cache.get_many(order), np.concatenate([vecs[::-1], vecs[:3]]))
    assert cache.missing(keys + [cache_key("teacher@1", "new")]) == [cache_key("teacher@1", "new")]
    # reopened from disk, in another object
    np.testing.assert_array_equal(TeacherCache(tmp_path).get_many(keys), vecs)


def test_float16_storage_and_dtype_guard(tmp_path):
    cache = TeacherCache(tmp_path, dtype="float16")
    keys = [cache_key("t", str(i)) for i in range(4)]
    vecs = _vecs(4)
    cache.put_many(keys, vecs)
    np.testing.assert_array_equal(cache.get_many(keys), vecs.astype(np.float16).astype(np.float32))
    with pytest.raises(ValueError, match="cache_dtype: float16"):
        TeacherCache(tmp_path, dtype="float32")


def test_key_covers_teacher_and_text():
    assert cache_key("a", "x") == cache_key("a", "x")
    assert len({cache_key("a", "x"), cache_key("b", "x"), cache_key("a", "y"), cache_key("a|", "x")}) == 4


def test_bad_writes_are_refused(tmp_path):
    cache = TeacherCache(tmp_path)
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
    from dewey_lab.teacher_cache import TeacherCache, cache_key
    cache = TeacherCache(sys.argv[1])
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
    cache = TeacherCache(tmp_path)
    n = len(cache)
    assert n % 64 == 0 and n >= committed + 64  # whole blocks only, every reported block kept
    assert cache.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    vecs = cache.get_many([cache_key("t", str(j)) for j in range(n)])
    np.testing.assert_array_equal(vecs[:, 0], np.arange(n, dtype=np.float32))
    # and it takes new writes after the crash
    cache.put_many([cache_key("t", "after")], np.ones((1, 32), np.float32))
    assert len(cache) == n + 1
