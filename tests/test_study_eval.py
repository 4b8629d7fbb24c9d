"""A study's post-fit evaluation in its report (``dewey_lab.runs.study_eval``): the '# eval:' line, the table of
every run and mode with intervals and marks, and multi- against single-vector within a run, checked against
arithmetic done here by hand."""

import json

import numpy as np
import pytest

from dewey_lab.runs.study_eval import eval_file, multi_vs_single, references, section


def _row(model, mode, task, length, per_query, metric="ndcg@1"):
    qids = [f"q{i}" for i in range(len(per_query))]
    return {"model": model, "mode": mode, "task": task, "length": length, "main": float(np.mean(per_query)),
            "main_metric": metric, "ci": [0.1, 0.9], "qids": qids, "per_query": per_query, "truncated": 0,
            "extension": "none"}


def test_multi_against_single_is_the_stratified_mean_difference():
    """Two lengths with 4 and 8 queries: the difference over lengths is the mean of the per-length mean
    differences (each length weighs the same, as LongEmbed averages over lengths), not the pooled mean."""
    a4, b4 = [1, 1, 1, 0], [0, 0, 1, 0]  # multi, single at length 64: +0.5
    a8, b8 = [1] * 8, [1] * 8  # at length 128: 0
    rows = [_row("s", "multi", "passkey", 64, a4), _row("s", "single", "passkey", 64, b4),
            _row("s", "multi", "passkey", 128, a8), _row("s", "single", "passkey", 128, b8),
            _row("bm25", "bm25", "passkey", 64, b4), _row("bm25", "bm25", "passkey", 128, b8)]
    pairs = multi_vs_single(rows)
    assert [(p["model"], p["a"], p["b"]) for p in pairs] == [("s", "multi", "single")]  # bm25 has no multi
    d = pairs[0]["tasks"]["passkey"]
    assert d["diff"] == pytest.approx((0.5 + 0.0) / 2)  # pooled would be 2/12
    assert d["lo"] <= d["diff"] <= d["hi"] and 0 < d["p"] <= 1


def test_section_table_and_references(tmp_path):
    rows = [_row("s", m, "passkey", n, [1, 0, 1, 1] if m == "multi" else [0, 0, 1, 0])
            for m in ("single", "multi") for n in (1024, 2048)]
    rows += [_row("s", m, "deep/pydoc", None, [1, 1, 0, 1] if m == "multi" else [0, 1, 0, 0], "ndcg@10")
             for m in ("single", "multi")]
    rows[2]["vs_ref"] = {"p": 0.01}  # multi at 1k
    payload = {"rows": rows, "summary": {"s: single": {"passkey": 25.0, "deep/pydoc": 25.0},
                                         "s: multi": {"passkey": 75.0, "deep/pydoc": 75.0}},
               "summary_ci": {"s: multi": {"passkey": [0.5, 1.0]}}, "reference": {"single": "s: single"},
               "settings": {"runs": [{"model": str(tmp_path / "v"), "label": "s"}, {"model": "bm25", "label": "BM25"},
                                     {"model": f"untrained:{tmp_path / 'v'}", "label": "u"}, {"model": "pkg://m"}]}}
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "run_info.json").write_text("{}")  # a run directory: a student
    lines = section(payload, tmp_path / "e.yaml", ["eval-passkey.png"])
    table = {ln.split(" | ")[0][2:]: ln.split(" | ") for ln in lines if ln.startswith("| s: ")}
    head = next(ln for ln in lines if ln.startswith("| run: mode")).split(" | ")
    assert head[1:] == ["passkey@1k", "passkey@2k", "passkey avg", "deep/pydoc nDCG@10 |"]
    assert table["s: multi"][1] == "75.00 [10.00, 90.00] *"  # the row's own interval and its mark
    assert table["s: multi"][3] == "75.00 [50.00, 100.00]" and table["s: single"][3] == "25.00"
    diff = next(ln for ln in lines if ln.startswith("| s | multi − single")).split(" | ")
    assert diff[2].startswith("+50.00 [") and diff[3].startswith("+50.00 [")
    assert references(payload) == {"BM25", "pkg://m"}
    assert "`eval-passkey.png`" in lines[-2]


def test_eval_line(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text("# scale: small\n# Question?\nsweep: {}\n")
    assert eval_file(study) is None
    study.write_text(f"# scale: small\n# eval: {tmp_path / 'e.yaml'}\nsweep: {{}}\n")
    with pytest.raises(FileNotFoundError, match="names the eval study .*e.yaml, which does not exist"):
        eval_file(study)
    (tmp_path / "e.yaml").write_text(json.dumps({"tasks": "passkey"}))
    assert eval_file(study) == tmp_path / "e.yaml"
    study.write_text(f"sweep: {{}}\n# eval: {tmp_path / 'e.yaml'}\n")  # below the opening comment: not a header
    assert eval_file(study) is None


def test_compare_runs_the_named_eval_and_can_reuse_it(tmp_path, student_ckpt, monkeypatch):
    """``make compare`` on a study whose file names an eval study: the student (three modes from one pass) and
    BM25 score the same generated queries, the report gains their table, the multi - single lines and a plot;
    ``--reuse-eval`` reports the newest results without evaluating again."""
    import yaml
    from torch.utils.tensorboard import SummaryWriter

    import dewey_lab.runs.compare as compare_module
    from dewey_lab.runs.compare import compare

    run = student_ckpt.parent.parent
    (run / "run_info.json").write_text("{}")
    spec = {"tasks": "passkey", "lengths": "64,128", "n_queries": 4, "n_docs": 6, "cache_dir": "", "progress": False,
            "mode": "single,single:mean,multi",
            "runs": [{"model": str(run), "label": "student"}, {"model": "bm25", "label": "BM25"}]}
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "st.yaml").write_text(f"# Question?\n# eval: {tmp_path / 'e.yaml'}\nsweep:\n  model.lr: [1]\n")
    writer = SummaryWriter(str(tmp_path / "runs" / "st" / "lr=1"))
    writer.add_scalar("train/loss", 1.0, 1)
    writer.close()
    (tmp_path / "runs" / "st" / "lr=1" / "run_info.json").write_text(json.dumps({"finished": True}))
    kwargs = {"runs_dir": str(tmp_path / "runs"), "out_dir": str(tmp_path / "results"), "study_file": str(tmp_path / "st.yaml")}
    report = compare("st", **kwargs).read_text()
    section_text = report[report.index("## After training"):]
    for row in ("| student: single |", "| student: single:mean |", "| student: multi |", "| BM25: bm25 |"):
        assert row in section_text
    assert "| student | multi − single |" in section_text and "| student | multi − single:mean |" in section_text
    assert (tmp_path / "results" / "st" / "eval-passkey.png").stat().st_size > 0
    payload = json.loads(next((tmp_path / "results" / "st" / "eval").rglob("*.json")).read_text())
    assert {r["mode"] for r in payload["rows"]} == {"single", "single:mean", "multi", "bm25"}

    monkeypatch.setattr(compare_module, "run_eval", lambda *a: pytest.fail("--reuse-eval evaluated again"))
    again = compare("st", evaluate=None, **kwargs).read_text()
    assert again[again.index("## After training"):] == section_text
    assert "## After training" not in compare("st", evaluate=False, **kwargs).read_text()
