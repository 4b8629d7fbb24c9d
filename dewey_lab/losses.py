"""Distillation losses: pure functions over tensors, wrapped in weighted, typed loss terms.

With s, S the student's and t, T the teacher's L2-normalised embeddings (Dewey report):

* cosine:      sum over x of (1 - s_x . t_x)
* similarity:  MSE(S S^T, T T^T) over the batch (every pair of texts, or of chunks)

Each term applies to the whole-text embeddings, the chunk embeddings, or both (``on``), and is
logged per target as ``train/loss_<term>_<target>``. Weights are not published for Dewey; the
same authors' Jasper/Stella used 10 x cosine + 200 x similarity.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

Target = Literal["whole", "chunk"]


def cosine_loss(student: Tensor, teacher: Tensor, reduction: Literal["sum", "mean"] = "sum") -> Tensor:
    """sum_x (1 - cos(s_x, t_x)) for student (N, D) and teacher (N, D); ``mean`` divides by N."""
    per_item = 1.0 - (F.normalize(student.float(), dim=-1) * F.normalize(teacher.float(), dim=-1)).sum(-1)  # (N,)
    return per_item.sum() if reduction == "sum" else per_item.mean()


def similarity_mse_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """MSE between the (N, N) cosine-similarity matrices of student (N, D) and teacher (N, D')."""
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    return F.mse_loss(s @ s.T, t @ t.T)


class LossTerm(nn.Module):
    """One weighted loss applied to some of the embedding kinds; ``weight: 0`` switches it off."""

    name = "term"

    def __init__(self, weight: float = 1.0, on: list[Target] | None = None) -> None:
        """
        Args:
            weight: multiplies this term in the total loss.
            on: which embeddings it applies to: ``whole`` (CLS of the whole text), ``chunk``; default both.
        """
        super().__init__()
        self.weight = float(weight)
        self.on = list(on) if on is not None else ["whole", "chunk"]
        for target in self.on:
            if target not in ("whole", "chunk"):
                raise ValueError(f"loss target must be 'whole' or 'chunk', got {target!r}")

    def loss(self, student: Tensor, teacher: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, pairs: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        """Unweighted loss per target, keyed ``<name>_<target>``; targets with no items are skipped."""
        out = {}
        for target in self.on:
            student, teacher = pairs[target]
            if len(student) > 0:
                out[f"{self.name}_{target}"] = self.loss(student, teacher)
        return out


class CosineLoss(LossTerm):
    """Per-item cosine distance to the teacher, summed (the paper) or averaged."""

    name = "cosine"

    def __init__(self, weight: float = 1.0, on: list[Target] | None = None,
                 reduction: Literal["sum", "mean"] = "sum") -> None:
        super().__init__(weight, on)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"cosine reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction

    def loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        return cosine_loss(student, teacher, self.reduction)


class SimilarityLoss(LossTerm):
    """MSE between in-batch similarity matrices: the student keeps the teacher's geometry."""

    name = "similarity"

    def loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        return similarity_mse_loss(student, teacher)
