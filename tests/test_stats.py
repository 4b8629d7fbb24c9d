"""Intervals and paired tests (``dewey_lab.eval.stats``) against independent references: hand-written
enumeration of sign flips and of cluster resamples, the textbook bootstrap, the normal approximation, scipy's
bootstrap and t quantiles, Holm by hand, and ``retrieval_metrics``."""

import itertools
import math

import numpy as np
import pytest
import torch

from dewey_lab.eval.metrics import retrieval_metrics
from dewey_lab.eval.stats import (
    bootstrap_ci,
    holm,
    mark,
    paired_test,
    per_query,
    query_clusters,
    seed_interval,
    t_quantile,
)


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


# -- clusters, Holm, seeds -------------------------------------------------------------------------------------


def _plain_bootstrap(v, n_boot, seed, groups=None):
    """The textbook stratified percentile bootstrap, written out: every stratum's queries drawn with replacement."""
    rng = np.random.default_rng(seed)
    labels = [None] * len(v) if groups is None else groups
    strata = [np.flatnonzero(np.asarray(labels, dtype=object) == g) for g in dict.fromkeys(labels)]
    reps = sum(v[idx][rng.integers(0, len(idx), size=(n_boot, len(idx)))].mean(1) for idx in strata) / len(strata)
    return np.quantile(reps, [0.025, 0.975])


@pytest.mark.parametrize("grouped", [False, True])
def test_one_query_per_cluster_is_the_plain_bootstrap_exactly(grouped):
    rng = np.random.default_rng(4)
    v = rng.random(23)
    groups = [int(g) for g in rng.integers(0, 3, 23)] if grouped else None
    lo, hi = _plain_bootstrap(v, 3000, 5, groups)
    assert bootstrap_ci(v, n_boot=3000, seed=5, groups=groups)[1:] == pytest.approx((lo, hi), abs=1e-12)  # same draws
    own = [f"doc{i}" for i in range(23)]
    assert bootstrap_ci(v, n_boot=3000, seed=5, groups=groups, clusters=own) == bootstrap_ci(v, n_boot=3000, seed=5,
                                                                                            groups=groups)
    w = rng.random(23)
    assert paired_test(v, w, groups=groups, clusters=own) == paired_test(v, w, groups=groups)


def test_cluster_bootstrap_is_the_enumerated_resampling_distribution():
    """Three documents (two queries on the first): all 3^3 cluster resamples are equally likely; the replicate is
    the mean over the drawn queries. The sampled interval's ends are the exact distribution's 2.5% / 97.5% atoms."""
    v, clusters = np.array([1.0, 0.8, 0.0, 0.3]), ["a", "a", "b", "c"]
    sums, sizes = {"a": 1.8, "b": 0.0, "c": 0.3}, {"a": 2, "b": 1, "c": 1}
    atoms = sorted(sum(sums[k] for k in draw) / sum(sizes[k] for k in draw)
                   for draw in itertools.product("abc", repeat=3))  # 27 equiprobable replicates
    exact_lo, exact_hi = atoms[0], atoms[-1]  # each end atom has mass 1/27 > 2.5%
    mean, lo, hi = bootstrap_ci(v, clusters=clusters, n_boot=20000)
    assert mean == pytest.approx(v.mean())
    assert lo == pytest.approx(exact_lo) and hi == pytest.approx(exact_hi)
    # the 20% / 80% quantiles land on interior atoms too (no atom within 1% of mass of those cuts)
    _, lo80, hi80 = bootstrap_ci(v, clusters=clusters, n_boot=20000, level=0.6)
    cdf = np.arange(1, 28) / 27
    assert lo80 == pytest.approx(atoms[int(np.searchsorted(cdf, 0.2))])
    assert hi80 == pytest.approx(atoms[int(np.searchsorted(cdf, 0.8))])


def test_queries_on_one_document_widen_the_interval():
    """20 documents, two queries each scoring alike: the cluster interval is ~sqrt(2) wider than the one that
    treats the 40 queries as independent."""
    per_doc = np.random.default_rng(2).random(20) > 0.5
    v = np.repeat(per_doc.astype(float), 2)
    clusters = np.repeat([f"d{i}" for i in range(20)], 2).tolist()
    _, lo, hi = bootstrap_ci(v, n_boot=8000)
    _, clo, chi = bootstrap_ci(v, n_boot=8000, clusters=clusters)
    assert 1.25 < (chi - clo) / (hi - lo) < 1.6
    p_plain = paired_test(v, np.zeros(40) + 0.5, clusters=None)["p"]
    p_clustered = paired_test(v, np.zeros(40) + 0.5, clusters=clusters)["p"]
    assert p_clustered > p_plain  # 2^20 flips of 20 units, not 2^40 of 40


def test_cluster_sign_flip_p_is_exact_enumeration():
    """Strata of 3 and 4 queries, clusters nested in them: flipping every pattern of the 4 clusters' signs by hand."""
    d = np.array([0.5, 0.25, -1.0, 1.0, 1.0, 0.5, 0.0])
    groups = [1, 1, 1, 2, 2, 2, 2]
    clusters = ["x", "x", "y", "x", "z", "z", "w"]  # "x" in two strata: two clusters
    units = list(dict.fromkeys(zip(groups, clusters)))

    def statistic(sign):
        flipped = np.array([sign[units.index(u)] for u in zip(groups, clusters)]) * d
        return abs(np.mean(flipped[:3]) + np.mean(flipped[3:])) / 2

    observed = statistic([1] * len(units))
    flips = [statistic(s) for s in itertools.product((1, -1), repeat=len(units))]
    expected = sum(f >= observed - 1e-12 for f in flips) / len(flips)
    out = paired_test(d, np.zeros(7), groups=groups, clusters=clusters)
    assert out["p"] == pytest.approx(expected) and out["diff"] == pytest.approx((np.mean(d[:3]) + np.mean(d[3:])) / 2)


def test_query_clusters_take_the_first_relevant_document():
    qrels = {"q1": {"d9": 1, "d2": 2, "d0": 0}, "q2": {"d5": 1}}
    assert query_clusters(["q2", "q1"], qrels) == ["d5", "d2"]  # d0 is judged not relevant


def test_holm_by_hand():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, None, 0.6]) == pytest.approx([1.0, None, 1.0])  # 2 x 0.5 = 1, capped; None is no test
    assert holm([]) == [] and holm([0.2]) == [0.2]


def test_holm_matches_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    p = np.random.default_rng(0).random(12) ** 3
    assert holm(p.tolist()) == pytest.approx(multitest.multipletests(p, method="holm")[1].tolist())


def test_seed_interval_is_the_t_interval():
    mean, lo, hi = seed_interval([0.6, 0.8])  # sd 0.1414, se 0.1, t(0.975, 1) = 12.706
    assert mean == pytest.approx(0.7) and (lo, hi) == pytest.approx((0.7 - 1.27062, 0.7 + 1.27062))
    assert seed_interval([0.5]) == (0.5, None, None)
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 29, 30, 31, 45, 100, 1000):
        assert t_quantile(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-4), df
