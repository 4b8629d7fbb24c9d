"""Distillation losses: pure functions over tensors, wrapped in weighted, typed loss terms.

With s, S the student's and t, T the teacher's L2-normalised embeddings (Dewey report):

* cosine:      sum over x of (1 - s_x . t_x)
* similarity:  MSE(S S^T, T T^T) over the batch (every pair of texts, or of chunks)
* relative similarity (Jasper/Stella's third term, arXiv 2412.19048): over every two in-batch pairs
  (a, b), the student orders their similarities as the teacher does, by a margin:
  mean of relu(margin - sign_T * (s_a - s_b)), with sign_T = +1 when the teacher's s_a > s_b, else -1.

The model's loss is the weighted sum of a *collection* of terms, ``model.losses`` (name -> term), set
in YAML; each term applies to the whole-text embeddings, the chunk embeddings, or both (``targets``),
and is logged per target as ``train/loss_<name>_<target>``. A new term is a class here and an entry
in a YAML file. Weights are not published for Dewey; the same authors' Jasper/Stella used
10 x cosine + 200 x similarity + 20 x relative similarity (margin 0.015).
"""

from __future__ import annotations

from typing import Literal

import torch
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


def relative_similarity_loss(student: Tensor, teacher: Tensor, margin: float = 0.015,
                             max_pairs: int | None = None) -> Tensor:
    """Jasper/Stella's relative-similarity (triplet) distillation for student (N, D), teacher (N, D').

    The N(N-1)/2 in-batch pairs i < j (row-major order) have cosine similarities p (student) and q
    (teacher). For every two pairs a < b: sign = +1 if q_a > q_b else -1 (a tie counts as -1, as in the
    reference code), and the loss is the mean over (a, b) of relu(margin - sign * (p_a - p_b)). That is
    P(P-1)/2 terms for P pairs: ``max_pairs`` keeps a uniformly random subset of P (torch's seeded RNG)
    when P is larger, so a batch of hundreds of chunks stays affordable.
    """
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    i, j = torch.triu_indices(len(s), len(s), offset=1, device=s.device)
    p, q = (s[i] * s[j]).sum(-1), (t[i] * t[j]).sum(-1)  # (P,)
    if max_pairs is not None and len(p) > max_pairs:
        keep = torch.randperm(len(p), device=p.device)[:max_pairs].sort().values
        p, q = p[keep], q[keep]
    a, b = torch.triu_indices(len(p), len(p), offset=1, device=p.device)
    sign = torch.where(q[a] > q[b], 1.0, -1.0)
    return F.relu(margin - sign * (p[a] - p[b])).mean()


class LossTerm(nn.Module):
    """One weighted loss applied to some of the embedding kinds; ``weight: 0`` switches it off. A new
    term subclasses this and defines ``loss(student, teacher)``; ``model.losses`` in YAML adds it."""

    def __init__(self, weight: float = 1.0, targets: list[Target] | None = None) -> None:
        """
        Args:
            weight: multiplies this term in the total loss.
            targets: which embeddings it applies to: ``whole`` (the whole-text head), ``chunk``; default both.
        """
        super().__init__()
        self.weight = float(weight)
        self.targets = list(targets) if targets is not None else ["whole", "chunk"]
        for target in self.targets:
            if target not in ("whole", "chunk"):
                raise ValueError(f"loss target must be 'whole' or 'chunk', got {target!r}")

    def loss(self, student: Tensor, teacher: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, pairs: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        """Unweighted loss per target, keyed by target; targets with no items are skipped."""
        return {target: self.loss(*pairs[target]) for target in self.targets if len(pairs[target][0]) > 0}


class CosineLoss(LossTerm):
    """Per-item cosine distance to the teacher, summed (the paper) or averaged."""

    def __init__(self, weight: float = 1.0, targets: list[Target] | None = None,
                 reduction: Literal["sum", "mean"] = "sum") -> None:
        super().__init__(weight, targets)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"cosine reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction

    def loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        return cosine_loss(student, teacher, self.reduction)


class SimilarityLoss(LossTerm):
    """MSE between in-batch similarity matrices: the student keeps the teacher's geometry."""

    def loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        return similarity_mse_loss(student, teacher)


class RelativeSimilarityLoss(LossTerm):
    """Jasper/Stella's third term: the student orders in-batch pair similarities as the teacher does,
    by ``margin`` (``relative_similarity_loss``). Their recipe: weight 20, margin 0.015, on the text
    embeddings; hence ``targets`` defaults to ``whole`` here (chunks: set ``max_pairs``)."""

    def __init__(self, weight: float = 20.0, targets: list[Target] | None = None, margin: float = 0.015,
                 max_pairs: int | None = 2048) -> None:
        """
        Args:
            weight: multiplies this term in the total loss (Jasper: 20).
            targets: ``whole`` (default), ``chunk``, or both.
            margin: how much more similar the teacher's more similar pair must be for the student (0.015).
            max_pairs: at most this many in-batch pairs are ranked against each other (a random subset
                beyond it): P pairs give P(P-1)/2 terms. None: all (fine for a batch of 64 texts).
        """
        super().__init__(weight, targets if targets is not None else ["whole"])
        self.margin, self.max_pairs = float(margin), max_pairs

    def loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        return relative_similarity_loss(student, teacher, self.margin, self.max_pairs)


def default_losses() -> dict[str, LossTerm]:
    """What ``DistillModule`` uses when no ``model.losses`` is given (base.yaml spells the same out)."""
    return {"cosine": CosineLoss(weight=10.0), "similarity": SimilarityLoss(weight=200.0)}
