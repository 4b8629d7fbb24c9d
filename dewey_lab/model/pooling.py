"""Pooling heads: token states -> embeddings, as typed swappable classes.

Every head takes the encoder's last hidden state ``(R, T, H)`` and the collated batch
(``datamodule.collate``), whose B texts lie in R rows, one per row or packed several per row:

* ``doc_row``, ``doc_start`` (B,): text b's first (CLS) token is ``hidden[doc_row[b], doc_start[b]]``;
* ``token_doc`` (R, T): which text owns each token, -1 on padding;
* ``content_mask`` (R, T): True on text tokens; False on CLS, SEP, prompt and padding tokens,
  which the Dewey report excludes from mean and chunk pooling;
* ``chunk_row``, ``chunk_start``, ``chunk_end`` (N,): chunk i is tokens
  ``[chunk_start[i], chunk_end[i])`` of row ``chunk_row[i]``.

Whole-text heads return (B, H); ``ChunkMeanPooling`` returns (N, H).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PoolingHead(nn.Module):
    """Base class; subclasses implement ``forward(hidden, batch)``."""

    def forward(self, hidden: Tensor, batch: dict[str, Tensor]) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class CLSPooling(PoolingHead):
    """The first token's state (Dewey's whole-text CLS embedding)."""

    def forward(self, hidden: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return first_tokens(hidden, batch)  # (B, H)


class MeanPooling(PoolingHead):
    """Mean over content tokens: the whole text as one chunk (Dewey's ``mean``, used for long text)."""

    def forward(self, hidden: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return text_mean(hidden, batch)  # (B, H)


class CLSMeanPooling(PoolingHead):
    """Average of CLS and mean pooling (Dewey's ``cls_add_mean``, suggested for short text)."""

    def forward(self, hidden: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return 0.5 * (first_tokens(hidden, batch) + text_mean(hidden, batch))  # (B, H)


class ChunkMeanPooling(PoolingHead):
    """Mean of each chunk's token states, all chunks of the batch at once: (N, H)."""

    def forward(self, hidden: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return span_mean(hidden, batch["chunk_row"], batch["chunk_start"], batch["chunk_end"])


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
