"""Intervals and paired tests (``dewey_lab.eval.stats``) against independent references: hand-written
enumeration of sign flips, the normal approximation, scipy's bootstrap, and ``retrieval_metrics``."""

import itertools
import math

import numpy as np
import pytest
import torch

from dewey_lab.eval.metrics import retrieval_metrics
from dewey_lab.eval.stats import bootstrap_ci, mark, paired_test, per_query


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("graded", [False, True])
def test_per_query_means_are_retrieval_metrics_with_ties(seed, graded):
    g = torch.Generator().manual_seed(seed)
    Q, N = 30, 40
    scores = torch.randint(0, 5, (Q, N), generator=g).float() / 4  # coarse grid: many ties
    doc_ids = [f"d{int(x)}" for x in torch.randperm(500, generator=g)[:N]]
    qids = [f"q{i}" for i in range(Q)]
    qrels = {}
    for i, q in enumerate(qids[:-2]):  # two unjudged queries: skipped by both
        rel = torch.randperm(N, generator=g)[: 1 + i % 3]
        qrels[q] = {doc_ids[int(j)]: (1 + int(torch.randint(0, 3, (1,), generator=g)) if graded else 1) for j in rel}
    per = per_query(scores, qids, doc_ids, qrels)
    means = retrieval_metrics(scores, qids, doc_ids, qrels)
    assert all(len(v) == Q - 2 for v in per.values())
    for k, v in per.items():
        assert v.mean() == pytest.approx(means[k], abs=1e-6), k


def test_per_query_acc_at_1_by_hand():
    scores = torch.tensor([[0.5, 0.5, 0.1], [0.2, 0.9, 0.9], [0.3, 0.2, 0.1]])
    # q0: tie between a and b -> larger id "b" first (relevant); q1: tie b/c -> "c" first (b relevant); q2: a first
    per = per_query(scores, ["q0", "q1", "q2"], ["a", "b", "c"], {"q0": {"b": 1}, "q1": {"b": 1}, "q2": {"c": 1}})
    assert per["ndcg@1"].tolist() == [1.0, 0.0, 0.0]
    assert per["ndcg@10"].tolist() == pytest.approx([1.0, 1 / math.log2(3), 1 / math.log2(4)])
    assert per["recall@10"].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("n", [1, 5, 9])
def test_sign_flip_p_is_exact_enumeration(n):
    rng = np.random.default_rng(n)
    a, b = rng.integers(0, 2, n).astype(float), rng.random(n)
    d = a - b
    flips = [abs(sum(s * x for s, x in zip(signs, d)) / n) for signs in itertools.product((1, -1), repeat=n)]
    expected = sum(f >= abs(d.mean()) - 1e-12 for f in flips) / 2 ** n
    out = paired_test(a, b)
    assert out["p"] == pytest.approx(expected) and out["diff"] == pytest.approx(d.mean())
    assert out["lo"] <= out["diff"] <= out["hi"]


def test_random_sign_flips_approach_the_exact_p():
    rng = np.random.default_rng(3)
    a, b = (rng.random(12) > 0.3).astype(float), (rng.random(12) > 0.6).astype(float)
    exact = paired_test(a, b, n_resamples=5000)  # 2^12 = 4096 <= 5000: enumerated
    sampled = paired_test(a, b, n_resamples=4000, seed=1)
    assert sampled["p"] == pytest.approx(exact["p"], abs=0.02)
    assert paired_test(a, b, n_resamples=4000, seed=1) == sampled  # deterministic given the seed


def test_identical_systems_and_a_clear_win():
    x = np.random.default_rng(0).random(30)
    same = paired_test(x, x)
    assert same["p"] == 1.0 and same["diff"] == same["lo"] == same["hi"] == 0.0 and mark(same["p"]) == ""
    win = paired_test(np.ones(40), np.zeros(40))
    assert win["p"] == pytest.approx(1 / 10001) and mark(win["p"]) == "*"


def test_constant_vector_has_zero_width():
    assert bootstrap_ci(np.full(17, 0.7)) == pytest.approx((0.7, 0.7, 0.7))


def test_bernoulli_half_width_is_the_normal_one():
    v = np.random.default_rng(0).permutation(np.repeat([0.0, 1.0], 200))  # n = 400, mean 0.5
    mean, lo, hi = bootstrap_ci(v, n_boot=4000)
    assert mean == 0.5
    assert (hi - lo) / 2 == pytest.approx(1.96 * math.sqrt(0.25 / 400), abs=0.01)
    assert bootstrap_ci(v, n_boot=4000) == (mean, lo, hi)  # same seed, same interval


def test_interval_matches_scipy_percentile_bootstrap():
    stats = pytest.importorskip("scipy.stats")
    v = np.random.default_rng(1).random(50) ** 2
    ref = stats.bootstrap((v,), np.mean, confidence_level=0.95, n_resamples=4000, method="percentile",
                          random_state=np.random.default_rng(7)).confidence_interval
    _, lo, hi = bootstrap_ci(v, n_boot=4000, seed=0)
    assert lo == pytest.approx(ref.low, abs=0.01) and hi == pytest.approx(ref.high, abs=0.01)


def test_grouped_mean_is_the_mean_of_group_means():
    a = np.array([1.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # group x: mean 1; group y: mean 0
    groups = ["x", "x", "y", "y", "y", "y"]
    mean, lo, hi = bootstrap_ci(a, groups=groups)
    assert mean == pytest.approx(0.5) and lo == hi == pytest.approx(0.5)  # each group is constant
    out = paired_test(a, np.zeros(6), groups=groups)
    # weights 1/4 (x) and 1/8 (y, all zero diffs): |flipped| >= 0.5 only when both x signs agree
    assert out["diff"] == pytest.approx(0.5) and out["p"] == pytest.approx(0.5)
