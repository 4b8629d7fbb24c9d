"""Hostile task files through `dewey-lab eval`: a query or passage with no word tokens, an empty query,
an exact duplicate row, non-UTF-8 bytes and a 1M-token passage score with counted warnings in the
results (never a traceback); a conflicting duplicate id and qrels naming a missing document or query
are one error line; vectors already computed stay in the eval cache."""

import json
import shutil
from pathlib import Path

import pytest

from dewey_lab.cli import main
from dewey_lab.resolve import OFFLINE_TEACHER

STANDIN = Path(__file__).parent / "data" / "longembed" / "qmsum"
MILLION = "The committee met again. The sky is blue. " * 100_000  # ~1M MiniLM tokens (4.3M characters)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile") / "qmsum"
    shutil.copytree(STANDIN, folder)
    corpus = _rows(folder / "corpus.jsonl")
    corpus += [corpus[0],  # an exact duplicate row
               {"doc_id": "stars", "text": "*** --- *** ... !!!"},  # no word token
               {"doc_id": "million", "text": MILLION}]
    _write(folder / "corpus.jsonl", corpus)
    with open(folder / "corpus.jsonl", "ab") as f:  # a Latin-1 byte inside a JSON string
        f.write(b'{"doc_id": "latin", "text": "Caf\xe9 minutes: the board approved the budget."}\n')
    queries = _rows(folder / "queries.jsonl") + [{"qid": "q-stars", "text": "*****"}, {"qid": "q-empty", "text": ""}]
    _write(folder / "queries.jsonl", queries)
    qrels = _rows(folder / "qrels.jsonl") + [{"qid": "q-stars", "doc_id": "stars"}, {"qid": "q-empty", "doc_id": "latin"}]
    _write(folder / "qrels.jsonl", qrels)
    return folder.parent


def _run(tmp_path: Path, source: Path, *args: str) -> dict:
    out = tmp_path / "results"
    main(["eval", "--tasks", "qmsum", "--source", str(source), "--out_dir", str(out), "--cache_dir",
          str(tmp_path / "cache"), "--progress", "false", *args])
    (found,) = sorted(out.rglob("*.json"))
    found.rename(found.with_suffix(".seen"))  # the next run's file is the only .json
    return json.loads(found.with_suffix(".seen").read_text())


EXPECTED = {"non_utf8_lines": 1, "duplicate_rows": 1, "empty_queries": 1, "queries_without_words": 1,
            "passages_without_words": 1}


def test_bm25_scores_hostile_files_with_counted_warnings(hostile, tmp_path):
    payload = _run(tmp_path, hostile, "--model", "bm25")
    (row,) = payload["rows"]
    assert row["warnings"] == EXPECTED and row["n_queries"] == 6 and row["n_docs"] == 8
    assert 0 < row["main"] < 1


def test_dense_scores_hostile_files_and_keeps_its_vectors(hostile, tmp_path, monkeypatch, caplog):
    payload = _run(tmp_path, hostile, "--model", OFFLINE_TEACHER, "--mode", "both")
    rows = {r["mode"]: r for r in payload["rows"]}
    assert set(rows) == {"single", "multi"}
    assert all(r["warnings"] == EXPECTED and r["truncated"] == 1 for r in rows.values())  # the 1M-token passage
    md = next((tmp_path / "results").rglob("*.md")).read_text()
    assert "1 non utf8 lines, 1 duplicate rows, 1 empty queries" in md

    from dewey_lab.eval.embedder import Embedder

    real, passages = Embedder.embed, []

    def counting(self, items, chunks=True, progress=None, extra=None):
        if chunks:  # passages (queries are embedded with chunks=False and are not cached)
            passages.extend(items)
        return real(self, items, chunks, progress, extra)

    monkeypatch.setattr(Embedder, "embed", counting)
    again = _run(tmp_path, hostile, "--model", OFFLINE_TEACHER, "--mode", "both")
    assert passages == []  # every passage vector came from the eval cache
    assert [r["main"] for r in again["rows"]] == [r["main"] for r in payload["rows"]]


def _corrupt(source: Path, tmp_path: Path, split: str, row: dict) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(source, folder)
    with open(folder / "qmsum" / f"{split}.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return folder


def _error(tmp_path: Path, capsys, source: Path, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--tasks", "qmsum", "--source", str(source), "--out_dir", str(tmp_path / "out"),
              "--cache_dir", "", "--progress", "false", *args])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len([e for e in err if e.startswith("error:")]) == 1 and not any("Traceback" in e for e in err)
    return next(e for e in err if e.startswith("error:"))


@pytest.mark.parametrize(("split", "row", "expect"), [
    ("corpus", {"doc_id": "qmsum-0", "text": "other text"}, "duplicate doc_id 'qmsum-0' with a different text"),
    ("qrels", {"qid": "qmsum-q0", "doc_id": "nowhere"}, "document 'nowhere', which is not in the corpus"),
    ("qrels", {"qid": "q-nobody", "doc_id": "qmsum-0"}, "query 'q-nobody', which is not in queries"),
])
def test_unfixable_files_are_one_line(hostile, tmp_path, capsys, split, row, expect):
    line = _error(tmp_path, capsys, _corrupt(hostile, tmp_path, split, row), "--model", "bm25")
    assert expect in line
