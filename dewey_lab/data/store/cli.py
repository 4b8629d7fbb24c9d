"""``dewey-lab cache stats|verify|gc|merge DIR``: look after a teacher (or evaluation) vector store.

    dewey-lab cache stats  data/teacher_cache           # vectors, shards, bytes, bytes per vector
    dewey-lab cache verify data/teacher_cache [--repair]  # crc of every row; --repair drops bad entries
    dewey-lab cache gc     data/teacher_cache           # compact: drop rows no key points to
    dewey-lab cache merge  data/teacher_cache node1/cache node2/cache  # copy in what the others hold

``verify`` exits 1 when it finds bad entries it did not repair. ``--json`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dewey_lab.data.store import maintenance
from dewey_lab.data.store.index import INDEX_NAME, LEGACY_NAME
from dewey_lab.data.store.vectors import VectorStore


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="dewey-lab cache", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("stats", "verify", "gc", "merge"))
    p.add_argument("dir", help="the cache directory (data.cache.dir)")
    p.add_argument("sources", nargs="*", help="merge: caches whose vectors to copy into DIR")
    p.add_argument("--repair", action="store_true", help="verify: delete bad entries so the next fill recomputes them")
    p.add_argument("--dtype", choices=("float32", "float16"), default=None,
                   help="the storage dtype to expect (default: whatever the store holds)")
    p.add_argument("--max_shard_bytes", type=int, default=1 << 30, help="gc: size of the shards it writes")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    a = p.parse_args(argv)
    path = Path(a.dir)
    if a.command == "merge":
        if not a.sources:
            p.error("merge needs the caches to copy from: dewey-lab cache merge DIR SOURCE [SOURCE ...]")
        _check(*map(Path, a.sources))
        sources = [VectorStore(src, dtype=None) for src in a.sources]
        cache, out = VectorStore(path, dtype=a.dtype or sources[0].dtype), {}
        for src, source in zip(a.sources, sources, strict=True):
            out[src] = maintenance.merge(cache, source)
        print(json.dumps(out) if a.json else "\n".join(f"{k}: {v}" for k, v in out.items()))
        return
    _check(path)
    if a.repair and a.command != "verify":
        p.error("--repair goes with verify")
    cache = VectorStore(path, dtype=a.dtype, max_shard_bytes=a.max_shard_bytes)
    try:
        if a.command == "stats":
            out = cache.stats()
        elif a.command == "verify":
            out = maintenance.verify(cache, repair=a.repair)
        else:
            out = maintenance.gc(cache)
    finally:
        cache.close()
    if a.json:
        print(json.dumps(out))
    else:
        print(_table(out))
    if a.command == "verify" and out["bad"] and not a.repair:
        sys.exit(1)


def _check(*paths: Path) -> None:
    for path in paths:
        if not (path / INDEX_NAME).exists() and not (path / LEGACY_NAME).exists():
            raise FileNotFoundError(f"no teacher cache at {path} (no {INDEX_NAME}); pass the directory data.cache.dir names")


def _table(d: dict) -> str:
    width = max(map(len, d))
    return "\n".join(f"{k:<{width}}  {_fmt(k, v)}" for k, v in d.items())


def _fmt(key: str, v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int) and (key.startswith("bytes_") or key.endswith("_bytes")) and v >= 1 << 20:
        return f"{v:,} ({v / 2**30:.2f} GiB)" if v >= 1 << 30 else f"{v:,} ({v / 2**20:.1f} MiB)"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, list):
        return ", ".join(map(str, v)) or "-"
    return str(v)


if __name__ == "__main__":
    main()
