"""How sure a score is: per-query metrics, cluster-bootstrap intervals, paired tests and multiplicity.

With 10-50 queries per length a difference of 0.1 in Acc@1 is often noise, and queries asked of the same
document are not independent draws (a model that reads one document badly misses all its queries). These
helpers say how much:

* ``per_query``: each judged query's nDCG@1, nDCG@10 and Recall@10, with trec_eval's tie rule (the
  one ``retrieval_metrics`` uses); their means are ``retrieval_metrics``' values.
* ``bootstrap_ci``: a percentile **cluster** bootstrap interval of the mean over queries. ``clusters`` gives
  each query's cluster (its relevant document): clusters are drawn with replacement, each bringing all its
  queries, and a replicate is the mean over the drawn queries. ``groups`` (the length) stratifies: the
  statistic is the mean of per-stratum means, each stratum resampled on its own (clusters nest in strata:
  one label in two strata is two clusters). Without ``clusters`` every query is its own cluster, which is
  exactly the plain bootstrap (the same draws from the same seed).
* ``paired_test``: the mean difference of two systems over the SAME queries, its paired cluster-bootstrap
  interval and a two-sided cluster sign-flip randomisation p-value (each cluster's summed difference flips
  as a whole), IR's standard paired test (Smucker, Allan & Carterette, CIKM 2007) at the cluster level.
* ``holm``: Holm's step-down adjustment of a family of p-values (``mark`` is then applied to the adjusted p).
* ``seed_interval``: mean and t-interval of a score over training seeds.

Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from dewey_lab.eval.metrics import relevance_matrix, trec_order

ALPHA = 0.05  # significance level of ``mark``
SIGNIFICANCE_RULE = ("`*`: differs from the reference at Holm-adjusted p < 0.05 (two-sided paired cluster sign-flip "
                     "randomisation test over the same queries, queries on one document flipping together); [lo, hi]: "
                     "95% percentile cluster-bootstrap interval (documents resampled with their queries, within each "
                     "length).")
_CHUNK = 1 << 22  # resampled values held at once (~32 MB of float64)
# t quantiles at 0.975 for 1-30 degrees of freedom (beyond: the Cornish-Fisher expansion, within 2e-4)
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)


def per_query(scores: Tensor, qids: Sequence[str], doc_ids: Sequence[str],
              qrels: dict[str, dict[str, int]]) -> dict[str, np.ndarray]:
    """{"ndcg@1", "ndcg@10", "recall@10": (Q',) float64} for the Q' queries with a relevant document,
    in the order of ``qids`` (queries without one are skipped, as ``retrieval_metrics`` skips them).

    Gains are the graded relevance (linear, as trec_eval's ndcg_cut); ties are broken by document id
    descending (``trec_order``).
    """
    preds = trec_order(scores.float().cpu(), doc_ids)  # (Q, N), no ties
    target = relevance_matrix(qids, doc_ids, qrels).double()  # (Q, N)
    keep = target.sum(1) > 0
    preds, target = preds[keep], target[keep]
    order = preds.argsort(dim=1, descending=True)  # (Q', N): best first
    ranked = target.gather(1, order)  # (Q', N) gains in ranked order
    ideal = target.sort(dim=1, descending=True).values  # (Q', N)
    discount = 1 / torch.log2(torch.arange(target.shape[1], dtype=torch.float64) + 2)  # (N,)
    out = {}
    for k in (1, 10):
        dcg = (ranked[:, :k] * discount[:k]).sum(1)
        idcg = (ideal[:, :k] * discount[:k]).sum(1)
        out[f"ndcg@{k}"] = (dcg / idcg).numpy()
    out["recall@10"] = ((ranked[:, :10] > 0).sum(1) / (target > 0).sum(1)).double().numpy()
    return out


def query_clusters(qids: Sequence[str], qrels: dict[str, dict[str, int]]) -> list[str]:
    """Each judged query's cluster: its relevant document (the first in sorted order when it has several)."""
    return [min(d for d, rel in qrels[q].items() if rel > 0) for q in qids]


def _design(n: int, groups: Sequence | None, clusters: Sequence | None) -> tuple[list[tuple[np.ndarray, np.ndarray]],
                                                                                  np.ndarray, np.ndarray]:
    """The resampling design of n values.

    Returns (strata, weights, codes): per stratum (its value indices, each one's cluster 0..C-1 within it, in
    order of first appearance); per-value weights whose weighted sum is the mean of stratum means; and each
    value's cluster over all strata, in order of first appearance (the sign-flip test's units).
    """
    labels = [None] * n if groups is None else list(groups)
    units = list(range(n)) if clusters is None else list(clusters)
    if len(labels) != n or len(units) != n:
        raise ValueError(f"groups and clusters must give one label per value ({n}), got "
                         f"{len(labels)} and {len(units)}")
    codes = np.empty(n, dtype=np.int64)
    seen: dict = {}
    for i, key in enumerate(zip(labels, units)):  # a cluster lives in one stratum
        codes[i] = seen.setdefault(key, len(seen))
    strata, weights = [], np.empty(n)
    members = {}
    for i, g in enumerate(labels):
        members.setdefault(g, []).append(i)
    for idx in members.values():
        idx = np.asarray(idx)
        _, local = np.unique(codes[idx], return_inverse=True)  # codes rise with first appearance: order kept
        strata.append((idx, local.reshape(-1)))
        weights[idx] = 1 / (len(members) * len(idx))
    return strata, weights, codes


def _resampled_means(values: np.ndarray, strata: list[tuple[np.ndarray, np.ndarray]], n_boot: int,
                     seed: int) -> np.ndarray:
    """(n_boot,) cluster-bootstrap replicates of the mean of stratum means, each stratum resampled on its own.

    A replicate of a stratum draws its C clusters C times with replacement; its value is the sum of the drawn
    clusters' scores over the number of their queries (the mean over the drawn queries).
    """
    rng = np.random.default_rng(seed)
    out = np.zeros(n_boot)
    for idx, local in strata:
        n_clusters = int(local.max()) + 1
        sums = np.bincount(local, weights=values[idx], minlength=n_clusters)  # (C,) per-cluster score sums
        sizes = np.bincount(local, minlength=n_clusters).astype(np.float64)  # (C,) queries per cluster
        step = max(1, _CHUNK // n_clusters)
        for lo in range(0, n_boot, step):
            hi = min(n_boot, lo + step)
            draw = rng.integers(0, n_clusters, size=(hi - lo, n_clusters))  # (b, C)
            out[lo:hi] += sums[draw].sum(1) / sizes[draw].sum(1) / len(strata)
    return out


def bootstrap_ci(values, level: float = 0.95, n_boot: int = 2000, seed: int = 0,
                 groups: Sequence | None = None, clusters: Sequence | None = None) -> tuple[float, float, float]:
    """(mean, lo, hi): the percentile cluster-bootstrap interval of the mean over queries.

    Args:
        values: (n,) one score per query.
        level: coverage of the interval.
        n_boot: bootstrap resamples.
        seed: numpy seed; the same seed gives the same interval.
        groups: (n,) a label per value (e.g. the length): the statistic is then the mean of the
            group means (LongEmbed's average over lengths), each group resampled on its own.
        clusters: (n,) each value's cluster (e.g. its relevant document): clusters resample whole. None: each
            value its own cluster (the plain bootstrap).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("bootstrap_ci: no values; score at least one query")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_ci: level must be in (0, 1), got {level}")
    strata, _, _ = _design(v.size, groups, clusters)
    means = _resampled_means(v, strata, n_boot, seed)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    mean = sum(v[idx].mean() for idx, _ in strata) / len(strata)
    return float(mean), float(lo), float(hi)


def paired_test(a, b, n_resamples: int = 10000, seed: int = 0, groups: Sequence | None = None,
                level: float = 0.95, clusters: Sequence | None = None) -> dict[str, float]:
    """{"diff", "lo", "hi", "p"}: mean of a - b over the same queries, its paired cluster-bootstrap interval,
    and the two-sided cluster sign-flip randomisation p-value.

    The statistic is sum over clusters of w_c * D_c (D_c: the cluster's summed difference, w_c: 1 / (strata x
    queries in its stratum)); a flip multiplies each cluster's term by +-1.
    p = (1 + #{|flipped statistic| >= |observed|}) / (1 + n_resamples); when 2^C <= n_resamples (C clusters)
    every sign pattern is enumerated and p = #{...} / 2^C exactly.

    Args:
        a, b: (n,) per-query scores of two systems, entry i on the same query i.
        n_resamples: random sign flips (and bootstrap resamples for the interval).
        seed: numpy seed.
        groups: as in ``bootstrap_ci``: the statistic is the mean over groups of the group mean difference.
        level: coverage of the interval.
        clusters: as in ``bootstrap_ci``; None: each query its own cluster.
    """
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_test needs scores on the same queries: got {a.size} and {b.size} values")
    d = a - b
    diff, lo, hi = bootstrap_ci(d, level=level, n_boot=n_resamples, seed=seed, groups=groups, clusters=clusters)
    _, w, codes = _design(d.size, groups, clusters)
    wd = np.bincount(codes, weights=w * d)  # (C,) each cluster's term; the statistic is sum(sign * wd)
    n = wd.size
    observed = abs(float(wd.sum()))
    tol = 1e-12 * max(1.0, observed)  # flips that tie the observed value in exact arithmetic count as extreme
    if n <= 62 and 2 ** n <= n_resamples:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)  # (2^C, C) every sign pattern
        p = float(np.mean(np.abs(signs @ wd) >= observed - tol))
    else:
        rng = np.random.default_rng(seed)
        count, step = 0, max(1, _CHUNK // n)
        for start in range(0, n_resamples, step):
            signs = rng.choice(np.array([-1.0, 1.0]), size=(min(step, n_resamples - start), n))  # (b, C)
            count += int(np.sum(np.abs(signs @ wd) >= observed - tol))
        p = (1 + count) / (1 + n_resamples)
    return {"diff": diff, "lo": lo, "hi": hi, "p": p}


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values of one family (None entries are no test and stay None).

    Sorted ascending p_(1) <= ... <= p_(m): adjusted p_(i) = min(1, max over j <= i of (m - j + 1) p_(j)); a
    test is significant at level alpha where its adjusted p < alpha (the family-wise error rate is then at most
    alpha under any dependence between the tests).
    """
    tested = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        out[i] = running
    return out


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (a two-sided 95% interval)."""
    if df < 1:
        raise ValueError(f"t_quantile: df must be at least 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def seed_interval(values: Sequence[float]) -> tuple[float, float | None, float | None]:
    """(mean, lo, hi): the mean of one score over k training seeds and its 95% t-interval
    mean -+ t(0.975, k - 1) * sd / sqrt(k); lo and hi are None with a single seed."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("seed_interval: no values")
    mean = float(v.mean())
    if v.size < 2:
        return mean, None, None
    half = t_quantile(v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return mean, mean - half, mean + half


def mark(p: float | None, alpha: float = ALPHA) -> str:
    """``*`` where p < alpha (the difference is significant), else ``""``; give it the Holm-adjusted p of a table's
    family (``holm``), as ``SIGNIFICANCE_RULE`` says."""
    return "*" if p is not None and p < alpha else ""
