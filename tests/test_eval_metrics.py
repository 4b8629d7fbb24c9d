"""Our retrieval metrics against pytrec_eval (trec_eval's C code, what MTEB scores with)."""

import pytest
import torch

from dewey_lab.eval.metrics import retrieval_metrics, trec_order

pytrec_eval = pytest.importorskip("pytrec_eval")

TREC = {"ndcg@1": "ndcg_cut_1", "ndcg@10": "ndcg_cut_10", "recall@10": "recall_10"}


def reference(scores, qids, doc_ids, qrels):
    run = {q: {d: float(scores[i, j]) for j, d in enumerate(doc_ids)} for i, q in enumerate(qids)}
    judged = {q: r for q, r in qrels.items() if any(v > 0 for v in r.values())}
    ev = pytrec_eval.RelevanceEvaluator(judged, set(TREC.values()))
    per_query = ev.evaluate({q: run[q] for q in judged})
    return {ours: sum(m[theirs] for m in per_query.values()) / len(per_query) for ours, theirs in TREC.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("graded", [False, True])
def test_metrics_match_pytrec_eval_with_ties(seed, graded):
    g = torch.Generator().manual_seed(seed)
    Q, N = 40, 60
    # scores on a coarse grid: many exact ties, across and within the top 10
    scores = torch.randint(0, 6, (Q, N), generator=g).float() / 5
    doc_ids = [f"d{int(x)}" for x in torch.randperm(1000, generator=g)[:N]]  # id order != column order
    qids = [f"q{i}" for i in range(Q)]
    qrels = {}
    for i, q in enumerate(qids[:-3]):  # the last three queries have no judgement and are skipped
        rel = torch.randperm(N, generator=g)[: 1 + i % 4]
        qrels[q] = {doc_ids[int(j)]: (1 + int(torch.randint(0, 3, (1,), generator=g)) if graded else 1) for j in rel}
    ours = retrieval_metrics(scores, qids, doc_ids, qrels)
    theirs = reference(scores, qids, doc_ids, qrels)
    for k in TREC:
        assert ours[k] == pytest.approx(theirs[k], abs=1e-6), k


def test_tie_break_is_larger_doc_id_first():
    scores = torch.tensor([[0.5, 0.5, 0.9, 0.5]])
    preds = trec_order(scores, ["b", "c", "a", "a2"])
    order = preds[0].argsort(descending=True).tolist()
    assert order == [2, 1, 0, 3]  # 0.9 first, then ties by id descending: c, b, a2


def test_perfect_and_worst_ranking():
    scores = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    qrels = {"q0": {"x": 1}, "q1": {"x": 1}}
    m = retrieval_metrics(scores, ["q0", "q1"], ["x", "y", "z"], qrels)
    assert m["ndcg@1"] == pytest.approx(0.5)  # q0 right at rank 1, q1 has it last
    assert m["ndcg@10"] == pytest.approx((1 + 1 / 2) / 2)  # q1: rank 3 -> 1/log2(4)
