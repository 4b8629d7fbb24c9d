"""Throughput and size of the teacher cache (``dewey_lab.data.store.vectors``), one fresh store per dimension.

    python benchmarks/cache_throughput.py --n 200000 --dims 384,4096 --dtype float16

Per dimension: write ``n`` random vectors with ``put_many`` in blocks of ``--block`` (each block: shard
append + fsync + one index commit), read ``--reads`` batches of ``--read_batch`` random keys with
``get_many``, ask ``missing`` about all ``n`` keys, and measure the bytes on disk. Reads run against a
warm page cache (the store was just written); cold reads are bound by the disk's random-read rate.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from dewey_lab.data.store.vectors import VectorStore, cache_key


def bench(root: Path, n: int, dim: int, dtype: str, block: int, reads: int, read_batch: int) -> dict:
    path = root / f"d{dim}"
    cache = VectorStore(path, dtype=dtype)
    keys = [cache_key("bench", str(i)) for i in range(n)]
    rng = np.random.default_rng(dim)
    itemsize = np.dtype(dtype).itemsize
    t_write = 0.0
    for lo in range(0, n, block):
        vecs = rng.standard_normal((min(block, n - lo), dim), dtype=np.float32)
        t0 = time.perf_counter()
        cache.put_many(keys[lo:lo + block], vecs)
        t_write += time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(reads):
        pick = rng.integers(0, n, read_batch)
        cache.get_many([keys[i] for i in pick])
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    left = cache.missing(keys)
    t_missing = time.perf_counter() - t0
    assert not left
    cache.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    stats = cache.stats()
    cache.close()
    row_mb = dim * itemsize / 1e6
    return {"dim": dim, "write_vps": n / t_write, "write_mbs": n * row_mb / t_write,
            "read_vps": reads * read_batch / t_read, "read_mbs": reads * read_batch * row_mb / t_read,
            "missing_kps": n / t_missing, "index_bpv": stats["index_bytes"] / n,
            "gb_per_million": (stats["shard_bytes"] + stats["index_bytes"]) / n * 1e6 / 1e9}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200_000, help="vectors per store")
    p.add_argument("--dims", default="384,4096", help="comma-separated dimensions, one store each")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--block", type=int, default=2048, help="vectors per put_many (one commit)")
    p.add_argument("--reads", type=int, default=400, help="get_many calls")
    p.add_argument("--read_batch", type=int, default=256, help="random keys per get_many")
    p.add_argument("--dir", default=None, help="where to build the stores (default: a temporary directory, removed)")
    a = p.parse_args(argv)
    root = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="cache_bench_"))
    rows = []
    try:
        for dim in (int(d) for d in a.dims.split(",")):
            rows.append(bench(root, a.n, dim, a.dtype, a.block, a.reads, a.read_batch))
    finally:
        if not a.dir:
            shutil.rmtree(root, ignore_errors=True)
    print(f"teacher cache, {a.n:,} vectors, {a.dtype}, writes in blocks of {a.block}, "
          f"reads of {a.read_batch} random keys (warm page cache)\n")
    print("| dim | write vec/s | write MB/s | read vec/s | read MB/s | missing keys/s | index B/vec | GB per 1M vec |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dim']} | {r['write_vps']:,.0f} | {r['write_mbs']:,.0f} | {r['read_vps']:,.0f} | "
              f"{r['read_mbs']:,.0f} | {r['missing_kps']:,.0f} | {r['index_bpv']:.1f} | {r['gb_per_million']:.2f} |")


if __name__ == "__main__":
    main()
