"""The vector store's shard files, and the one writer of them.

A shard (``shards/shard-000001.f16``) holds raw little-endian rows of D * itemsize bytes: no
header, append-only, read through ``np.memmap``. The index (``index.py``) records how many of its
rows are committed; bytes past them are never read and are cut by the next writer of the shard.
``ShardWriter`` is the only code that writes shard bytes: ``VectorStore.put_many`` (so also
``merge`` and the legacy import) and ``gc``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

SHARD_RE = re.compile(r"^shard-(\d+)\.f(16|32)$")


def shard_name(shard: int, itemsize: int) -> str:
    """The file name of shard ``shard`` holding ``itemsize``-byte floats (``shard-000001.f32``)."""
    return f"shard-{shard:06d}.f{itemsize * 8}"


class ShardGone(Exception):
    """An index entry named a shard that gc has just replaced: look the keys up again."""


class ShardWriter:
    """Appends rows to shard files, filling each to ``cap_bytes`` before taking a fresh one.

    A shard is first cut to the row the writer starts it at (drops what a killed write left past
    the commit), and fsynced before the writer moves on or closes: rows are durable before an index
    names them. Which rows the index then names, and when, is the caller's transaction.

    Args:
        path: the file of a shard id.
        rowbytes: bytes per row (D * itemsize).
        cap_bytes: a shard holds ``max(1, cap_bytes // rowbytes)`` rows (``max_shard_bytes``).
        claim: returns the id of a fresh, empty shard (its index row is the caller's business).
        at: (shard, committed rows) to continue, or None to claim a shard for the first row.
    """

    def __init__(self, path: Callable[[int], Path], rowbytes: int, cap_bytes: int, claim: Callable[[], int],
                 at: tuple[int, int] | None = None) -> None:
        self.path, self.rb, self.claim = path, rowbytes, claim
        self.cap = max(1, cap_bytes // rowbytes)  # rows a shard holds
        self.shard, self.rows = at if at is not None else (None, self.cap)
        self.fd = -1
        self.started: dict[int, int] = {}  # shard -> the row this writer began it at
        self.ends: dict[int, int] = {}  # shard -> its rows after what this writer wrote

    def write(self, data: memoryview) -> list[tuple[int, int, int, int]]:
        """Append ``data`` (whole rows, as bytes). Returns where they went, one piece per shard:
        (shard, its first row written, the piece's first row in ``data``, rows)."""
        n, lo, plan = len(data) // self.rb, 0, []
        while lo < n:
            if self.fd < 0 or self.rows >= self.cap:
                self._next()
            take = min(n - lo, self.cap - self.rows)
            write_all(self.fd, data[lo * self.rb:(lo + take) * self.rb], self.rows * self.rb)
            plan.append((self.shard, self.rows, lo, take))
            self.rows, lo = self.rows + take, lo + take
            self.ends[self.shard] = self.rows
        return plan

    def _next(self) -> None:
        """Open the shard to write: the current one while it has room, else a freshly claimed one."""
        self.close()
        if self.shard is None or self.rows >= self.cap:
            self.shard, self.rows = self.claim(), 0
        self.fd = os.open(self.path(self.shard), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.started.setdefault(self.shard, self.rows)
        os.ftruncate(self.fd, self.rows * self.rb)

    def close(self) -> None:
        """fsync and close the open shard, if any."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def abort(self) -> None:
        """Close without syncing, and cut every shard back to the row this writer began it at."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for shard, row in self.started.items():
            try:
                os.truncate(self.path(shard), row * self.rb)
            except OSError:
                pass  # the next write or open truncates it


def write_all(fd: int, data: memoryview, offset: int) -> None:
    """pwrite all of ``data`` at ``offset`` (pwrite may write less than asked)."""
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def fsync_dir(path: Path) -> None:
    """fsync a directory, so the files created or removed in it survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
