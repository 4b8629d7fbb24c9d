"""Loader for LoCoV1 (``hazyresearch/LoCoV1-Queries`` and ``-Documents``, split ``test``), as one
``RetrievalTask`` per subset, named ``loco/<subset>`` (metric nDCG@10).

Reads the hub (``source=None``) or a local folder holding the two hub datasets as files::

    <folder>/{queries,documents}.{jsonl,parquet}

(``tables.py`` reads either into the same row dicts.) Every error is a one-line exception that
names the fix.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from dewey_lab.eval.tasks.tables import (
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

_LOCO_FIELDS = {"queries": ("query", "answer_pids", "dataset"), "documents": ("pid", "passage", "dataset")}


def _loco_tasks(
    queries: Table, documents: Table, subsets: list[str] | None, meta: dict[str, Any]
) -> list[RetrievalTask]:
    """One task per LoCo subset: the documents and queries whose ``dataset`` is that subset."""
    need = {split: f"LoCoV1 {split} rows need {', '.join(fields)}" for split, fields in _LOCO_FIELDS.items()}
    present = {str(required(documents, n, r, "dataset", need["documents"])) for n, r in documents.rows}
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
            pid = str(required(documents, number, row, "pid", need["documents"]))
            text = required_text(documents, number, row, "passage", need["documents"])
            put_unique(docs[subset], pid, text, documents, number, "pid")
    qs: dict[str, dict[str, str]] = {s: {} for s in wanted}
    rels: dict[str, dict[str, dict[str, int]]] = {s: {} for s in wanted}
    for number, row in queries.rows:
        subset = str(required(queries, number, row, "dataset", need["queries"]))
        if subset not in qs:
            continue
        # Some exports have no qid column: number the subset's queries in order, stable across loads.
        qid = row.get("qid")
        qid = f"{subset}-q{len(qs[subset])}" if qid is None else str(qid)
        text = required_text(queries, number, row, "query", need["queries"])
        put_unique(qs[subset], qid, text, queries, number, "qid")
        pids = required(queries, number, row, "answer_pids", need["queries"])
        if isinstance(pids, str) or not isinstance(pids, Iterable):
            raise ValueError(f"{queries.where} row {number}: answer_pids is {type(pids).__name__}, "  # noqa: TRY004
                             "expected a list of pids")
        if pids:
            rels[subset][qid] = {str(pid): 1 for pid in pids}
    warned = load_warnings(queries, documents)
    meta = {**meta, "warnings": warned} if warned else meta
    return [
        RetrievalTask(name=f"loco/{s}", corpus=docs[s], queries=qs[s], qrels=rels[s], metric="ndcg@10",
                      meta={**meta, "subset": s}).validate()
        for s in wanted
    ]


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
        queries = hub_table(LOCO_QUERIES_REPO, None, LOCO_SPLIT, revision)
        documents = hub_table(LOCO_DOCUMENTS_REPO, None, LOCO_SPLIT, revision)
        meta: dict[str, Any] = {"source": "hub", "repo": [LOCO_QUERIES_REPO, LOCO_DOCUMENTS_REPO],
                                "revision": revision}
    else:
        folder = existing_folder(source, "LoCoV1")
        why = "LoCoV1 folders need queries and documents (the two hub datasets as files)"
        queries = read_file(find_file(folder, "queries", why))
        documents = read_file(find_file(folder, "documents", why))
        meta = {"source": "local", "path": str(folder), "revision": None}
    meta["mteb_name"] = None  # no MTEB task to map to; the key is kept so every task's meta has it
    return _loco_tasks(queries, documents, subsets, meta)
