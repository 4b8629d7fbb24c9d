"""Retrievers: a RetrievalTask in, one (queries x documents) score matrix per scoring mode out.

* ``DenseRetriever``: an Embedder's vectors, cosine scores. Mode ``single`` scores the passage
  vector; mode ``multi`` scores a passage as its best chunk against the query pooled by
  ``query_pooling`` (default ``chunk``: the chunk head over the query's text tokens, i.e. the query's
  mean, as dewey_en_beta scores ``max_c(q_mean . chunk_c)``: query and chunks pooled the same way);
  ``multi:<pooling>`` scores the same chunks against queries pooled by another head (``multi:cls``:
  the trained CLS, this project's rule before 2026-12); mode ``single:<pooling>`` scores the passage
  vector of another whole-text head (``mean`` beside a trained ``cls``), queries pooled by that head
  too. All come from one forward pass per passage; ``pooling_of(mode)`` says how each side was pooled.
  Passage vectors are written to an embedding cache (the teacher cache's SQLite store,
  keyed by model + settings + text) block by block, so a killed evaluation resumes where it stopped
  and a rerun costs no forward pass; scores are accumulated block by block, so memory holds one
  block of vectors, not the corpus.
* ``BM25Retriever``: bm25s over the same texts, untruncated (LongEmbed appendix D's baseline).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from dewey_lab.data.store.vectors import VectorStore, cache_key
from dewey_lab.eval.embedder import QUERY_AS_CHUNK, Embedder, Encoded, Item
from dewey_lab.eval.tasks.task import RetrievalTask
from dewey_lab.model.pooling import PoolingHead

log = logging.getLogger(__name__)

MODES = ("single", "multi")
"""The plain modes; ``single:<pooling>`` (a ``PoolingHead.choices()`` name) adds another whole-text head,
``multi:<query pooling>`` the late chunks against queries pooled another way."""


def check_modes(modes: Sequence[str]) -> tuple[str, ...]:
    """The modes, deduplicated; a one-line error for an unknown one (heads are checked by the embedder)."""
    modes = tuple(dict.fromkeys(modes))
    bad = [m for m in modes if m not in MODES and not m.startswith(("single:", "multi:"))]
    if bad or not modes:
        raise ValueError(f"unknown scoring mode {bad[0] if bad else ''!r}; use single, multi, single:<pooling> "
                         f"or multi:<query pooling> with <pooling> one of {', '.join(PoolingHead.choices())} "
                         "(multi:chunk is multi's default)")
    return modes


def best_chunk(sims: Tensor, owner: Tensor, n_passages: int) -> Tensor:
    """(Q, N) each passage's best chunk score from (Q, M) query-chunk scores, chunk m belonging to passage
    ``owner[m]``; -inf for a passage without a chunk. The multi-vector rule of every retriever here."""
    out = torch.full((sims.shape[0], n_passages), float("-inf"))
    if sims.shape[1]:
        out.scatter_reduce_(1, owner.expand(sims.shape[0], -1), sims, reduce="amax")
    return out


class DenseRetriever:
    """Score tasks with an Embedder, single- and / or multi-vector.

    Args:
        embedder: the model wrapper (pooling, prompts, window, chunking).
        modes: any of ``single`` (the embedder's own whole-text head), ``multi`` (best late chunk, queries
            pooled by ``query_pooling``), ``multi:<query pooling>`` (the same chunks, queries pooled by that
            head) and ``single:<pooling>``, ``<pooling>`` one of ``PoolingHead.choices()``: queries and
            passages pooled by that head from the same forward pass (``single:cls`` on a model whose head is
            ``cls`` is ``single``; a head with weights the model did not train is refused).
        query_pooling: how mode ``multi`` pools queries: ``chunk`` (the chunk head over the query's text
            tokens: Dewey's mean query) or a whole-text head's name (``Embedder.query_head``).
        cache_dir: embedding cache directory; None computes everything every time.
        block: passages per cache transaction and scoring step.
        progress: show tqdm bars.
    """

    def __init__(self, embedder: Embedder, modes: Sequence[str] = MODES, cache_dir: str | None = None,
                 block: int = 256, progress: bool = True, query_pooling: str = QUERY_AS_CHUNK) -> None:
        modes = check_modes(modes)
        self.embedder, self.modes, self.block, self.progress = embedder, modes, block, progress
        # multi modes -> the head that pools their queries (the embedder's own head: mode single's vectors)
        self.query_heads = {m: embedder.query_head(m.partition(":")[2] or query_pooling,
                                                   where="query_pooling" if m == "multi" else "mode multi:<pooling>")
                            for m in modes if m.split(":")[0] == "multi"}
        # single:<pooling> -> its head; the embedder's own head is mode single's vectors, not a second copy
        heads = {m: embedder.extra_head(m.removeprefix("single:"), where="mode single:<pooling>")
                 for m in modes if m.startswith("single:")}
        self.extra = {m: h for m, h in heads.items() if h is not embedder.whole_head}
        # one store per model: vector sizes differ between models, and a store holds one size
        model_dir = hashlib.sha256(embedder.fingerprint.encode()).hexdigest()[:16]
        self.cache = VectorStore(Path(cache_dir) / model_dir) if cache_dir else None
        self.truncated = 0  # passages cut at the window in the last score() call

    @property
    def name(self) -> str:
        return self.embedder.name

    def pooling_of(self, mode: str) -> dict[str, str]:
        """{"query_pooling", "passage_pooling"}: how mode ``mode`` pooled each side, for every result row."""
        e = self.embedder
        if mode in self.query_heads:
            chunks = f"late chunks {e.chunk_size}/{e.chunk_overlap} by {type(e.chunk_head).__name__}, best chunk"
            return {"query_pooling": self.query_heads[mode].describe(), "passage_pooling": chunks}
        head = self.extra.get(mode, e.whole_head)
        name = f"{head.describe()}" + (f" over {e.mean_over} tokens" if "mean" in head.describe() else "")
        return {"query_pooling": name, "passage_pooling": name}

    def _fp(self, kind: str) -> str:
        return f"{self.embedder.fingerprint}|{self.embedder.fingerprint_extra}|{kind}"

    def _extra_kind(self, mode: str) -> str:
        """Cache kind of an extra head's vectors: the mode and the head with its init arguments, so two
        different heads never share keys."""
        return f"{mode}|{self.extra[mode].describe()}"

    def score(self, task: RetrievalTask) -> dict[str, Tensor]:
        """{mode: (Q, N) scores} for the task's judged queries (rows) and corpus (columns)."""
        e = self.embedder
        queries = list(task.judged_queries().values())
        own = e.whole_head
        q_heads = {**self.extra, **{m: h for m, h in self.query_heads.items() if h is not own}}
        qe = e.embed_queries(queries, extra=q_heads)  # one pass for every head
        q = qe.single  # (Q, D)
        q_multi = {m: qe.extra.get(m, q) for m in self.query_heads}  # (Q, D) per multi mode
        doc_texts = list(task.corpus.values())
        items = e.tokenize(doc_texts, e.passage_prompt)
        self.truncated = sum(it.truncated for it in items)
        Q, N = len(queries), len(items)
        out = {m: torch.full((Q, N), float("-inf")) for m in self.modes}
        bar = tqdm(total=N, desc=f"{task.label} passages", unit="doc", disable=not self.progress, leave=False)
        for lo in range(0, N, self.block):
            idx = list(range(lo, min(lo + self.block, N)))
            single, chunks, owner, extra = self._block_vectors([doc_texts[i] for i in idx],
                                                               [items[i] for i in idx], bar)
            for mode, scores in out.items():
                if mode in self.extra:
                    scores[:, lo:lo + len(idx)] = qe.extra[mode] @ extra[mode].T  # (Q, b)
                elif mode not in q_multi:  # single, or single:<its own head>
                    scores[:, lo:lo + len(idx)] = q @ single.T  # (Q, b)
                elif len(chunks):  # a passage scores as its best chunk
                    scores[:, lo:lo + len(idx)] = best_chunk(q_multi[mode] @ chunks.T, owner, len(idx))  # (Q, b)
        bar.close()
        return out

    def _embed(self, items: list[Item], chunks: bool, progress) -> Encoded:
        more = {"extra": self.extra} if self.extra else {}  # plain modes call embed as they always did
        return self.embedder.embed(items, chunks=chunks, progress=progress, **more)

    def _block_vectors(self, texts: list[str], items: list[Item], bar
                       ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """(single (b, D), chunks (M, D), owner (M,), {mode: (b, D)} per extra head) for one block, from the
        cache where it can: a passage with every key cached costs no forward pass, one missing any is
        embedded once (all heads), and only its missing keys are written."""
        multi = bool(self.query_heads)  # any multi mode needs the chunks
        if self.cache is None:
            enc = self._embed(items, multi, bar.update)
            return enc.single, enc.chunks, enc.owner, enc.extra
        prompt = self.embedder.passage_prompt
        keys_single = [cache_key(self._fp("single"), prompt + t) for t in texts]
        keys_chunks = [[cache_key(self._fp(f"chunk{c}"), prompt + t) for c in range(len(it.chunks))] if multi else []
                       for t, it in zip(texts, items)]
        keys_extra = {m: [cache_key(self._fp(self._extra_kind(m)), prompt + t) for t in texts]
                      for m in self.extra}
        per_text = [[ks, *kc, *(keys_extra[m][i] for m in self.extra)]
                    for i, (ks, kc) in enumerate(zip(keys_single, keys_chunks))]  # every key of passage i
        missing = set(self.cache.missing([k for ks in per_text for k in ks]))
        todo = [i for i, ks in enumerate(per_text) if any(k in missing for k in ks)]
        bar.update(len(texts) - len(todo))
        if todo:
            enc = self._embed([items[i] for i in todo], multi, bar.update)
            keys = [keys_single[i] for i in todo] + [k for i in todo for k in keys_chunks[i]]
            vecs = [enc.single, enc.chunks] if multi else [enc.single]
            for m in self.extra:
                keys += [keys_extra[m][i] for i in todo]
                vecs.append(enc.extra[m])
            flat = np.concatenate([v.numpy() for v in vecs]).astype(np.float32)
            new = [j for j, k in enumerate(keys) if k in missing]  # cached vectors are never rewritten
            self.cache.put_many([keys[j] for j in new], flat[new])  # one transaction per block
        single = torch.from_numpy(self.cache.get_many(keys_single)).float()
        extra = {m: torch.from_numpy(self.cache.get_many(keys_extra[m])).float() for m in self.extra}
        if not multi:
            return single, torch.zeros(0, single.shape[1]), torch.zeros(0, dtype=torch.long), extra
        flat_keys = [k for ks in keys_chunks for k in ks]
        chunks = (torch.from_numpy(self.cache.get_many(flat_keys)).float() if flat_keys
                  else torch.zeros(0, single.shape[1]))
        owner = torch.repeat_interleave(torch.arange(len(texts)), torch.tensor([len(k) for k in keys_chunks]))
        return single, chunks, owner, extra


class BM25Retriever:
    """BM25 (bm25s, Lucene variant) over whole texts; no window, so nothing is truncated.

    Args:
        k1, b: BM25 parameters (Lucene defaults 1.2 / 0.75; LongEmbed does not state theirs).
        stopwords: bm25s stopword list name ("en") or None.
    """

    modes = ("bm25",)
    name = "bm25"

    def __init__(self, k1: float = 1.2, b: float = 0.75, stopwords: str | None = "en") -> None:
        try:
            import bm25s  # noqa: F401
        except ImportError as err:
            raise ImportError("the BM25 baseline needs bm25s: pip install bm25s") from err
        logging.getLogger("bm25s").setLevel(logging.WARNING)  # bm25s sets DEBUG on import: a line per index
        self.k1, self.b, self.stopwords = k1, b, stopwords
        self.truncated = 0

    def score(self, task: RetrievalTask) -> dict[str, Tensor]:
        """{"bm25": (Q, N)}: a query with no word token in the corpus' vocabulary (``****``, an empty
        line, only stopwords) scores 0 against every passage; a passage without words scores 0."""
        import bm25s

        docs = list(task.corpus.values())
        queries = bm25s.tokenize(list(task.judged_queries().values()), stopwords=self.stopwords, return_ids=False,
                                 show_progress=False)  # same lower-casing and stopwords as the index
        out = torch.zeros(len(queries), len(docs))
        corpus_tokens = bm25s.tokenize(docs, stopwords=self.stopwords, return_ids=False, show_progress=False)
        if not any(corpus_tokens):  # bm25s cannot index a corpus without a single word
            return {"bm25": out}
        retriever = bm25s.BM25(k1=self.k1, b=self.b)
        retriever.index(corpus_tokens, show_progress=False)
        vocab = retriever.vocab_dict
        for i, q in enumerate(queries):
            known = [t for t in q if t and t in vocab]  # bm25s raises on a query left with no token
            if known:
                out[i] = torch.from_numpy(np.asarray(retriever.get_scores(known), dtype=np.float32))
        return {"bm25": out}
