"""Loss functions and pooling heads against hand-written loops."""

import math

import pytest
import torch

from dewey_lab.model.losses import (
    CosineLoss,
    RelativeSimilarityLoss,
    SimilarityLoss,
    cosine_loss,
    relative_similarity_loss,
    similarity_mse_loss,
)
from dewey_lab.model.pooling import ChunkMeanPooling, CLSMeanPooling, CLSPooling, MeanPooling, span_mean


def _norm(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)


def test_cosine_loss_matches_formula(pair):
    s, t = pair
    expected = sum(1 - _dot(_norm(a.tolist()), _norm(b.tolist())) for a, b in zip(s, t))
    assert cosine_loss(s, t).item() == pytest.approx(expected, rel=1e-5)
    assert cosine_loss(s, t, "mean").item() == pytest.approx(expected / 5, rel=1e-5)
    assert cosine_loss(t, t).item() == pytest.approx(0.0, abs=1e-5)  # identical vectors cost nothing


def test_similarity_loss_matches_formula(pair):
    s, t = pair
    t = torch.cat([t, t[:, :3]], dim=1)  # the teacher may have another dimension
    sn, tn = [_norm(v.tolist()) for v in s], [_norm(v.tolist()) for v in t]
    n = len(sn)
    expected = sum((_dot(sn[i], sn[j]) - _dot(tn[i], tn[j])) ** 2 for i in range(n) for j in range(n)) / n**2
    assert similarity_mse_loss(s, t).item() == pytest.approx(expected, rel=1e-5)
    # invariant to scaling each vector: it compares directions only
    assert similarity_mse_loss(3 * s, t).item() == pytest.approx(expected, rel=1e-5)


def test_loss_terms_apply_to_their_targets(pair):
    s, t = pair
    pairs = {"whole": (s, t), "chunk": (s[:2], t[:2])}
    out = CosineLoss(weight=10, targets=["chunk"])(pairs)
    assert list(out) == ["chunk"]
    assert out["chunk"].item() == pytest.approx(cosine_loss(s[:2], t[:2]).item())
    both = SimilarityLoss()(pairs)
    assert set(both) == {"whole", "chunk"}
    assert list(RelativeSimilarityLoss()(pairs)) == ["whole"]  # Jasper's third term: texts, by default
    # a batch without chunks skips the chunk target instead of producing NaN
    assert list(CosineLoss()({"whole": (s, t), "chunk": (s[:0], t[:0])})) == ["whole"]
    with pytest.raises(ValueError, match="whole.*chunk"):
        CosineLoss(targets=["tokens"])


def _relative_similarity_reference(s, t, margin):
    """Jasper/Stella's relative-similarity loss, written from the report's and the reference code's
    definition as plain loops: the pairs i < j in row-major order, then every two pairs a < b; the
    teacher's order of the two similarities (a tie counts as 'b is larger') sets the sign."""
    sn, tn = [_norm(v.tolist()) for v in s], [_norm(v.tolist()) for v in t]
    pairs = [(i, j) for i in range(len(sn)) for j in range(i + 1, len(sn))]
    p = [_dot(sn[i], sn[j]) for i, j in pairs]
    q = [_dot(tn[i], tn[j]) for i, j in pairs]
    terms = []
    for a in range(len(pairs)):
        for b in range(a + 1, len(pairs)):
            if q[a] > q[b]:  # the teacher finds pair a more similar: the student must, by the margin
                terms.append(max(0.0, margin - (p[a] - p[b])))
            else:
                terms.append(max(0.0, margin - (p[b] - p[a])))
    return sum(terms) / len(terms)


def test_relative_similarity_loss_matches_the_loops(pair):
    s, t = pair
    t = torch.cat([t, t[:, :2]], dim=1)  # another dimension
    for margin in (0.015, 0.3):
        expected = _relative_similarity_reference(s, t, margin)
        assert relative_similarity_loss(s, t, margin).item() == pytest.approx(expected, rel=1e-6)
    # the student that orders every pair as the teacher does, by far more than the margin, costs nothing
    assert relative_similarity_loss(t, t, margin=0.0).item() == 0.0
    assert relative_similarity_loss(t, t, margin=0.015).item() < _relative_similarity_reference(s, t, 0.015)
    # ties in the teacher: the reference's convention (b is the larger)
    same = torch.ones(3, 4, dtype=torch.float64)
    assert relative_similarity_loss(s[:3], same, 0.1).item() == pytest.approx(
        _relative_similarity_reference(s[:3], same, 0.1), rel=1e-6)


def test_relative_similarity_loss_ranks_a_random_subset_of_pairs_when_told(pair):
    s, t = pair  # 5 texts: 10 pairs
    torch.manual_seed(0)
    sub = relative_similarity_loss(s, t, 0.015, max_pairs=6)
    torch.manual_seed(0)
    keep = torch.randperm(10)[:6].sort().values
    pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    # the same loss over a batch made of the kept pairs' vectors: recompute by hand from the kept pairs
    sn, tn = [_norm(v.tolist()) for v in s], [_norm(v.tolist()) for v in t]
    p = [_dot(sn[pairs[k][0]], sn[pairs[k][1]]) for k in keep.tolist()]
    q = [_dot(tn[pairs[k][0]], tn[pairs[k][1]]) for k in keep.tolist()]
    terms = [max(0.0, 0.015 - (1 if q[a] > q[b] else -1) * (p[a] - p[b])) for a in range(6) for b in range(a + 1, 6)]
    assert sub.item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    assert relative_similarity_loss(s, t, 0.015, max_pairs=100).item() == pytest.approx(
        relative_similarity_loss(s, t, 0.015).item())  # fewer pairs than the cap: all of them


def test_pooling_heads_match_loops():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 6, 3, generator=g)
    content = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    batch = {"content_mask": content, "chunk_row": torch.tensor([0, 0, 1, 1]),
             "chunk_start": torch.tensor([1, 2, 1, 3]), "chunk_end": torch.tensor([3, 4, 5, 5]),
             "doc_row": torch.tensor([0, 1]), "doc_start": torch.tensor([0, 0]),
             "token_doc": torch.tensor([[0] * 5 + [-1], [1] * 6])}
    assert torch.equal(CLSPooling()(hidden, batch), hidden[:, 0])
    mean = torch.stack([hidden[0, 1:4].mean(0), hidden[1, 1:5].mean(0)])
    torch.testing.assert_close(MeanPooling()(hidden, batch), mean)
    torch.testing.assert_close(CLSMeanPooling()(hidden, batch), (hidden[:, 0] + mean) / 2)
    spans = [(0, 1, 3), (0, 2, 4), (1, 1, 5), (1, 3, 5)]  # overlapping spans on purpose
    loop = torch.stack([hidden[r, a:b].mean(0) for r, a, b in spans])
    torch.testing.assert_close(ChunkMeanPooling()(hidden, batch), loop)
    # the same two texts packed into one row (text 1 after text 0's 5 tokens): same embeddings
    row = torch.cat([hidden[0, :5], hidden[1]])[None]  # (1, 11, 3)
    packed = {"content_mask": torch.cat([content[0, :5], content[1]])[None], "doc_row": torch.tensor([0, 0]),
              "doc_start": torch.tensor([0, 5]), "token_doc": torch.tensor([[0] * 5 + [1] * 6]),
              "chunk_row": torch.tensor([0, 0, 0, 0]), "chunk_start": torch.tensor([1, 2, 6, 8]),
              "chunk_end": torch.tensor([3, 4, 10, 10])}
    for head in (CLSPooling(), MeanPooling(), CLSMeanPooling(), ChunkMeanPooling()):
        torch.testing.assert_close(head(row, packed), head(hidden, batch))


def test_span_mean_gradients_reach_only_span_tokens():
    hidden = torch.randn(1, 8, 4, requires_grad=True)
    span_mean(hidden, torch.tensor([0]), torch.tensor([2]), torch.tensor([5])).sum().backward()
    touched = hidden.grad.abs().sum(-1)[0] > 0
    assert touched.tolist() == [False, False, True, True, True, False, False, False]
