"""mteb 2.x adapters: an Embedder scored by mteb itself, single- and multi-vector, on local LongEmbed data.

mteb's LEMB* tasks are where published LongEmbed numbers come from; running our models through mteb's
own loop (its dataloaders, retrieval search and pytrec_eval scoring) checks that ``dewey-lab eval``
scores as mteb does, and lets a checkpoint be evaluated like any mteb model.

* ``MTEBEncoder``: mteb's ``EncoderProtocol`` (``encode`` / ``similarity`` / ``similarity_pairwise`` /
  ``mteb_model_meta``) over an Embedder's single vectors. Queries take the query path (query prompt),
  documents the passage path; mteb wraps it in its ``SearchEncoderWrapper`` for retrieval. ``pooling``
  (mode ``single:<pooling>``, as ``dewey-lab eval --mode`` takes it): queries and passages pooled by that
  whole-text head from the same forward pass (``Embedder.extra_head``'s rules), as ``DenseRetriever`` does.
* ``MTEBMultiVectorSearch``: mteb's ``SearchProtocol`` (``index`` / ``search``). ``index`` embeds every
  passage once as late chunks; a passage scores as its best chunk (max over chunks of query . chunk),
  queries pooled by ``query_pooling`` (default: as the chunks are, their mean; mode ``multi:<pooling>``),
  exactly as ``DenseRetriever``'s multi mode. Top-k is cut in trec_eval's order (score, then larger id).
* ``mteb_task``: the LEMB task's own class and metadata (name, split names, main score) whose
  ``load_data`` reads our ``RetrievalTask`` s instead of the hub, so local stand-ins run offline.
* ``evaluate_mteb``: ``mteb.evaluate`` on those, rows keyed like ``dewey_lab.eval.run.evaluate``'s.

Both wrappers see documents as mteb gives them: title and text joined, surrounding whitespace
stripped (``mteb._create_dataloaders._corpus_to_dict``). mteb is not a core dependency, so it is
imported only when used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dewey_lab.eval.embedder import QUERY_AS_CHUNK, Embedder
from dewey_lab.eval.metrics import METRICS, trec_order
from dewey_lab.eval.retrieval import best_chunk, check_modes
from dewey_lab.eval.tasks.longembed import MTEB_NAMES
from dewey_lab.eval.tasks.task import RetrievalTask

MODES = ("single", "multi")  # and single:<pooling>, multi:<query pooling> (``retrieval.check_modes``)
LOWEST = float(torch.finfo(torch.float32).min)  # a passage with no chunk: last, but finite (JSON, pytrec_eval)


def _mteb():
    try:
        import mteb
    except ImportError as err:
        raise ImportError("the mteb wrapper needs mteb 2.x: pip install 'mteb>=2'") from err
    return mteb


def _texts(loader: Iterable[dict]) -> list[str]:
    """Every text of an mteb dataloader, in order (one Embedder call, so batching is the Embedder's)."""
    return [t for batch in loader for t in batch["text"]]


class MTEBEncoder:
    """mteb ``EncoderProtocol`` over an Embedder's single vectors (mode ``single``, or ``single:<pooling>``).

    Args:
        embedder: pooling, prompts, window and chunking as ``dewey-lab eval`` would use them.
        name: model name in mteb's results (``org/name``); default ``dewey-lab/<embedder.name>``.
        pooling: another whole-text head (a ``PoolingHead.choices()`` name) that pools queries and passages
            from the same forward pass (mode ``single:<pooling>``); None: the embedder's own head.
    """

    mode = "single"

    def __init__(self, embedder: Embedder, name: str | None = None, pooling: str | None = None) -> None:
        self.embedder = embedder
        self.name = name or (embedder.name if "/" in embedder.name else f"dewey-lab/{embedder.name}")
        self._head = None  # None: the embedder's own head (its single vectors)
        if pooling is not None:
            self.mode = f"single:{pooling}"
            head = embedder.extra_head(pooling, where="mode single:<pooling>")  # one-line error listing the choices
            self._head = None if head is embedder.whole_head else head

    @property
    def mteb_model_meta(self):
        """Name, a revision hashed from weights + settings, and the mode as an experiment, so mteb's result
        cache never serves one mode's or one setting's scores for another."""
        from mteb.models import ModelMeta
        from mteb.models.model_meta import ScoringFunction

        e = self.embedder
        revision = hashlib.sha256(f"{e.fingerprint}|{e.fingerprint_extra}".encode()).hexdigest()[:16]
        return ModelMeta.create_empty(overwrites={
            "name": self.name, "revision": revision, "max_tokens": e.max_length, "framework": ["PyTorch"],
            "similarity_fn_name": ScoringFunction.COSINE if e.normalize else ScoringFunction.DOT_PRODUCT,
            "use_instructions": bool(e.query_prompt or e.passage_prompt), "experiment_kwargs": {"mode": self.mode},
            "model_type": ["dense"] if self.mode.startswith("single") else ["late-interaction"]})

    def encode(self, inputs, *, task_metadata=None, hf_split: str = "", hf_subset: str = "",
               prompt_type=None, **kwargs: Any) -> np.ndarray:
        """(N, D) float32 vectors: queries by the query path, documents (and untyped inputs) by the passage path.

        mteb's ``batch_size`` is ignored: the Embedder batches by token budget, longest first, as in
        ``dewey-lab eval``, so a vector does not depend on which harness computed it.
        """
        texts = _texts(inputs)
        extra = None if self._head is None else {"pooled": self._head}  # single:<pooling>: that head, same pass
        if prompt_type == "query":  # PromptType is a str enum
            enc = self.embedder.embed_queries(texts, extra=extra)
        else:
            enc = self.embedder.encode_passages(texts, chunks=False, extra=extra)
        vecs = enc.single if extra is None else enc.extra["pooled"]
        return vecs.float().numpy()

    def similarity(self, embeddings1, embeddings2) -> Tensor:
        """(N1, N2) dot products: the vectors are already L2-normalised when cosine is meant, and a plain
        matmul is what DenseRetriever scores with."""
        a, b = torch.as_tensor(embeddings1).float(), torch.as_tensor(embeddings2).float()
        return torch.atleast_2d(a) @ torch.atleast_2d(b).T

    def similarity_pairwise(self, embeddings1, embeddings2) -> Tensor:
        """(N,) dot product of each pair."""
        a, b = torch.as_tensor(embeddings1).float(), torch.as_tensor(embeddings2).float()
        return (torch.atleast_2d(a) * torch.atleast_2d(b)).sum(-1)


class MTEBMultiVectorSearch(MTEBEncoder):
    """mteb ``SearchProtocol``: late-chunked passages, each scored as max over its chunks (mode ``multi``).

    Also an encoder (single vectors) for non-retrieval tasks; mteb prefers ``index`` / ``search`` when a
    model offers both. ``index`` keeps the corpus' chunk vectors (one forward pass per passage).
    """

    mode = "multi"

    def __init__(self, embedder: Embedder, name: str | None = None, query_pooling: str = QUERY_AS_CHUNK) -> None:
        super().__init__(embedder, name)
        self.mode = "multi" if query_pooling == QUERY_AS_CHUNK else f"multi:{query_pooling}"
        self._query_head = embedder.query_head(query_pooling)  # DenseRetriever's rule for mode multi
        self._ids: list[str] = []
        self._chunks: Tensor | None = None
        self._owner: Tensor | None = None

    def index(self, corpus, *, task_metadata, hf_split: str, hf_subset: str, encode_kwargs: dict,
              num_proc: int | None = None, **kwargs: Any) -> None:
        from mteb._create_dataloaders import create_dataloader  # what mteb's own search wrappers use
        from mteb.types import PromptType

        loader = create_dataloader(corpus, task_metadata=task_metadata, prompt_type=PromptType.document,
                                   batch_size=encode_kwargs.get("batch_size", 32), num_proc=num_proc)
        enc = self.embedder.encode_passages(_texts(loader), chunks=True)
        self._ids = [str(i) for i in corpus["id"]]
        self._chunks, self._owner = enc.chunks.float(), enc.owner

    def search(self, queries, *, task_metadata, hf_split: str, hf_subset: str, top_k: int, encode_kwargs: dict,
               top_ranked: dict[str, list[str]] | None = None, num_proc: int | None = None,
               **kwargs: Any) -> dict[str, dict[str, float]]:
        """{qid: {doc_id: score}} for the ``top_k`` best passages (of ``top_ranked[qid]`` when reranking)."""
        from mteb._create_dataloaders import create_dataloader
        from mteb.types import PromptType

        if self._chunks is None:
            raise RuntimeError("search() before index(): let mteb.evaluate drive the wrapper, or call index first")
        loader = create_dataloader(queries, task_metadata=task_metadata, prompt_type=PromptType.query,
                                   batch_size=encode_kwargs.get("batch_size", 32), num_proc=num_proc)
        head = self._query_head
        enc = self.embedder.embed_queries(_texts(loader), extra=None if head is self.embedder.whole_head else {"q": head})
        q = enc.extra.get("q", enc.single).float()  # (Q, D)
        scores = self.max_over_chunks(q)
        order = trec_order(scores, self._ids).argsort(dim=1, descending=True)  # trec_eval's ranking
        out: dict[str, dict[str, float]] = {}
        for i, qid in enumerate(str(x) for x in queries["id"]):
            allowed = None if top_ranked is None else set(top_ranked.get(qid, ()))
            hits: dict[str, float] = {}
            for j in order[i].tolist():
                if len(hits) == top_k:
                    break
                if allowed is None or self._ids[j] in allowed:
                    hits[self._ids[j]] = max(float(scores[i, j]), LOWEST)
            out[qid] = hits
        return out

    def max_over_chunks(self, q: Tensor) -> Tensor:
        """(Q, N): each passage's best chunk, DenseRetriever's multi-mode rule (-inf for a passage without one)."""
        return best_chunk(q @ self._chunks.T, self._owner, len(self._ids))


def mteb_task(tasks: RetrievalTask | Sequence[RetrievalTask]):
    """An mteb retrieval task: the LEMB task's class and metadata, its data from ``tasks``.

    Args:
        tasks: one real LongEmbed task (split ``test``), or the per-length tasks of passkey / needle
            (split ``test_<length>``, as mteb names them), e.g. ``load_longembed("qmsum", source=folder)``.
    """
    mteb = _mteb()
    tasks = [tasks] if isinstance(tasks, RetrievalTask) else list(tasks)
    names = {t.meta.get("mteb_name") or MTEB_NAMES.get(t.name) for t in tasks}
    if len(names) != 1 or None in names:
        raise ValueError(f"tasks {sorted({t.name for t in tasks})} map to mteb tasks {sorted(map(str, names))}; "
                         f"pass the tasks of one LongEmbed name ({', '.join(MTEB_NAMES)})")
    splits = {("test" if t.length is None else f"test_{t.length}"): t for t in tasks}
    if len(splits) != len(tasks):
        raise ValueError(f"two tasks share a split of {names.pop()}; pass each length once")
    base = type(mteb.get_task(names.pop()))

    class LocalLEMBTask(base):
        """``base`` reading the given RetrievalTasks; v1 attributes, as the LEMB tasks' own load_data sets them."""

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            if self.data_loaded:
                return
            self.corpus = {s: {d: {"text": x} for d, x in t.corpus.items()} for s, t in splits.items()}
            self.queries = {s: dict(t.queries) for s, t in splits.items()}
            self.relevant_docs = {s: {q: dict(r) for q, r in t.qrels.items()} for s, t in splits.items()}
            self.data_loaded = True

    LocalLEMBTask.__name__ = LocalLEMBTask.__qualname__ = base.__name__
    return LocalLEMBTask().filter_eval_splits(list(splits))


def mteb_model(embedder: Embedder, mode: str) -> MTEBEncoder:
    """The wrapper for one ``dewey-lab eval`` scoring mode: ``single``, ``single:<pooling>``, ``multi`` or
    ``multi:<query pooling>`` (``multi:chunk`` is ``multi``)."""
    (mode,) = check_modes([mode])
    kind, _, pooling = mode.partition(":")
    if kind == "single":
        return MTEBEncoder(embedder, pooling=pooling or None)
    return MTEBMultiVectorSearch(embedder, query_pooling=pooling or QUERY_AS_CHUNK)


def evaluate_mteb(embedder: Embedder, tasks: Sequence[RetrievalTask], modes: Sequence[str] = ("single",),
                  results_dir: str | Path | None = None, prediction_dir: str | Path | None = None) -> list[dict]:
    """Run ``tasks`` through ``mteb.evaluate``; one row per (task, length, mode), metric names as ours.

    Args:
        modes: as ``dewey-lab eval --mode`` names them: ``single`` and ``single:<pooling>`` (MTEBEncoder),
            ``multi`` and ``multi:<query pooling>`` (MTEBMultiVectorSearch); each row keeps the mode as given.
        results_dir: mteb's result cache (``ResultCache``); None writes none and always recomputes.
        prediction_dir: where mteb saves each run's per-query scores (``<dir>/<mode>/<task>_predictions.json``).
    """
    mteb = _mteb()
    modes = check_modes(modes)  # one line listing the choices for an unknown mode
    models = {mode: mteb_model(embedder, mode) for mode in modes}  # every head checked before the first pass
    groups: dict[str, list[RetrievalTask]] = {}
    for t in tasks:
        groups.setdefault(t.name, []).append(t)
    rows = []
    for mode, model in models.items():
        for name, group in groups.items():
            result = mteb.evaluate(
                model, mteb_task(group), cache=mteb.ResultCache(results_dir) if results_dir else None,
                overwrite_strategy="always", show_progress_bar=False,
                prediction_folder=Path(prediction_dir) / mode if prediction_dir else None)
            (task_result,) = result.task_results
            for t in group:
                (scores,) = task_result.scores["test" if t.length is None else f"test_{t.length}"]
                m = {k: float(scores[k.replace("@", "_at_")]) for k in METRICS}
                rows.append({"task": name, "length": t.length, "mode": mode, "main_metric": t.metric,
                             "main": m[t.metric], **m, "n_queries": len(t.judged_queries()),
                             "n_docs": len(t.corpus)})
    return rows
