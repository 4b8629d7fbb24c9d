"""Loaders for the real benchmark data: LongEmbed and LoCoV1, as `RetrievalTask` objects.

Each loader reads either the Hugging Face hub (``source=None``, via ``datasets.load_dataset``,
imported lazily so the core install does not need it) or a local folder holding the same splits as
``.jsonl`` or ``.parquet`` files (json + pyarrow only, so offline machines and tests need no
``datasets``). Both paths produce plain row dicts and feed the same row -> task conversion, so the
offline tests of the local path also cover what the hub path does with its rows.

Local layouts::

    LongEmbed  <folder>/<name>/{corpus,queries,qrels}.{jsonl,parquet}
               or the three files directly in <folder> (the folder is then that one task)
    LoCoV1     <folder>/{queries,documents}.{jsonl,parquet}  (the two hub datasets as files)

Every error is a one-line exception that names the fix.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dewey_lab.eval.tasks.task import RetrievalTask

log = logging.getLogger(__name__)

LONGEMBED_REPO = "dwzhu/LongEmbed"
# The revision MTEB pins for its LEMB* tasks, so our numbers are comparable with the leaderboard.
LONGEMBED_REVISION = "6e346642246bfb4928c560ee08640dc84d074e8c"
LONGEMBED_REAL = ("narrativeqa", "qmsum", "2wikimqa", "summ_screen_fd")
LONGEMBED_SYNTHETIC = ("passkey", "needle")
MTEB_NAMES: dict[str, str] = {
    "narrativeqa": "LEMBNarrativeQARetrieval",
    "qmsum": "LEMBQMSumRetrieval",
    "2wikimqa": "LEMBWikimQARetrieval",
    "summ_screen_fd": "LEMBSummScreenFDRetrieval",
    "needle": "LEMBNeedleRetrieval",
    "passkey": "LEMBPasskeyRetrieval",
}

LOCO_QUERIES_REPO = "hazyresearch/LoCoV1-Queries"
LOCO_DOCUMENTS_REPO = "hazyresearch/LoCoV1-Documents"
LOCO_SPLIT = "test"
# No LoCoV1 revision is pinned (load_loco's revision defaults to None = latest): our references name none
# to match. Pass one for reproducible runs; it is recorded in each task's meta either way.
LOCO_SUBSETS: tuple[str, ...] = (
    "summ_screen_fd",
    "gov_report",
    "qmsum",
    "qasper_title",
    "qasper_abstract",
    "multifieldqa",
    "2wikimqa",
    "passage_retrieval",
    "courtlistener_HTML",
    "courtlistener_Plain_Text",
    "legal_case_reports",
    "stackoverflow",
)

_LONGEMBED_FIELDS = {"corpus": ("doc_id", "text"), "queries": ("qid", "text"), "qrels": ("qid", "doc_id")}
_LOCO_FIELDS = {"queries": ("query", "answer_pids", "dataset"), "documents": ("pid", "passage", "dataset")}
_SUFFIXES = (".jsonl", ".parquet")
# A wrong type inside a data file is bad data, not a caller bug: ValueError like every other data error
# here (hence the TRY004 waivers), so callers catch one exception type for a broken source.


@dataclass
class _Table:
    """The rows of one split (hub) or file (local), with where they came from for error messages."""

    where: str  # a file path, or "<repo> <name>/<split>" for the hub
    rows: list[tuple[int, dict[str, Any]]]  # (1-based jsonl line, or parquet / hub row number; row)
    non_utf8: int = 0  # jsonl lines whose invalid UTF-8 bytes were replaced by U+FFFD
    duplicates: int = 0  # rows repeating an earlier row's id and text exactly (dropped)


# --- reading ------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> _Table:
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
    return _Table(str(path), rows, non_utf8=non_utf8)


def _read_parquet(path: Path) -> _Table:
    import pyarrow as pa  # lazy: keeps `import dewey_lab.eval.tasks.longembed` light
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path} is not a readable parquet file ({reason}); "
                         "rewrite it or use jsonl") from exc
    return _Table(str(path), list(enumerate(table.to_pylist(), start=1)))


def _find_file(folder: Path, stem: str, why: str) -> Path:
    """``<folder>/<stem>.jsonl`` or ``.parquet``; one-line FileNotFoundError naming ``why`` otherwise."""
    found = [folder / f"{stem}{suffix}" for suffix in _SUFFIXES if (folder / f"{stem}{suffix}").is_file()]
    if not found:
        raise FileNotFoundError(f"{folder} has no {stem}.jsonl or {stem}.parquet; {why}")
    if len(found) > 1:  # they could disagree, and silently preferring one hides that
        raise ValueError(f"{folder} has both {stem}.jsonl and {stem}.parquet; keep only one")
    return found[0]


def _read_file(path: Path) -> _Table:
    return _read_jsonl(path) if path.suffix == ".jsonl" else _read_parquet(path)


def _existing_folder(source: str | os.PathLike, what: str) -> Path:
    folder = Path(source)
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"{what} source folder {folder} {state}; pass an existing folder as source, "
                                "or source=None to read the Hugging Face hub")
    return folder


def _hub_table(repo: str, name: str | None, split: str, revision: str | None) -> _Table:
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
    return _Table(f"{repo} {name + '/' if name else ''}{split}", rows)


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


# --- rows -> tasks (shared by the hub and local paths) ------------------------------------------


def _field(table: _Table, number: int, row: dict[str, Any], field: str, need: str) -> Any:
    value = row.get(field)
    if value is None:  # a null counts as missing: no id or text to use
        raise ValueError(f"{table.where} row {number}: missing field {field!r} (found {sorted(row)}); {need}")
    return value


def _text(table: _Table, number: int, row: dict[str, Any], field: str, need: str) -> str:
    value = _field(table, number, row, field, need)
    if not isinstance(value, str):
        raise ValueError(f"{table.where} row {number}: field {field!r} is {type(value).__name__}, "  # noqa: TRY004
                         "expected a string")
    return value


def _length(table: _Table, number: int, row: dict[str, Any], need: str) -> int:
    value = _field(table, number, row, "context_length", need)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{table.where} row {number}: context_length is {value!r}, expected an int")  # noqa: TRY004
    return value


def _relevance(table: _Table, number: int, row: dict[str, Any]) -> int:
    """1 unless the row carries a positive score; 0 means judged not relevant (row dropped)."""
    for key in ("score", "relevance"):
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{table.where} row {number}: {key} is {value!r}, expected a number")  # noqa: TRY004
        return max(1, int(value)) if value > 0 else 0
    return 1


def _put(target: dict[str, str], key: str, text: str, table: _Table, number: int, kind: str) -> None:
    # An exact repeat (same id, same text) changes nothing: dropped and counted. A repeated id with
    # other text would silently replace the earlier one and change the candidate set: refused.
    if key in target:
        if target[key] == text:
            table.duplicates += 1
            return
        raise ValueError(f"{table.where} row {number}: duplicate {kind} {key!r} with a different text; ids must "
                         "be unique (rename one, or drop the row that is wrong)")
    target[key] = text


def _longembed_tasks(
    name: str, corpus: _Table, queries: _Table, qrels: _Table, lengths: list[int] | None, meta: dict[str, Any]
) -> list[RetrievalTask]:
    """Build the task(s) of one LongEmbed name from its three splits; passkey/needle give one per length."""
    synthetic = name in LONGEMBED_SYNTHETIC
    # Passkey / needle corpus and queries rows also need context_length (qrels may carry it).
    extra = {"corpus": ("context_length",), "queries": ("context_length",)} if synthetic else {}
    need = {split: f"LongEmbed {name} {split} rows need {', '.join(fields + extra.get(split, ()))}"
            for split, fields in _LONGEMBED_FIELDS.items()}
    docs: dict[int | None, dict[str, str]] = {}  # context_length (None for real tasks) -> corpus
    for number, row in corpus.rows:
        length = _length(corpus, number, row, need["corpus"]) if synthetic else None
        doc_id = str(_field(corpus, number, row, "doc_id", need["corpus"]))
        _put(docs.setdefault(length, {}), doc_id, _text(corpus, number, row, "text", need["corpus"]),
             corpus, number, "doc_id")
    qs: dict[int | None, dict[str, str]] = {}
    for number, row in queries.rows:
        length = _length(queries, number, row, need["queries"]) if synthetic else None
        qid = str(_field(queries, number, row, "qid", need["queries"]))
        _put(qs.setdefault(length, {}), qid, _text(queries, number, row, "text", need["queries"]),
             queries, number, "qid")
    rels: dict[int | None, dict[str, dict[str, int]]] = {}
    for number, row in qrels.rows:
        qid = str(_field(qrels, number, row, "qid", need["qrels"]))
        doc_id = str(_field(qrels, number, row, "doc_id", need["qrels"]))
        relevance = _relevance(qrels, number, row)
        for length in _qrel_lengths(qrels, number, row, qid, doc_id, qs, docs, synthetic):
            if relevance > 0:
                bucket = rels.setdefault(length, {}).setdefault(qid, {})
                bucket[doc_id] = max(relevance, bucket.get(doc_id, 0))

    present = sorted(set(docs) | set(qs), key=lambda n: -1 if n is None else n)
    if synthetic:
        if lengths is not None:
            if not lengths:
                raise ValueError(f"{name}: lengths is empty; pass None for every length present")
            missing = sorted(set(lengths) - set(present))
            if missing:
                raise ValueError(f"{name}: context_length {', '.join(map(str, missing))} "
                                 f"not in {corpus.where}; "
                                 f"available: {', '.join(map(str, present)) or 'none'}")
            present = sorted(set(lengths))
    elif lengths is not None:
        log.debug("%s is a real task; ignoring lengths=%s", name, lengths)
    if not present:
        present = [None]  # empty files: let validate() report the empty corpus

    metric = "ndcg@1" if synthetic else "ndcg@10"  # Acc@1 per length for the synthetic tasks, as in LongEmbed
    warned = _load_warnings(corpus, queries, qrels)
    meta = {**meta, "warnings": warned} if warned else meta
    return [
        RetrievalTask(name=name, corpus=docs.get(length, {}), queries=qs.get(length, {}),
                      qrels=rels.get(length, {}), metric=metric, length=length, meta=dict(meta)).validate()
        for length in present
    ]


def _load_warnings(*tables: _Table) -> dict[str, int]:
    """What reading the files repaired, counted (reported with the task's scores)."""
    counts = {"non_utf8_lines": sum(t.non_utf8 for t in tables), "duplicate_rows": sum(t.duplicates for t in tables)}
    out = {k: v for k, v in counts.items() if v}
    if out.get("duplicate_rows"):
        log.warning("%s: %d row(s) repeat an earlier row's id and text exactly; dropped",
                    ", ".join(t.where for t in tables if t.duplicates), out["duplicate_rows"])
    return out


def _qrel_lengths(
    qrels: _Table, number: int, row: dict[str, Any], qid: str, doc_id: str,
    qs: dict[int | None, dict[str, str]], docs: dict[int | None, dict[str, str]], synthetic: bool,
) -> list[int | None]:
    """Which per-length task(s) a qrels row belongs to."""
    if not synthetic:
        return [None]
    if row.get("context_length") is not None:  # the hub's qrels carry it (MTEB filters on it)
        return [_length(qrels, number, row, "")]
    # Without it: the lengths whose queries hold the qid, narrowed to those whose corpus also holds the
    # doc when ids repeat across lengths (if none does, validate() then names the missing document).
    by_query = [n for n, q in qs.items() if qid in q]
    if not by_query:
        raise ValueError(f"{qrels.where} row {number}: qrels name query {qid!r}, which is in no length's "
                         "queries; check the qrels file or give its rows a context_length")
    return [n for n in by_query if doc_id in docs.get(n, {})] or by_query


def _loco_tasks(
    queries: _Table, documents: _Table, subsets: list[str] | None, meta: dict[str, Any]
) -> list[RetrievalTask]:
    """One task per LoCo subset: the documents and queries whose ``dataset`` is that subset."""
    need = {split: f"LoCoV1 {split} rows need {', '.join(fields)}" for split, fields in _LOCO_FIELDS.items()}
    present = {str(_field(documents, n, r, "dataset", need["documents"])) for n, r in documents.rows}
    if subsets is None:  # every known subset the data holds (all 12 on the hub)
        wanted = [s for s in LOCO_SUBSETS if s in present]
        if not wanted:
            raise ValueError(f"{documents.where} holds no known LoCoV1 subset (found {sorted(present)}); "
                             f"valid: {', '.join(LOCO_SUBSETS)}")
    else:
        wanted = list(dict.fromkeys(subsets))
        absent = [s for s in wanted if s not in present]
        if absent:
            raise ValueError(f"{documents.where} has no documents of LoCoV1 subset {absent[0]!r}; "
                             f"subsets present: {', '.join(sorted(present)) or 'none'}")

    docs: dict[str, dict[str, str]] = {s: {} for s in wanted}
    for number, row in documents.rows:
        subset = str(row["dataset"])
        if subset in docs:
            pid = str(_field(documents, number, row, "pid", need["documents"]))
            _put(docs[subset], pid, _text(documents, number, row, "passage", need["documents"]),
                 documents, number, "pid")
    qs: dict[str, dict[str, str]] = {s: {} for s in wanted}
    rels: dict[str, dict[str, dict[str, int]]] = {s: {} for s in wanted}
    for number, row in queries.rows:
        subset = str(_field(queries, number, row, "dataset", need["queries"]))
        if subset not in qs:
            continue
        # Some exports have no qid column: number the subset's queries in order, stable across loads.
        qid = row.get("qid")
        qid = f"{subset}-q{len(qs[subset])}" if qid is None else str(qid)
        _put(qs[subset], qid, _text(queries, number, row, "query", need["queries"]), queries, number, "qid")
        pids = _field(queries, number, row, "answer_pids", need["queries"])
        if isinstance(pids, str) or not isinstance(pids, Iterable):
            raise ValueError(f"{queries.where} row {number}: answer_pids is {type(pids).__name__}, "  # noqa: TRY004
                             "expected a list of pids")
        if pids:
            rels[subset][qid] = {str(pid): 1 for pid in pids}
    warned = _load_warnings(queries, documents)
    meta = {**meta, "warnings": warned} if warned else meta
    return [
        RetrievalTask(name=f"loco/{s}", corpus=docs[s], queries=qs[s], qrels=rels[s], metric="ndcg@10",
                      meta={**meta, "subset": s}).validate()
        for s in wanted
    ]


# --- public API ---------------------------------------------------------------------------------


def load_longembed(
    name: str,
    source: str | None = None,
    revision: str | None = LONGEMBED_REVISION,
    lengths: list[int] | None = None,
) -> list[RetrievalTask]:
    """Load one LongEmbed task; passkey and needle give one task per context length.

    Args:
        name: One of narrativeqa, qmsum, 2wikimqa, summ_screen_fd (metric ndcg@10), passkey, needle
            (metric ndcg@1 = Acc@1, one task per ``context_length``; documents of one length are the
            candidates for the queries of that length).
        source: ``None`` reads ``dwzhu/LongEmbed`` from the hub (needs ``datasets``); a folder reads
            ``<folder>/<name>/{corpus,queries,qrels}.{jsonl,parquet}``, or the three files directly
            in ``<folder>``.
        revision: Hub revision; defaults to the one MTEB pins. Ignored for a local folder.
        lengths: Context lengths to keep for passkey / needle (``None``: all present, ascending);
            ignored for the real tasks.

    Returns:
        Validated tasks, ``meta`` recording source, repo or path, revision and the MTEB task name.
    """
    valid = LONGEMBED_REAL + LONGEMBED_SYNTHETIC
    if name not in valid:
        raise ValueError(f"unknown LongEmbed task {name!r}; valid names: {', '.join(valid)}")
    meta: dict[str, Any] = {"mteb_name": MTEB_NAMES[name]}
    if source is None:
        tables = [_hub_table(LONGEMBED_REPO, name, split, revision) for split in _LONGEMBED_FIELDS]
        meta |= {"source": "hub", "repo": LONGEMBED_REPO, "revision": revision}
    else:
        folder = _existing_folder(source, "LongEmbed")
        why = "LongEmbed folders need corpus, queries and qrels"
        if (folder / name).is_dir():
            folder = folder / name
        elif not any((folder / f"corpus{s}").is_file() for s in _SUFFIXES):
            raise FileNotFoundError(f"{folder} has no {name}/ subfolder and no corpus.jsonl or "
                                    "corpus.parquet; "
                                    f"pass the folder holding {name}/, or one holding that task's files")
        tables = [_read_file(_find_file(folder, split, why)) for split in _LONGEMBED_FIELDS]
        meta |= {"source": "local", "path": str(folder), "revision": None}
    return _longembed_tasks(name, *tables, lengths=lengths, meta=meta)


def load_loco(
    subsets: list[str] | None = None,
    source: str | None = None,
    revision: str | None = None,
) -> list[RetrievalTask]:
    """Load LoCoV1 retrieval tasks, one per subset, named ``loco/<subset>`` (metric ndcg@10).

    Args:
        subsets: Subsets to load, from ``LOCO_SUBSETS``; ``None`` loads every subset the data holds
            (all twelve on the hub), in ``LOCO_SUBSETS`` order.
        source: ``None`` reads ``hazyresearch/LoCoV1-Queries`` and ``-Documents`` (split ``test``) from
            the hub (needs ``datasets``); a folder reads ``<folder>/{queries,documents}.{jsonl,parquet}``.
        revision: Hub revision for both datasets; ``None`` (the default) means the latest, as no
            revision is pinned for LoCoV1. Recorded in ``meta``. Ignored for a local folder.

    Returns:
        Validated tasks; queries without ``qid`` get ``"<subset>-q<index within the subset>"``.
    """
    unknown = [s for s in subsets or [] if s not in LOCO_SUBSETS]
    if unknown:  # before any download
        raise ValueError(f"unknown LoCoV1 subset {unknown[0]!r}; valid subsets: {', '.join(LOCO_SUBSETS)}")
    if source is None:
        queries = _hub_table(LOCO_QUERIES_REPO, None, LOCO_SPLIT, revision)
        documents = _hub_table(LOCO_DOCUMENTS_REPO, None, LOCO_SPLIT, revision)
        meta: dict[str, Any] = {"source": "hub", "repo": [LOCO_QUERIES_REPO, LOCO_DOCUMENTS_REPO],
                                "revision": revision}
    else:
        folder = _existing_folder(source, "LoCoV1")
        why = "LoCoV1 folders need queries and documents (the two hub datasets as files)"
        queries = _read_file(_find_file(folder, "queries", why))
        documents = _read_file(_find_file(folder, "documents", why))
        meta = {"source": "local", "path": str(folder), "revision": None}
    meta["mteb_name"] = None  # no MTEB task to map to; the key is kept so every task's meta has it
    return _loco_tasks(queries, documents, subsets, meta)
