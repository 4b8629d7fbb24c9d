"""The control retrievers (``dewey_lab.eval.controls``) against hand-computed scores, the lexical marking of a
study's report, and ``dewey-lab eval --model length / bow`` end to end."""

import json

import numpy as np
import pytest
import torch

from dewey_lab.cli import main
from dewey_lab.eval.controls import BagOfWordsRetriever, LengthRetriever
from dewey_lab.eval.metrics import retrieval_metrics, trec_order
from dewey_lab.eval.tasks.task import RetrievalTask
from dewey_lab.runs.study_eval import LEXICAL_MARK, lexical_cells, references, section


def _task(corpus: dict[str, str], queries: dict[str, str], qrels: dict[str, dict[str, int]]) -> RetrievalTask:
    return RetrievalTask("hand", corpus, queries, qrels).validate()


def test_length_ranks_by_token_count_longest_first(tokenizer):
    """Word counts 3, 1, 2, 2 (each word one WordPiece token): scores are those counts for every query, the tie
    falls to the larger id (trec_eval), so the ranking is a, d, c, b; the relevant c is third."""
    corpus = {"a": "one two three", "b": "one", "c": "cat dog", "d": "dog cat"}
    assert [len(tokenizer.tokenize(t)) for t in corpus.values()] == [3, 1, 2, 2]  # the hand count holds
    task = _task(corpus, {"q1": "anything at all", "q2": "cat"}, {"q1": {"c": 1}, "q2": {"c": 1}})
    scores = LengthRetriever(tokenizer).score(task)
    assert list(scores) == ["length"]
    assert scores["length"].tolist() == [[3.0, 1.0, 2.0, 2.0]] * 2  # queries are not read
    order = trec_order(scores["length"], list(corpus)).argsort(dim=1, descending=True)
    assert [[list(corpus)[j] for j in row] for row in order.tolist()] == [["a", "d", "c", "b"]] * 2
    m = retrieval_metrics(scores["length"], ["q1", "q2"], list(corpus), task.qrels)
    assert m["ndcg@1"] == 0 and m["ndcg@10"] == pytest.approx(1 / np.log2(4))  # rank 3: 1 / log2(3 + 1)


def _reference_table(vocab_size: int, dim: int = 256, seed: int = 0) -> np.ndarray:
    """The table as the module docstring defines it, drawn here on its own."""
    return torch.randn(vocab_size, dim, generator=torch.Generator().manual_seed(seed)).numpy().astype(np.float64)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_bag_of_words_is_the_cosine_of_mean_table_rows(tokenizer):
    """Two passages: single = cosine of the means of their token rows; multi (windows of 2 tokens, overlap 1) =
    the best window's cosine, windows laid out by hand: 4 tokens -> [0, 2), [1, 3), [2, 4); 1 token -> [0, 1)."""
    corpus = {"p1": "one two three four", "p2": "dog"}
    query = "dog and cat"
    words = {t: tokenizer.tokenize(t) for t in [*corpus.values(), query]}
    assert words == {"one two three four": ["one", "two", "three", "four"], "dog": ["dog"],
                     "dog and cat": ["dog", "and", "cat"]}  # one WordPiece token per word, no specials
    table = _reference_table(len(tokenizer))
    row = {w: table[tokenizer.convert_tokens_to_ids(w)] for ws in words.values() for w in ws}
    q = np.mean([row[w] for w in words[query]], axis=0)
    p1, p2 = [np.mean([row[w] for w in words[t]], axis=0) for t in corpus.values()]
    one = ["one", "two", "three", "four"]
    windows = [np.mean([row[w] for w in one[s:e]], axis=0) for s, e in [(0, 2), (1, 3), (2, 4)]]
    task = _task(corpus, {"q": query}, {"q": {"p2": 1}})
    bow = BagOfWordsRetriever(("single", "multi"), tokenizer, chunk_size=2, chunk_overlap=1)
    scores = bow.score(task)
    np.testing.assert_allclose(scores["single"].numpy(), [[_cos(q, p1), _cos(q, p2)]], atol=1e-5)
    np.testing.assert_allclose(scores["multi"].numpy(), [[max(_cos(q, w) for w in windows), _cos(q, p2)]], atol=1e-5)
    assert scores["single"][0, 1] > 0.5 > abs(scores["single"][0, 0])  # a shared token against none
    assert torch.equal(BagOfWordsRetriever(("single",), tokenizer).score(task)["single"], scores["single"])
    assert not torch.allclose(BagOfWordsRetriever(("single",), tokenizer, seed=1).score(task)["single"],
                              scores["single"])  # the seed is the table
    assert bow.truncated == 0 and "seed 0" in bow.pooling_of("multi")["passage_pooling"]


def test_bag_of_words_empty_texts(tokenizer):
    """An empty passage scores 0 (single: a zero vector) or -inf (multi: no chunk, as a dense model's); an empty
    query scores 0 everywhere; a passage that is the query's one token scores 1."""
    task = _task({"a": "", "b": "dog"}, {"q": "dog", "e": ""}, {"q": {"b": 1}, "e": {"b": 1}})
    scores = BagOfWordsRetriever(("single", "multi"), tokenizer).score(task)
    np.testing.assert_allclose(scores["single"].numpy(), [[0, 1], [0, 0]], atol=1e-6)
    np.testing.assert_allclose(scores["multi"].numpy(), [[-np.inf, 1], [-np.inf, 0]], atol=1e-6)


def test_bag_of_words_refuses_other_modes(tokenizer):
    with pytest.raises(ValueError, match="single .* and multi"):
        BagOfWordsRetriever(("single:mean",), tokenizer)


def _row(model, mode, task, length, main):
    return {"model": model, "mode": mode, "task": task, "length": length, "main": main, "truncated": 0,
            "extension": "none"}


def test_lexical_marks_where_bow_is_within_ten_points_of_the_best_model(tmp_path):
    """passkey@1k: bow 86 against the best model mode 95 (9 points: lexical), BM25's 100 is no model; passkey@2k:
    bow 60 against 90 (30 below: not), the length prior's 65 is no model; deep/pydoc: exactly 10 points (lexical)."""
    rows = [_row("s", "single", "passkey", 1024, 0.90), _row("s", "multi", "passkey", 1024, 0.95),
            _row("BM25", "bm25", "passkey", 1024, 1.0), _row("bag-of-words", "single", "passkey", 1024, 0.86),
            _row("bag-of-words", "multi", "passkey", 1024, 0.70), _row("length prior", "length", "passkey", 1024, 0.01),
            _row("s", "single", "passkey", 2048, 0.90), _row("s", "multi", "passkey", 2048, 0.50),
            _row("BM25", "bm25", "passkey", 2048, 1.0), _row("bag-of-words", "single", "passkey", 2048, 0.60),
            _row("bag-of-words", "multi", "passkey", 2048, 0.55), _row("length prior", "length", "passkey", 2048, 0.65),
            _row("s", "single", "deep/pydoc", None, 0.70), _row("bag-of-words", "single", "deep/pydoc", None, 0.60)]
    runs = [{"model": str(tmp_path / "v"), "label": "s"}, {"model": "bm25", "label": "BM25"},
            {"model": "length", "label": "length prior"}, {"model": "bow", "label": "bag-of-words"}]
    payload = {"rows": rows, "summary": {}, "settings": {"runs": runs}}
    assert lexical_cells(payload) == {("passkey", 1024), ("deep/pydoc", None)}
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "run_info.json").write_text("{}")  # a run directory: the one student
    assert references(payload) == {"BM25", "length prior", "bag-of-words"}
    lines = section(payload, tmp_path / "e.yaml", [])
    head = next(ln for ln in lines if ln.startswith("| run: mode")).split(" | ")
    assert head[1:3] == [f"passkey@1k{LEXICAL_MARK}", "passkey@2k"] and head[-1] == f"deep/pydoc nDCG@10{LEXICAL_MARK} |"
    assert any(ln.startswith(f"{LEXICAL_MARK} lexical: the bag-of-words control") for ln in lines)
    no_bow = {**payload, "settings": {"runs": runs[:3]}, "rows": [r for r in rows if r["model"] != "bag-of-words"]}
    assert lexical_cells(no_bow) == set() and not any(LEXICAL_MARK in ln for ln in section(no_bow, tmp_path, []))


def _eval(tmp_path, *args) -> dict:
    out = tmp_path / "results"
    main(["eval", "--out_dir", str(out), "--cache_dir", "", "--progress", "false", "--tasks", "passkey",
          "--lengths", "128", "--n_queries", "4", "--n_docs", "8", *args])
    files = sorted(out.rglob("*.json"))
    assert len(files) == 1 and files[0].with_suffix(".md").exists()
    return json.loads(files[0].read_text())


@pytest.mark.parametrize(("model", "modes"), [("length", ["length"]), ("bow", ["single", "multi"])])
def test_controls_run_end_to_end(tmp_path, model, modes):
    payload = _eval(tmp_path, "--model", model, "--mode", "both")
    assert payload["model"] == model and [r["mode"] for r in payload["rows"]] == modes
    for r in payload["rows"]:
        assert r["length"] == 128 and r["truncated"] == 0 and r["n_docs"] == 8 and 0 <= r["main"] <= 1
        assert sum(r["per_query"]) / 4 == pytest.approx(r["main"], abs=1e-6) and r["passage_pooling"]


def test_controls_in_a_study_are_references(tmp_path):
    runs = json.dumps([{"model": "bm25"}, {"model": "length", "label": "length prior"},
                       {"model": "bow", "mode": "both", "label": "bag-of-words"}])
    payload = _eval(tmp_path, "--runs", runs)
    assert list(dict.fromkeys((r["model"], r["mode"]) for r in payload["rows"])) == [
        ("bm25", "bm25"), ("length prior", "length"), ("bag-of-words", "single"), ("bag-of-words", "multi")]
    assert references(payload) == {"bm25", "length prior", "bag-of-words"}


@pytest.mark.parametrize("args", [["--model", "length", "--extension", "pcw"], ["--model", "bow", "--extension", "pcw"],
                                  ["--model", "bow", "--mode", "single:mean"]])
def test_controls_refuse_what_they_cannot_do(tmp_path, capsys, args):
    out = tmp_path / "results"
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--out_dir", str(out), "--cache_dir", "", "--progress", "false", "--tasks", "passkey", *args])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and ("takes no --extension" in err[0] if "--extension" in args else "use --mode" in err[0])
    assert not out.exists() or not any(out.rglob("*.json"))
