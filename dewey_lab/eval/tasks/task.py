"""RetrievalTask: one corpus, its queries and relevance judgements, and the score that counts.

Every loader (LongEmbed from the hub or a local folder, LoCoV1, the passkey / needle generators)
returns these, and every retriever (dense single- or multi-vector, BM25) scores them the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAIN_METRICS = ("ndcg@1", "ndcg@10")


@dataclass
class RetrievalTask:
    """A retrieval task, in the BEIR / MTEB shape.

    ``name`` is what reports print (``passkey``, ``narrativeqa``, ``loco/qmsum``); ``length`` is the
    target document length in tokens for the synthetic tasks (None for real ones); ``metric`` is the
    main score: ``ndcg@1`` (= Acc@1 with one relevant document) for passkey / needle, ``ndcg@10``
    for the real tasks, as in LongEmbed and MTEB.
    """

    name: str
    corpus: dict[str, str]  # doc_id -> text, in file order
    queries: dict[str, str]  # qid -> text
    qrels: dict[str, dict[str, int]]  # qid -> {doc_id: relevance > 0}
    metric: str = "ndcg@10"
    length: int | None = None
    meta: dict = field(default_factory=dict)  # provenance: source, revision, seed, ...

    @property
    def label(self) -> str:
        """``passkey@1024`` for a synthetic task at one length, else the name."""
        return self.name if self.length is None else f"{self.name}@{self.length}"

    def validate(self) -> RetrievalTask:
        """Check the three parts agree; one-line ValueError naming what is wrong otherwise."""
        if self.metric not in MAIN_METRICS:
            raise ValueError(f"{self.label}: metric must be one of {', '.join(MAIN_METRICS)}, got {self.metric!r}")
        if not self.corpus or not self.queries:
            raise ValueError(f"{self.label}: empty {'corpus' if not self.corpus else 'queries'}; "
                             "check the source folder or the split names")
        judged = [q for q in self.queries if self.qrels.get(q)]
        if not judged:
            raise ValueError(f"{self.label}: no query has a relevant document in qrels; check the qrels file")
        for qid, rels in self.qrels.items():
            if qid not in self.queries:
                raise ValueError(f"{self.label}: qrels name query {qid!r}, which is not in queries")
            missing = [d for d in rels if d not in self.corpus]
            if missing:
                raise ValueError(f"{self.label}: qrels for query {qid!r} name document {missing[0]!r}, "
                                 "which is not in the corpus")
        return self

    def judged_queries(self) -> dict[str, str]:
        """Queries with at least one relevant document (MTEB and trec_eval score only these)."""
        return {q: t for q, t in self.queries.items() if any(r > 0 for r in self.qrels.get(q, {}).values())}

    def warnings(self) -> dict[str, int]:
        """Counted oddities a score should be read with: what loading repaired (``meta["warnings"]``:
        non-UTF-8 lines, exact duplicate rows) and texts no lexical retriever can match (BM25 scores
        them 0; a dense model still embeds them). Zero counts are left out."""
        judged = self.judged_queries().values()
        out = {**self.meta.get("warnings", {}),
               "empty_queries": sum(not q.strip() for q in judged),
               "queries_without_words": sum(bool(q.strip()) and not _WORD.search(q) for q in judged),
               "passages_without_words": sum(not _WORD.search(p) for p in self.corpus.values())}
        return {k: v for k, v in out.items() if v}


_WORD = re.compile(r"\w\w")  # bm25s's token pattern is two or more word characters
