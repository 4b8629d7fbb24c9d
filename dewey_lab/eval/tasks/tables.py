"""Benchmark splits as row tables, read from a local file or the Hugging Face hub, and the checks of
their rows' fields: what the LongEmbed (``longembed.py``) and LoCoV1 (``loco.py``) loaders share.

A local split is ``<folder>/<split>.jsonl`` or ``.parquet`` (json + pyarrow only, so offline machines
and tests need no ``datasets``); a hub split goes through ``datasets.load_dataset``, imported lazily.
Both give the same plain row dicts, so the offline tests of the local path also cover what the hub
path does with its rows. Every error is a one-line exception that names the fix.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".parquet")
# A wrong type inside a data file is bad data, not a caller bug: ValueError like every other data error
# here (hence the TRY004 waivers), so callers catch one exception type for a broken source.


@dataclass
class Table:
    """The rows of one split (hub) or file (local), with where they came from for error messages."""

    where: str  # a file path, or "<repo> <name>/<split>" for the hub
    rows: list[tuple[int, dict[str, Any]]]  # (1-based jsonl line, or parquet / hub row number; row)
    non_utf8: int = 0  # jsonl lines whose invalid UTF-8 bytes were replaced by U+FFFD
    duplicates: int = 0  # rows repeating an earlier row's id and text exactly (dropped)


def read_jsonl(path: Path) -> Table:
    rows, non_utf8 = [], 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:  # a stray Latin-1 byte should not cost the whole task: replace, count
                line, non_utf8 = raw.decode("utf-8", errors="replace"), non_utf8 + 1
            if not line.strip():  # tolerate blank lines, e.g. a trailing newline
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {line_no}: invalid JSON ({exc.msg}); "
                                 "expected one JSON object per line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {line_no}: expected a JSON object, got {type(row).__name__}")  # noqa: TRY004
            rows.append((line_no, row))
    if non_utf8:
        log.warning("%s: %d line(s) held bytes that are not UTF-8; they were replaced by U+FFFD", path, non_utf8)
    return Table(str(path), rows, non_utf8=non_utf8)


def read_parquet(path: Path) -> Table:
    import pyarrow as pa  # lazy: keeps importing the loaders light
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path} is not a readable parquet file ({reason}); "
                         "rewrite it or use jsonl") from exc
    return Table(str(path), list(enumerate(table.to_pylist(), start=1)))


def find_file(folder: Path, stem: str, why: str) -> Path:
    """``<folder>/<stem>.jsonl`` or ``.parquet``; one-line FileNotFoundError naming ``why`` otherwise."""
    found = [folder / f"{stem}{suffix}" for suffix in SUFFIXES if (folder / f"{stem}{suffix}").is_file()]
    if not found:
        raise FileNotFoundError(f"{folder} has no {stem}.jsonl or {stem}.parquet; {why}")
    if len(found) > 1:  # they could disagree, and silently preferring one hides that
        raise ValueError(f"{folder} has both {stem}.jsonl and {stem}.parquet; keep only one")
    return found[0]


def read_file(path: Path) -> Table:
    return read_jsonl(path) if path.suffix == ".jsonl" else read_parquet(path)


def existing_folder(source: str | os.PathLike, what: str) -> Path:
    folder = Path(source)
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"{what} source folder {folder} {state}; pass an existing folder as source, "
                                "or source=None to read the Hugging Face hub")
    return folder


def hub_table(repo: str, name: str | None, split: str, revision: str | None) -> Table:
    """One split from the hub as row dicts; datasets' many failure modes become one RuntimeError."""
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            "loading from the hub needs the datasets package: pip install 'dewey-lab[hub]'"
        ) from exc
    what = f"{repo}{f' {name}' if name else ''} split {split!r} (revision {revision or 'latest'})"
    try:
        ds = datasets.load_dataset(repo, name, split=split, revision=revision)
        rows = list(enumerate(ds, start=1))
    except Exception as err:  # offline, missing cache, auth, network, bad revision: all need the same advice
        raise RuntimeError(f"could not load {what} from the Hugging Face hub "
                           f"({_one_line(err)}); {_hub_fix()}") from err
    return Table(f"{repo} {name + '/' if name else ''}{split}", rows)


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    first = first if len(first) <= 200 else first[:197] + "..."
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _hub_fix() -> str:
    offline = [k for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
               if os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE")]
    if offline:
        flags = " and ".join(f"{k}=0" for k in offline)
        return (f"{' and '.join(offline)} is set and the data is not in the local cache: set {flags} and "
                "go online once, or pass a local folder in the same format via source=")
    return "check the network connection (or HF_TOKEN), or pass a local folder in the same format via source="


# --- fields of a row ------------------------------------------------------------------------------


def required(table: Table, number: int, row: dict[str, Any], field: str, need: str) -> Any:
    value = row.get(field)
    if value is None:  # a null counts as missing: no id or text to use
        raise ValueError(f"{table.where} row {number}: missing field {field!r} (found {sorted(row)}); {need}")
    return value


def required_text(table: Table, number: int, row: dict[str, Any], field: str, need: str) -> str:
    value = required(table, number, row, field, need)
    if not isinstance(value, str):
        raise ValueError(f"{table.where} row {number}: field {field!r} is {type(value).__name__}, "  # noqa: TRY004
                         "expected a string")
    return value


def put_unique(target: dict[str, str], key: str, text: str, table: Table, number: int, kind: str) -> None:
    # An exact repeat (same id, same text) changes nothing: dropped and counted. A repeated id with
    # other text would silently replace the earlier one and change the candidate set: refused.
    if key in target:
        if target[key] == text:
            table.duplicates += 1
            return
        raise ValueError(f"{table.where} row {number}: duplicate {kind} {key!r} with a different text; ids must "
                         "be unique (rename one, or drop the row that is wrong)")
    target[key] = text


def load_warnings(*tables: Table) -> dict[str, int]:
    """What reading the files repaired, counted (reported with the task's scores)."""
    counts = {"non_utf8_lines": sum(t.non_utf8 for t in tables), "duplicate_rows": sum(t.duplicates for t in tables)}
    out = {k: v for k, v in counts.items() if v}
    if out.get("duplicate_rows"):
        log.warning("%s: %d row(s) repeat an earlier row's id and text exactly; dropped",
                    ", ".join(t.where for t in tables if t.duplicates), out["duplicate_rows"])
    return out
