"""dewey-lab export --multi-vector: a stock MultiVectorEncoder that scores exactly as dewey-lab eval --mode multi.

The reference is the eval itself: ``prepare`` builds the DenseRetriever ``dewey-lab eval --model <ckpt> --mode
multi`` scores with (late chunks, best chunk, queries chunk-pooled), and the export, loaded with the standard
sentence-transformers API, must give the same (Q, N) scores and nDCG on generated passkey tasks. The chunk
spans are checked against windows laid out here from the tokenizer's offsets, not by dewey_lab's code.
"""

import json

import pytest
import torch

CHUNK, OVERLAP = 32, 8  # several chunks per passkey document at 128 / 256 tokens
PROMPTS = ["--query-prompt", "query: ", "--passage-prompt", "passage: "]


@pytest.fixture(scope="module")
def exported(student_ckpt, tmp_path_factory):
    from dewey_lab.cli import main

    out = tmp_path_factory.mktemp("export") / "tiny-multi"
    main(["export", "--ckpt", str(student_ckpt), "--out", str(out), "--multi-vector", "--chunk-size", str(CHUNK),
          "--chunk-overlap", str(OVERLAP), *PROMPTS])
    return out


@pytest.fixture(scope="module")
def model(exported):
    from sentence_transformers import MultiVectorEncoder

    return MultiVectorEncoder(str(exported), device="cpu", trust_remote_code=True)  # dewey_lab is installed


def test_scores_and_ndcg_equal_dewey_lab_eval_multi(model, student_ckpt):
    from dewey_lab.eval.metrics import retrieval_metrics
    from dewey_lab.eval.run import evaluate, parser, prepare

    args = parser().parse_args(["--model", str(student_ckpt), "--tasks", "passkey", "--lengths", "128,256",
                                "--n_queries", "4", "--n_docs", "8", "--mode", "multi", "--chunk_size", str(CHUNK),
                                "--chunk_overlap", str(OVERLAP), *PROMPTS, "--cache_dir", "", "--progress", "false",
                                "--device", "cpu", "--dtype", "float32"])
    [(_, retriever, _)], tasks = prepare(args)  # what dewey-lab eval runs
    rows = evaluate(retriever, tasks)
    for task, row in zip(tasks, rows):
        qids, doc_ids = list(task.judged_queries()), list(task.corpus)
        q = model.encode_query([task.queries[i] for i in qids])  # [(1, D)]
        d = model.encode_document([task.corpus[i] for i in doc_ids])  # [(M_i, D)]
        assert all(v.shape == (1, 384) for v in q) and min(len(v) for v in d) > 2  # one query vector, late chunks
        ours = model.similarity(q, d).cpu()  # MaxSim over a one-vector query
        by_hand = torch.tensor([[float((c @ v[0]).max()) for c in d] for v in q])  # max over chunks of q . chunk
        theirs = retriever.score(task)["multi"]
        assert torch.allclose(ours, theirs, atol=1e-5) and torch.allclose(by_hand, theirs, atol=1e-5)
        m = retrieval_metrics(ours, qids, doc_ids, task.qrels)
        assert row["mode"] == "multi" and row["query_pooling"].startswith("chunk")
        assert m["ndcg@10"] == pytest.approx(row["ndcg@10"], abs=1e-5)
        assert m[task.metric] == pytest.approx(row["main"], abs=1e-5)


def _windows(tokenizer, text: str, prompt: str) -> list[tuple[int, int]]:
    """Late-chunk windows written out from the definition: the text's tokens (offsets past the prompt, no
    special token) in CHUNK-token windows every CHUNK - OVERLAP, the last one ending at the text's end."""
    enc = tokenizer(prompt + text, return_offsets_mapping=True, return_special_tokens_mask=True)
    text_tokens = [i for i, (sp, (a, b)) in enumerate(zip(enc["special_tokens_mask"], enc["offset_mapping"]))
                   if not sp and a >= len(prompt) and b > a]
    first, end = text_tokens[0], text_tokens[-1] + 1
    starts = range(first, end - CHUNK, CHUNK - OVERLAP)  # the windows that end before the text does
    return [(s, s + CHUNK) for s in starts] + [(max(first, end - CHUNK), end)]


def test_chunk_spans_are_the_late_chunk_windows(model, tokenizer):
    texts = ["A short passage.", "The grass is green. The sky is blue. " * 9 + "Ana's pass key is 52817.",
             "word " * (3 * CHUNK)]
    out = model.encode_document(texts, output_value=None)
    vectors = model.encode_document(texts)
    for text, o, v in zip(texts, out, vectors):
        spans = [tuple(s) for s in o["chunk_spans"][o["attention_mask"]].tolist()]
        assert spans == _windows(tokenizer, text, "passage: ") and len(v) == len(spans)
    assert len(vectors[0]) == 1 and len(vectors[1]) > 3
    q = model.encode_query(texts[:1], output_value=None)[0]  # a query's span: its run of text tokens
    ids = tokenizer("query: " + texts[0])["input_ids"]
    assert q["chunk_spans"][q["attention_mask"]].tolist() == [[3, len(ids) - 1]]  # [CLS] query : | text | [SEP]


def test_export_records_how_it_scores(exported, model):
    record = json.loads((exported / "dewey_lab.json").read_text())
    assert record["exact_in_sentence_transformers"] is True  # measured on probe queries and chunks
    assert record["multi_vector"]["chunk_size"] == CHUNK and record["multi_vector"]["chunk_overlap"] == OVERLAP
    modules = [m["type"] for m in json.loads((exported / "modules.json").read_text())]
    assert [m.rsplit(".", 1)[-1] for m in modules] == ["Transformer", "LateChunkPooling", "Dense", "Normalize"]
    assert modules[1] == "dewey_lab.st_modules.LateChunkPooling"
    assert model.prompts["query"] == "query: " and model.similarity_fn_name == "maxsim"
    assert "MultiVectorEncoder" in (exported / "README.md").read_text()


def test_multi_vector_refuses_a_pooling_in_one_line(student_ckpt, tmp_path, capsys):
    from dewey_lab.cli import main

    with pytest.raises(SystemExit):
        main(["export", "--ckpt", str(student_ckpt), "--out", str(tmp_path / "x"), "--multi-vector", "--pooling", "cls"])
    assert "drop one of them" in capsys.readouterr().err
