"""Semantic long-document retrieval: a module's one-line summary finds the module's text.

Both tasks read the evaluation-only documents (``dewey_lab.eval.tasks.heldout``: one document per
module of ``EVAL_PACKAGES``, text no training corpus holds). A query is a document's summary, the
first sentence of its module docstring, and that sentence is taken out of every document it came
from: what is left *describes* the subject in other words (function docstrings, parameters,
examples), so the match is one of meaning. Word overlap still helps (a summary's "PageRank" is in
the body), which is why BM25 runs beside every model; how much it helps is measured below.

- ``semantic/summary``: candidates are every document's body (its text without its summary),
  cut to ``max_tokens`` tokens of the evaluated tokenizer at whitespace, as ``deep/...`` cuts.
- ``semantic/concat``: ``n_docs`` candidates, each several unrelated bodies laid end to end
  (joined by blank lines) and cut to ``max_tokens``, so every candidate is about as long as every
  other and length says nothing. ``n_queries`` of them hold one answer: the body of the query's
  document, whole, placed third or later (at least ``N_LEAD`` whole bodies before it, and before it
  a share of the room drawn uniformly, so it sits anywhere from early to the end). The other
  bodies (fillers) never belong to a query's document and come from other families than the
  answer (``HeldoutDoc.family``: networkx.algorithms.flow and networkx.algorithms.core are
  different families); fillers are taken in a seeded cycle, each at most once per round of it (so
  reused only when ``n_docs`` candidates need more text than the fillers hold), never twice in one
  candidate.

Rules for a query: the summary has ``MIN_WORDS``-``MAX_WORDS`` words; its normalised text (one
space between words, case-insensitive; ``deep.normalise``) occurs in no document's body, and no
other document has the same summary; the document's body is not empty. In ``concat`` the answer's
body fits in half of ``max_tokens`` (so at least half of a candidate is other text). Query
documents are a seeded sample of those that qualify, each query on a different document
(``meta["documents"]``: qid -> document; concat adds ``meta["candidates"]``, ``meta["positions"]``
(0-based, >= 2) and ``meta["depths"]``, the tokens of the cut candidate before the answer).
``random.Random(f"semantic/{kind}/{seed}")`` fixes every choice.

Why module summaries: measured with BM25 on a first version of the text (top-level docstrings only,
50 queries, networkx 3.6.1), the module summary as query gave nDCG@10 76 on ``summary``; a
function's one-line summary against its module 87; the module summary with the module's
identifiers stripped 58 (but such a query reads oddly, and a score would then measure the
stripping). Module summaries are written to say what the whole text is about, and they already
leave BM25 well below its ceiling. What the defaults give is measured in ``make_semantic``'s
docstring.
"""

from __future__ import annotations

import bisect
import logging
import random
from typing import TYPE_CHECKING

from dewey_lab.eval.tasks.deep import cut_to_tokens, normalise
from dewey_lab.eval.tasks.heldout import EVAL_PACKAGES, HeldoutDoc, heldout_documents, package_versions
from dewey_lab.eval.tasks.task import RetrievalTask

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

KINDS = ("summary", "concat")
MIN_WORDS, MAX_WORDS = 4, 40
N_LEAD = 2  # whole bodies before the answer in a concat candidate, at least: the answer is third or later
_SEP = "\n\n"


def make_semantic(
    kind: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    n_queries: int = 50,
    n_docs: int = 100,
    max_tokens: int = 8192,
    seed: int = 0,
    packages: tuple[str, ...] = EVAL_PACKAGES,
) -> RetrievalTask:
    """A summary finds its document (rules in the module docstring).

    Measured with the all-MiniLM-L6-v2 tokenizer on networkx 3.6.1, 50 queries, ``max_tokens`` 8190
    (``--lengths 8k``), seed 0 (~1 s and ~4.5 s to build on 2 busy CPUs): ``summary`` has 266
    candidates (15 to 8,190 tokens, median 1,203; 6 cut) and 194 documents whose summary qualifies
    (queries of 4-22 words, median 7); ``concat`` has 100 candidates of 8,180-8,190 tokens (median 5
    documents each), 50 of them holding an answer at position 2-9 (0-based, median 2), 721-8,108
    tokens deep (median 4,508), 216 documents as fillers. nDCG@10 (``dewey-lab eval --lengths 8k``):
    BM25 73.4 on ``summary``, 65.7 on ``concat``; ranking by length alone 0.0 and 2.0; the teacher
    (all-MiniLM-L6-v2, PCW over 256-token windows) 74.5 single / 75.8 multi on ``summary``, 24.4 single
    / 69.7 multi on ``concat``: one vector of 8k tokens of mostly unrelated text loses the answer.

    Args:
        kind: ``summary`` (candidates are the documents) or ``concat`` (candidates are several
            unrelated documents laid end to end, the answer third or later).
        tokenizer: The evaluated model's fast tokenizer; lengths are in its tokens.
        n_queries: Queries wanted, each on a different document (fewer, with a warning, when not
            enough documents qualify).
        n_docs: ``concat`` only: candidates (``n_queries`` of them hold an answer).
        max_tokens: Every candidate is cut to at most this many tokens (no special tokens).
        seed: Seed; with ``kind`` it fixes the query documents and every concatenation.
        packages: The evaluation-only packages read (default ``EVAL_PACKAGES``).

    Returns:
        A validated ``RetrievalTask`` named ``semantic/<kind>`` with metric ``ndcg@10``.
    """
    if kind not in KINDS:
        raise ValueError(f"semantic: unknown task {kind!r}; choose one of {', '.join(KINDS)}")
    name = f"semantic/{kind}"
    if n_queries < 1:
        raise ValueError(f"{name}: n_queries must be >= 1, got {n_queries}")
    if kind == "concat" and n_docs < n_queries:
        raise ValueError(f"{name}: n_docs={n_docs} < n_queries={n_queries}; each query needs its own "
                         "candidate, so raise n_docs or lower n_queries")
    if max_tokens < 64:
        raise ValueError(f"{name}: max_tokens must be >= 64, got {max_tokens}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{name}: needs a fast tokenizer (character offsets); load it with use_fast=True")

    docs = {d: doc for d, doc in heldout_documents(tuple(packages)).items() if doc.body}
    bodies, _ = cut_to_tokens(tokenizer, {d: doc.body for d, doc in docs.items()}, max_tokens)
    usable = _query_documents(docs)
    rng = random.Random(f"semantic/{kind}/{seed}")
    meta: dict = {"source": "heldout", "packages": package_versions(tuple(packages)), "seed": seed,
                  "max_tokens": max_tokens, "tokenizer": getattr(tokenizer, "name_or_path", None),
                  "n_qualifying": len(usable)}
    if kind == "summary":
        picked = rng.sample(usable, min(n_queries, len(usable)))
        corpus = bodies
        meta["n_cut"] = sum(bodies[d] != docs[d].body for d in docs)
    else:
        counts = dict(zip(bodies, _token_counts(tokenizer, list(bodies.values())), strict=True))
        fits = [d for d in usable if bodies[d] == docs[d].body and counts[d] <= max_tokens // 2]
        meta["n_qualifying"] = len(fits)
        picked = rng.sample(fits, min(n_queries, len(fits)))
        corpus, where, parts, n_fillers = _concatenate(tokenizer, docs, bodies, counts, picked, n_docs, max_tokens,
                                                       rng)
        picked = [d for d in picked if d in where]  # an answer too long for its room after all is left out
        meta.update(candidates={f"q{i}": where[d][0] for i, d in enumerate(picked)},
                    positions={f"q{i}": where[d][1] for i, d in enumerate(picked)},
                    depths={f"q{i}": where[d][2] for i, d in enumerate(picked)}, parts=parts, n_fillers=n_fillers)
    if not picked:
        raise ValueError(f"{name}: no document qualifies at max_tokens {max_tokens}; raise max_tokens "
                         "(the longest --lengths)")
    if len(picked) < n_queries:
        log.warning("%s: only %d of %d queries could be made (max_tokens %d)", name, len(picked), n_queries,
                    max_tokens)
    queries = {f"q{i}": docs[d].summary for i, d in enumerate(picked)}
    if kind == "summary":
        qrels = {f"q{i}": {d: 1} for i, d in enumerate(picked)}
    else:
        qrels = {qid: {cand: 1} for qid, cand in meta["candidates"].items()}
    meta.update(documents={f"q{i}": d for i, d in enumerate(picked)}, n_docs=len(corpus), n_queries=len(queries))
    return RetrievalTask(name=name, corpus=corpus, queries=queries, qrels=qrels, metric="ndcg@10", length=None,
                         meta=meta).validate()


def _query_documents(docs: dict[str, HeldoutDoc]) -> list[str]:
    """Documents whose summary can be a query, in document order."""
    lowered = [normalise(doc.body).lower() for doc in docs.values()]
    by_summary: dict[str, list[str]] = {}
    for d, doc in docs.items():
        if doc.summary and MIN_WORDS <= len(doc.summary.split()) <= MAX_WORDS:
            by_summary.setdefault(normalise(doc.summary).lower(), []).append(d)
    blob = "\n".join(lowered)  # a summary in any body (its own or another's) would be found by matching
    return sorted((ds[0] for s, ds in by_summary.items() if len(ds) == 1 and s not in blob),
                  key=list(docs).index)


def _concatenate(
    tokenizer: PreTrainedTokenizerBase,
    docs: dict[str, HeldoutDoc],
    bodies: dict[str, str],
    counts: dict[str, int],
    answers: list[str],
    n_docs: int,
    max_tokens: int,
    rng: random.Random,
) -> tuple[dict[str, str], dict[str, tuple[str, int, int]], dict[str, list[str]], int]:
    """``n_docs`` candidates, one per answer (answer at position >= N_LEAD) and the rest fillers only.

    Returns the corpus (candidate id -> text, cut), {answer: (candidate id, position, depth in
    tokens)}, {candidate id: the document ids it joins, in order (the cut ends the last one)} and the
    number of fillers.
    """
    queried = set(answers)
    fillers = [d for d in bodies if d not in queried]  # never a query's document: one relevant candidate each
    rng.shuffle(fillers)
    sep = max(0, _token_counts(tokenizer, ["a" + _SEP + "a"])[0] - 2)  # tokens the separator adds (WordPiece: 0)
    cursor = 0

    def take(family: str | None, room: int, taken: list[str]) -> str | None:
        """The next filler in the cycle of another family that fits in ``room`` tokens, not yet taken."""
        nonlocal cursor
        for step in range(len(fillers)):
            d = fillers[(cursor + step) % len(fillers)]
            if d not in taken and docs[d].family != family and counts[d] + sep <= room:
                cursor = (cursor + step + 1) % len(fillers)
                return d
        return None

    plans: list[tuple[list[str], str | None]] = []
    for answer in answers:
        room = max_tokens - counts[answer] - 16  # slack: a join may tokenize a little longer than its parts
        target = rng.uniform(0, room)
        lead: list[str] = []
        used = 0
        while len(lead) < N_LEAD or used < target:
            d = take(docs[answer].family, room - used, lead)
            if d is None:
                break
            lead.append(d)
            used += counts[d] + sep
        if len(lead) >= N_LEAD:
            plans.append((lead + [answer] + _fill(take, docs[answer].family, max_tokens - used - counts[answer],
                                                  [*lead, answer], counts, sep), answer))
    while len(plans) < n_docs:
        plans.append((_fill(take, None, max_tokens, [], counts, sep), None))
    order = list(range(len(plans)))
    rng.shuffle(order)  # answers are not the first candidates (trec_eval breaks ties by document id)
    corpus: dict[str, str] = {}
    joined: dict[str, list[str]] = {}
    where: dict[str, tuple[str, int, int]] = {}
    width = len(str(len(plans) - 1))
    for k, j in enumerate(order):
        parts, answer = plans[j]
        cid = f"c{k:0{width}d}"
        corpus[cid], joined[cid] = _SEP.join(bodies[d] for d in parts), parts
        if answer is not None:
            where[answer] = (cid, parts.index(answer), 0)
    cut, starts = cut_to_tokens(tokenizer, corpus, max_tokens)
    for answer, (cid, position, _) in list(where.items()):
        begin = sum(len(bodies[d]) + len(_SEP) for d in joined[cid][:position])  # where the answer starts
        if len(cut[cid]) < begin + len(bodies[answer]):  # the cut reached into the answer: leave it out
            del where[answer]
        else:
            where[answer] = (cid, position, bisect.bisect_left(starts[cid], begin))
    return cut, where, joined, len(fillers)


def _fill(take, family: str | None, room: int, taken: list[str], counts: dict[str, int], sep: int) -> list[str]:
    """Fillers after ``taken`` until ``room`` tokens are used; the last one may run past (the cut ends it)."""
    out: list[str] = []
    while room > 0:
        d = take(family, 10**9, [*taken, *out])  # any length: the candidate is cut at max_tokens
        if d is None:
            break
        out.append(d)
        room -= counts[d] + sep
    return out


def _token_counts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[int]:
    enc = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False,
                    verbose=False)
    return [len(ids) for ids in enc["input_ids"]]
