"""Retrievers: a RetrievalTask in, one (queries x documents) score matrix per scoring mode out.

* ``DenseRetriever``: an Embedder's vectors, cosine scores. Mode ``single`` scores the passage
  vector; mode ``multi`` scores a passage as its best chunk (late chunking, Dewey's multi-vector
  mode). Both come from one forward pass per passage. Passage vectors are written to an embedding
  cache (the teacher cache's SQLite store, keyed by model + settings + text) block by block, so a
  killed evaluation resumes where it stopped and a rerun costs no forward pass; scores are
  accumulated block by block, so memory holds one block of vectors, not the corpus.
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
from dewey_lab.eval.embedder import Embedder, Item
from dewey_lab.eval.tasks.task import RetrievalTask

log = logging.getLogger(__name__)

MODES = ("single", "multi")


class DenseRetriever:
    """Score tasks with an Embedder, single- and / or multi-vector.

    Args:
        embedder: the model wrapper (pooling, prompts, window, chunking).
        modes: any of ``single`` and ``multi``.
        cache_dir: embedding cache directory; None computes everything every time.
        block: passages per cache transaction and scoring step.
        progress: show tqdm bars.
    """

    def __init__(self, embedder: Embedder, modes: Sequence[str] = MODES, cache_dir: str | None = None,
                 block: int = 256, progress: bool = True) -> None:
        bad = [m for m in modes if m not in MODES]
        if bad or not modes:
            raise ValueError(f"unknown scoring mode {bad[0] if bad else ''!r}; use single, multi or both")
        self.embedder, self.modes, self.block, self.progress = embedder, tuple(modes), block, progress
        # one store per model: vector sizes differ between models, and a store holds one size
        model_dir = hashlib.sha256(embedder.fingerprint.encode()).hexdigest()[:16]
        self.cache = VectorStore(Path(cache_dir) / model_dir) if cache_dir else None
        self.truncated = 0  # passages cut at the window in the last score() call

    @property
    def name(self) -> str:
        return self.embedder.name

    def _fp(self, kind: str) -> str:
        return f"{self.embedder.fingerprint}|{self.embedder.fingerprint_extra}|{kind}"

    def score(self, task: RetrievalTask) -> dict[str, Tensor]:
        """{mode: (Q, N) scores} for the task's judged queries (rows) and corpus (columns)."""
        e = self.embedder
        queries = list(task.judged_queries().values())
        q = e.encode_queries(queries)  # (Q, D)
        doc_texts = list(task.corpus.values())
        items = e.tokenize(doc_texts, e.passage_prompt)
        self.truncated = sum(it.truncated for it in items)
        Q, N = len(queries), len(items)
        out = {m: torch.full((Q, N), float("-inf")) for m in self.modes}
        bar = tqdm(total=N, desc=f"{task.label} passages", unit="doc", disable=not self.progress, leave=False)
        for lo in range(0, N, self.block):
            idx = list(range(lo, min(lo + self.block, N)))
            single, chunks, owner = self._block_vectors([doc_texts[i] for i in idx], [items[i] for i in idx], bar)
            if "single" in out:
                out["single"][:, lo:lo + len(idx)] = q @ single.T  # (Q, b)
            if "multi" in out and len(chunks):
                sims = q @ chunks.T  # (Q, M): a passage scores as its best chunk
                part = torch.full((Q, len(idx)), float("-inf"))
                part.scatter_reduce_(1, owner.expand(Q, -1), sims, reduce="amax")
                out["multi"][:, lo:lo + len(idx)] = part
        bar.close()
        return out

    def _block_vectors(self, texts: list[str], items: list[Item], bar) -> tuple[Tensor, Tensor, Tensor]:
        """(single (b, D), chunks (M, D), owner (M,)) for one block, from the cache where it can."""
        multi = "multi" in self.modes
        if self.cache is None:
            enc = self.embedder.embed(items, chunks=multi, progress=bar.update)
            return enc.single, enc.chunks, enc.owner
        prompt = self.embedder.passage_prompt
        keys_single = [cache_key(self._fp("single"), prompt + t) for t in texts]
        keys_chunks = [[cache_key(self._fp(f"chunk{c}"), prompt + t) for c in range(len(it.chunks))] if multi else []
                       for t, it in zip(texts, items)]
        missing = set(self.cache.missing(keys_single + [k for ks in keys_chunks for k in ks]))
        todo = [i for i, (ks, kc) in enumerate(zip(keys_single, keys_chunks))
                if ks in missing or any(k in missing for k in kc)]
        bar.update(len(texts) - len(todo))
        if todo:
            enc = self.embedder.embed([items[i] for i in todo], chunks=multi, progress=bar.update)
            keys, vecs = [keys_single[i] for i in todo], [enc.single.numpy()]
            if multi:
                keys += [k for i in todo for k in keys_chunks[i]]
                vecs.append(enc.chunks.numpy())
            self.cache.put_many(keys, np.concatenate(vecs).astype(np.float32))  # one transaction per block
        single = torch.from_numpy(self.cache.get_many(keys_single)).float()
        if not multi:
            return single, torch.zeros(0, single.shape[1]), torch.zeros(0, dtype=torch.long)
        flat = [k for ks in keys_chunks for k in ks]
        chunks = torch.from_numpy(self.cache.get_many(flat)).float() if flat else torch.zeros(0, single.shape[1])
        owner = torch.repeat_interleave(torch.arange(len(texts)), torch.tensor([len(k) for k in keys_chunks]))
        return single, chunks, owner


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
