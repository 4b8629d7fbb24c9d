"""Pooling heads: token states -> embeddings, as typed swappable classes, for training and inference alike.

Every head takes the encoder's last hidden state ``(R, T, H)`` and a batch dict whose B texts lie in
R rows, one per row (``Embedder``, padded training batches) or packed several per row (training):

* ``doc_row``, ``doc_start`` (B,): text b's first (CLS) token is ``hidden[doc_row[b], doc_start[b]]``;
  its tokens are contiguous from there;
* ``token_doc`` (R, T): which text owns each token, -1 on padding;
* ``content_mask`` (R, T): True on the tokens a text's mean reads: text tokens, not CLS, SEP, prompt or
  padding (the Dewey report); every attended token where an Embedder reproduces sentence-transformers
  (``mean_over="all"``);
* ``chunk_row``, ``chunk_start``, ``chunk_end`` (N,): chunk i is tokens
  ``[chunk_start[i], chunk_end[i])`` of row ``chunk_row[i]``.

Whole-text heads return (B, H); ``ChunkMeanPooling`` returns (N, H).

The class hierarchy is the registry: a whole-text head with a ``name`` is a choice of ``--pooling``
(``dewey-lab eval``, ``dewey-lab export``, ``dewey_lab.encode.load``, ``PasskeyCallback(pooling=)``),
and a checkpoint records each head's class path, init arguments and weights (``DistillModule``), so a
new head is this file plus YAML. A head stores each ``__init__`` argument under its own name (that is
what the checkpoint records), builds weights that depend on the encoder's width in ``bind``, and says
in ``sentence_transformers_modes`` whether stock sentence-transformers Pooling can compute it.
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


class PoolingHead(nn.Module):
    """Base class; subclasses implement ``forward(hidden, batch)``."""

    name: ClassVar[str] = ""
    """Short name for ``--pooling``; empty: not a choice."""
    whole: ClassVar[bool] = True
    """True: one vector per text (B, H); False: a chunk head (N, H), never a ``--pooling`` choice."""
    appends_eos: ClassVar[bool] = False
    """True: the Embedder appends an EOS to every input that does not end with one (decoder embedders)."""

    def forward(self, hidden: Tensor, batch: dict[str, Tensor]) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def bind(self, hidden_size: int) -> None:
        """Called once the encoder is known: build weights sized by its hidden width (none by default)."""

    def sentence_transformers_modes(self) -> tuple[str, ...] | None:
        """The sentence-transformers ``Pooling`` modes whose average this head is (``dewey-lab export``),
        or None when no stock module computes it (then export refuses the head in one line)."""
        return None

    # -- the registry and the checkpoint record -------------------------------------------------------
    @classmethod
    def choices(cls) -> dict[str, type[PoolingHead]]:
        """Whole-text heads by name, in definition order: every named subclass imported so far."""
        out: dict[str, type[PoolingHead]] = {}
        todo = list(cls.__subclasses__())
        while todo:
            sub = todo.pop(0)
            if sub.whole and sub.name:
                out.setdefault(sub.name, sub)
            todo[:0] = sub.__subclasses__()
        return out

    @classmethod
    def pick(cls, name: str | None, trained: PoolingHead | None = None, hidden_size: int | None = None,
             where: str = "pooling") -> PoolingHead:
        """The head ``name`` asks for: the ``trained`` head itself when None or its own name, else a fresh
        head of that name, which may not carry learned weights (they would be untrained)."""
        if name is None or (trained is not None and name == trained.name):
            if trained is None:
                raise ValueError(f"{where}: no pooling given and the model has no trained head")
            return trained
        known = cls.choices()
        if name not in known:
            raise ValueError(f"unknown {where} {name!r}; use one of {', '.join(known)}")
        head = known[name]()
        if hidden_size is not None:
            head.bind(hidden_size)
        if any(True for _ in head.parameters()):
            has = f"its head is {trained.name or type(trained).__name__}" if trained is not None else "it has none"
            plain = ", ".join(n for n, c in known.items() if not _learned(c, hidden_size))
            raise ValueError(f"{where} {name!r} has learned weights this model did not train ({has}); use one of "
                             f"{plain}, or train with model.whole_pooling: {_path(known[name])}")
        return head

    def config(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}``: what a checkpoint records to build this head again."""
        args = {}
        for p in inspect.signature(type(self).__init__).parameters.values():
            if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if not hasattr(self, p.name):
                raise TypeError(f"{type(self).__name__} does not keep its __init__ argument {p.name!r}; store it as "
                                f"self.{p.name} so checkpoints can rebuild the head")
            args[p.name] = getattr(self, p.name)
        return {"class_path": _path(type(self)), "init_args": args}

    @staticmethod
    def from_config(record: dict[str, Any], hidden_size: int | None = None) -> PoolingHead:
        """A head from ``config()``'s record (bound to ``hidden_size`` when given); weights come after."""
        module, _, attr = record["class_path"].rpartition(".")
        try:
            head_cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            raise ValueError(f"the checkpoint's pooling head {record['class_path']} cannot be imported; install "
                             "the code that defined it") from None
        if not (isinstance(head_cls, type) and issubclass(head_cls, PoolingHead)):
            # ValueError, not TypeError: the CLIs print it as their one-line error
            raise ValueError(f"the checkpoint's pooling head {record['class_path']} is not a PoolingHead")  # noqa: TRY004
        head = head_cls(**record.get("init_args", {}))
        if hidden_size is not None:
            head.bind(hidden_size)
        return head

    def describe(self) -> str:
        """The name, with init arguments when there are any: part of an Embedder's cache key."""
        args = self.config()["init_args"]
        label = self.name or type(self).__name__
        return label + (f"({', '.join(f'{k}={v}' for k, v in args.items())})" if args else "")


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _learned(cls: type[PoolingHead], hidden_size: int | None) -> bool:
    head = cls()
    head.bind(hidden_size or 8)
    return any(True for _ in head.parameters())


class CLSPooling(PoolingHead):
    """The first token's state (Dewey's whole-text CLS embedding)."""

    name = "cls"

    def forward(self, hidden: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return first_tokens(hidden, batch)  # (B, H)

    def sentence_transformers_modes(self) -> tuple[str, ...]:
        return ("cls",)


class MeanPooling(PoolingHead):
    """Mean over content tokens: the whole text as one chunk (Dewey's ``mean``, used for long text)."""

    name = "mean"

    def forward(self, hidden: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return text_mean(hidden, batch)  # (B, H)

    def sentence_transformers_modes(self) -> tuple[str, ...]:
        return ("mean",)


class CLSMeanPooling(PoolingHead):
    """Average of CLS and mean pooling (Dewey's ``cls_add_mean``, suggested for short text)."""

    name = "cls_mean"

    def forward(self, hidden: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return 0.5 * (first_tokens(hidden, batch) + text_mean(hidden, batch))  # (B, H)

    def sentence_transformers_modes(self) -> tuple[str, ...]:
        return ("cls", "mean")


class LastTokenPooling(PoolingHead):
    """Each text's last token state: decoder embedders (E5-Mistral, Linq-Embed-Mistral, Qwen3-Embedding)
    read an EOS that the Embedder appends to every input; on an encoder it is the SEP token."""

    name = "last"
    appends_eos = True

    def forward(self, hidden: Tensor, batch: dict[str, Tensor]) -> Tensor:
        B = batch["doc_row"].numel()
        lengths = torch.bincount(batch["token_doc"][batch["token_doc"] >= 0], minlength=B)  # (B,) tokens per text
        return hidden[batch["doc_row"], batch["doc_start"] + lengths - 1]  # (B, H)

    def sentence_transformers_modes(self) -> tuple[str, ...]:
        return ("lasttoken",)


class AttentionPooling(PoolingHead):
    """A learned query over each text's content tokens: ``sum_t softmax_t(h_t . q / sqrt(H)) h_t``.

    The query starts at zero, so the weights start uniform and the head starts as mean pooling
    (``MeanPooling``) exactly; training moves it toward the tokens that predict the teacher's vector.
    Packed rows are handled as ``text_mean`` does: the softmax runs over each text's own tokens.
    No stock sentence-transformers module computes it, so ``dewey-lab export`` refuses it.

    Args:
        hidden_size: the encoder's width H; None: taken from the student when the model is built.
    """

    name = "attention"

    def __init__(self, hidden_size: int | None = None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.register_parameter("query", None)  # (H,) once bound
        if hidden_size is not None:
            self.bind(hidden_size)

    def bind(self, hidden_size: int) -> None:
        if self.query is not None:
            if self.query.numel() != hidden_size:
                raise ValueError(f"AttentionPooling was built for width {self.query.numel()} but the encoder's is "
                                 f"{hidden_size}; drop model.whole_pooling.init_args.hidden_size")
            return
        self.hidden_size = hidden_size
        self.query = nn.Parameter(torch.zeros(hidden_size))  # (H,) zero: uniform weights, i.e. the mean

    def forward(self, hidden: Tensor, batch: dict[str, Tensor]) -> Tensor:
        if self.query is None:
            raise RuntimeError("AttentionPooling has no query yet: give hidden_size or call bind(hidden_size)")
        B, H = batch["doc_row"].numel(), hidden.shape[-1]
        keep = batch["content_mask"] & (batch["token_doc"] >= 0)  # (R, T)
        doc = batch["token_doc"][keep]  # (L,) owner of each pooled token
        h = hidden[keep].float()  # (L, H)
        score = (h * self.query.float()).sum(-1) / math.sqrt(H)  # (L,) fp32 even under autocast (no matmul)
        top = torch.full((B,), float("-inf"), device=hidden.device).scatter_reduce(0, doc, score, "amax")
        e = torch.exp(score - top[doc].detach())  # (L,) softmax numerators; each text's largest is 1
        sums = torch.zeros(B, H, device=hidden.device, dtype=torch.float32).index_add_(0, doc, e.unsqueeze(-1) * h)
        norm = torch.zeros(B, device=hidden.device, dtype=torch.float32).index_add_(0, doc, e)  # (B,) >= 1 if any
        return (sums / norm.clamp_min(1.0).unsqueeze(-1)).to(hidden.dtype)  # (B, H); 0 for a text without tokens


class ChunkMeanPooling(PoolingHead):
    """Mean of each chunk's token states, all chunks of the batch at once: (N, H)."""

    whole = False

    def forward(self, hidden: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return span_mean(hidden, batch["chunk_row"], batch["chunk_start"], batch["chunk_end"])


class TextAsChunk(PoolingHead):
    """A chunk head over each text's whole run of text tokens: a query pooled as the passages' late chunks are.

    One text per row (``Embedder``'s layout, whose batch dict adds ``text_mask`` (B, T): the text tokens,
    whatever ``content_mask`` holds). With ``ChunkMeanPooling`` it is the mean of the query's text tokens
    (no CLS, SEP or prompt), dewey_en_beta's query vector in its multi-vector mode. A text without text
    tokens (an empty query) pools its first token. Not a ``--pooling`` choice (no ``name``):
    ``dewey_lab.eval.embedder.Embedder.query_head`` builds it for ``query_pooling=chunk``.
    """

    def __init__(self, chunk: PoolingHead) -> None:
        super().__init__()
        self.chunk = chunk

    def describe(self) -> str:
        return f"chunk({type(self.chunk).__name__} over the text tokens)"

    def forward(self, hidden: Tensor, batch: dict[str, Tensor]) -> Tensor:
        text = batch["text_mask"] & (batch["token_doc"] >= 0)  # (B, T): text tokens, contiguous per row
        B, T = text.shape
        has = text.any(1)  # (B,)
        start = torch.where(has, text.int().argmax(1), 0)  # first text token
        end = torch.where(has, T - text.flip(1).int().argmax(1), 1)  # one past the last
        rows = torch.arange(B, device=hidden.device)
        return self.chunk(hidden, {"chunk_row": rows, "chunk_start": start, "chunk_end": end})  # (B, H)


def first_tokens(hidden: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """Each text's first token state (B, H), wherever its row and offset."""
    return hidden[batch["doc_row"], batch["doc_start"]]


def text_mean(hidden: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """Each text's mean over its content tokens (B, H), fp32 accumulation; packed rows included."""
    B, H = batch["doc_row"].numel(), hidden.shape[-1]
    keep = batch["content_mask"] & (batch["token_doc"] >= 0)  # (R, T)
    doc = batch["token_doc"][keep]  # (L,)
    sums = torch.zeros(B, H, device=hidden.device, dtype=torch.float32).index_add_(0, doc, hidden[keep].float())
    counts = torch.bincount(doc, minlength=B).to(torch.float32)  # (B,)
    return (sums / counts.clamp_min(1.0).unsqueeze(-1)).to(hidden.dtype)


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``hidden`` (B, T, H) over positions where ``mask`` (B, T) is True; fp32 accumulation."""
    w = mask.to(torch.float32).unsqueeze(-1)  # (B, T, 1)
    total = (hidden.float() * w).sum(1)  # (B, H)
    return (total / w.sum(1).clamp_min(1.0)).to(hidden.dtype)


def span_mean(hidden: Tensor, row: Tensor, start: Tensor, end: Tensor) -> Tensor:
    """Mean of ``hidden[row[i], start[i]:end[i]]`` for every span i, exactly, without a loop.

    Spans may overlap (chunks do), so tokens are gathered per span (total span length x H memory)
    and summed with ``index_add``; no (N, T) mask is ever built.
    """
    B, T, H = hidden.shape
    n = row.numel()
    if n == 0:
        return hidden.new_zeros(0, H)
    lengths = (end - start).clamp_min(1)  # (N,)
    span_id = torch.repeat_interleave(torch.arange(n, device=hidden.device), lengths)  # (L,)
    # position of each gathered token inside its own span: 0, 1, ..., len-1 per span
    first = torch.cumsum(lengths, 0) - lengths  # (N,)
    within = torch.arange(span_id.numel(), device=hidden.device) - first[span_id]
    flat = row[span_id] * T + start[span_id] + within  # (L,) indices into (B*T)
    tokens = hidden.reshape(B * T, H)[flat].float()  # (L, H)
    sums = torch.zeros(n, H, device=hidden.device, dtype=torch.float32).index_add_(0, span_id, tokens)
    return (sums / lengths.unsqueeze(-1)).to(hidden.dtype)  # (N, H)
