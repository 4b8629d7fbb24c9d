"""Loader for LongEmbed (``dwzhu/LongEmbed``), as ``RetrievalTask`` objects: the four real tasks
(nDCG@10) and passkey / needle, one task per context length (Acc@1 = nDCG@1).

Reads the hub (``source=None``) or a local folder holding the same splits as files::

    <folder>/<name>/{corpus,queries,qrels}.{jsonl,parquet}
    or the three files directly in <folder> (the folder is then that one task)

(``tables.py`` reads either into the same row dicts.) Every error is a one-line exception that
names the fix.
"""

from __future__ import annotations

import logging
from typing import Any

from dewey_lab.eval.tasks.tables import (
    SUFFIXES,
    Table,
    existing_folder,
    find_file,
    hub_table,
    load_warnings,
    put_unique,
    read_file,
    required,
    required_text,
)
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

_LONGEMBED_FIELDS = {"corpus": ("doc_id", "text"), "queries": ("qid", "text"), "qrels": ("qid", "doc_id")}


def _length(table: Table, number: int, row: dict[str, Any], need: str) -> int:
    value = required(table, number, row, "context_length", need)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{table.where} row {number}: context_length is {value!r}, expected an int")  # noqa: TRY004
    return value


def _relevance(table: Table, number: int, row: dict[str, Any]) -> int:
    """1 unless the row carries a positive score; 0 means judged not relevant (row dropped)."""
    for key in ("score", "relevance"):
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{table.where} row {number}: {key} is {value!r}, expected a number")  # noqa: TRY004
        return max(1, int(value)) if value > 0 else 0
    return 1


def _longembed_tasks(
    name: str, corpus: Table, queries: Table, qrels: Table, lengths: list[int] | None, meta: dict[str, Any]
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
        doc_id = str(required(corpus, number, row, "doc_id", need["corpus"]))
        text = required_text(corpus, number, row, "text", need["corpus"])
        put_unique(docs.setdefault(length, {}), doc_id, text, corpus, number, "doc_id")
    qs: dict[int | None, dict[str, str]] = {}
    for number, row in queries.rows:
        length = _length(queries, number, row, need["queries"]) if synthetic else None
        qid = str(required(queries, number, row, "qid", need["queries"]))
        text = required_text(queries, number, row, "text", need["queries"])
        put_unique(qs.setdefault(length, {}), qid, text, queries, number, "qid")
    rels: dict[int | None, dict[str, dict[str, int]]] = {}
    for number, row in qrels.rows:
        qid = str(required(qrels, number, row, "qid", need["qrels"]))
        doc_id = str(required(qrels, number, row, "doc_id", need["qrels"]))
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
    warned = load_warnings(corpus, queries, qrels)
    meta = {**meta, "warnings": warned} if warned else meta
    return [
        RetrievalTask(name=name, corpus=docs.get(length, {}), queries=qs.get(length, {}),
                      qrels=rels.get(length, {}), metric=metric, length=length, meta=dict(meta)).validate()
        for length in present
    ]


def _qrel_lengths(
    qrels: Table, number: int, row: dict[str, Any], qid: str, doc_id: str,
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
        tables = [hub_table(LONGEMBED_REPO, name, split, revision) for split in _LONGEMBED_FIELDS]
        meta |= {"source": "hub", "repo": LONGEMBED_REPO, "revision": revision}
    else:
        folder = existing_folder(source, "LongEmbed")
        why = "LongEmbed folders need corpus, queries and qrels"
        if (folder / name).is_dir():
            folder = folder / name
        elif not any((folder / f"corpus{s}").is_file() for s in SUFFIXES):
            raise FileNotFoundError(f"{folder} has no {name}/ subfolder and no corpus.jsonl or "
                                    "corpus.parquet; "
                                    f"pass the folder holding {name}/, or one holding that task's files")
        tables = [read_file(find_file(folder, split, why)) for split in _LONGEMBED_FIELDS]
        meta |= {"source": "local", "path": str(folder), "revision": None}
    return _longembed_tasks(name, *tables, lengths=lengths, meta=meta)
