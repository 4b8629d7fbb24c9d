"""Retrieval metrics over a (queries x documents) score matrix, with torchmetrics.

Ties are broken as trec_eval (and so pytrec_eval and MTEB) breaks them: higher score first, then
the *larger* document id (``strcmp`` order, descending). Scores are turned into tie-free ranks
before torchmetrics sees them, because torchmetrics would average tied gains (sklearn's rule) and
give a different nDCG whenever a model scores two documents the same (a truncated passkey
document, for one, scores exactly like every other).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics.retrieval import RetrievalNormalizedDCG, RetrievalRecall

METRICS = ("ndcg@1", "ndcg@10", "recall@10")


def trec_order(scores: Tensor, doc_ids: Sequence[str]) -> Tensor:
    """(Q, N) float "predictions" with no ties, ranking documents as trec_eval does.

    Entry [q, j] is N - rank of document j for query q (rank 0 = best), so sorting it descending
    reproduces trec_eval's order: score descending, then document id descending.
    """
    Q, N = scores.shape
    by_id = torch.tensor(sorted(range(N), key=lambda j: doc_ids[j], reverse=True), dtype=torch.long)  # (N,)
    # stable sort by score keeps the id order among equal scores
    order = by_id[torch.sort(scores[:, by_id], dim=1, descending=True, stable=True).indices]  # (Q, N)
    ranks = torch.arange(N, 0, -1, dtype=torch.float32).expand(Q, N)  # N, N-1, ..., 1
    return torch.zeros(Q, N).scatter_(1, order, ranks)


def relevance_matrix(qids: Sequence[str], doc_ids: Sequence[str], qrels: dict[str, dict[str, int]]) -> Tensor:
    """(Q, N) integer relevance from qrels; unjudged pairs are 0."""
    col = {d: j for j, d in enumerate(doc_ids)}
    target = torch.zeros(len(qids), len(doc_ids), dtype=torch.long)
    for i, q in enumerate(qids):
        for d, rel in qrels.get(q, {}).items():
            if d in col and rel > 0:
                target[i, col[d]] = int(rel)
    return target


def retrieval_metrics(scores: Tensor, qids: Sequence[str], doc_ids: Sequence[str],
                      qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    """nDCG@1 (= Acc@1 with one relevant document), nDCG@10 and Recall@10, mean over judged queries.

    Args:
        scores: (Q, N) similarity of query i to document j; higher is better.
        qids, doc_ids: row and column ids of ``scores``.
        qrels: qid -> {doc_id: relevance}; queries without a relevant document are skipped.
    """
    Q, N = scores.shape
    if Q == 0 or N == 0:
        raise ValueError("nothing to score: no queries or no documents")
    preds = trec_order(scores.float().cpu(), doc_ids)
    target = relevance_matrix(qids, doc_ids, qrels)
    metrics = {
        "ndcg@1": RetrievalNormalizedDCG(top_k=1, empty_target_action="skip"),
        "ndcg@10": RetrievalNormalizedDCG(top_k=10, empty_target_action="skip"),
        "recall@10": RetrievalRecall(top_k=10, empty_target_action="skip"),
    }
    indexes = torch.arange(Q).unsqueeze(1).expand(Q, N).flatten()
    out = {}
    for name, metric in metrics.items():
        # nDCG takes graded relevance as its gain; recall counts relevant documents (binary)
        t = target if name.startswith("ndcg") else target > 0
        metric.update(preds.flatten(), t.flatten(), indexes=indexes)
        out[name] = float(metric.compute())
    return out
