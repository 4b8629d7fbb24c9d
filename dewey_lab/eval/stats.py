"""How sure a score is: per-query metrics, bootstrap intervals and paired significance tests.

With 10-50 queries per length a difference of 0.1 in Acc@1 is often noise. These helpers say how
much:

* ``per_query``: each judged query's nDCG@1, nDCG@10 and Recall@10, with trec_eval's tie rule (the
  one ``retrieval_metrics`` uses); their means are ``retrieval_metrics``' values.
* ``bootstrap_ci``: a percentile bootstrap interval of the mean over queries (optionally stratified:
  the mean of per-length means, each length resampled on its own).
* ``paired_test``: the mean difference of two systems over the SAME queries, its paired bootstrap
  interval and a two-sided paired randomisation (sign-flip) test p-value, IR's standard test
  (Smucker, Allan & Carterette, CIKM 2007).

Everything is deterministic given ``seed``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from dewey_lab.eval.metrics import relevance_matrix, trec_order

ALPHA = 0.05  # significance level of ``mark``
SIGNIFICANCE_RULE = ("`*`: differs from the reference at p < 0.05 (two-sided paired sign-flip randomisation test "
                     "over the same queries); [lo, hi]: 95% percentile bootstrap interval over queries.")
_CHUNK = 1 << 22  # resampled values held at once (~32 MB of float64)


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


def _weights(n: int, groups: Sequence | None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per-item weights whose weighted sum is the mean of group means, and each group's indices."""
    if groups is None:
        return np.full(n, 1 / n), [np.arange(n)]
    labels = np.asarray(groups)
    if labels.shape != (n,):
        raise ValueError(f"groups must give one label per value ({n}), got {labels.shape}")
    members = [np.flatnonzero(labels == g) for g in dict.fromkeys(labels.tolist())]
    w = np.empty(n)
    for idx in members:
        w[idx] = 1 / (len(members) * len(idx))
    return w, members


def _resampled_means(values: np.ndarray, members: list[np.ndarray], n_boot: int, seed: int) -> np.ndarray:
    """(n_boot,) bootstrap replicates of the mean of group means, each group resampled on its own."""
    rng = np.random.default_rng(seed)
    out = np.zeros(n_boot)
    for idx in members:
        step = max(1, _CHUNK // len(idx))
        for lo in range(0, n_boot, step):
            hi = min(n_boot, lo + step)
            draw = rng.integers(0, len(idx), size=(hi - lo, len(idx)))  # (b, n_g)
            out[lo:hi] += values[idx][draw].mean(1) / len(members)
    return out


def bootstrap_ci(values, level: float = 0.95, n_boot: int = 2000, seed: int = 0,
                 groups: Sequence | None = None) -> tuple[float, float, float]:
    """(mean, lo, hi): the percentile bootstrap interval of the mean over queries.

    Args:
        values: (n,) one score per query.
        level: coverage of the interval.
        n_boot: bootstrap resamples.
        seed: numpy seed; the same seed gives the same interval.
        groups: (n,) a label per value (e.g. the length): the statistic is then the mean of the
            group means (LongEmbed's average over lengths), each group resampled on its own.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("bootstrap_ci: no values; score at least one query")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_ci: level must be in (0, 1), got {level}")
    _, members = _weights(v.size, groups)
    means = _resampled_means(v, members, n_boot, seed)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    mean = sum(v[idx].mean() for idx in members) / len(members)
    return float(mean), float(lo), float(hi)


def paired_test(a, b, n_resamples: int = 10000, seed: int = 0, groups: Sequence | None = None,
                level: float = 0.95) -> dict[str, float]:
    """{"diff", "lo", "hi", "p"}: mean of a - b over the same queries, its paired bootstrap interval, and
    the two-sided sign-flip randomisation p-value.

    p = (1 + #{|mean of sign-flipped differences| >= |observed|}) / (1 + n_resamples); when
    2^n <= n_resamples every sign flip is enumerated and p = #{...} / 2^n exactly.

    Args:
        a, b: (n,) per-query scores of two systems, entry i on the same query i.
        n_resamples: random sign flips (and bootstrap resamples for the interval).
        seed: numpy seed.
        groups: as in ``bootstrap_ci``: the statistic is the mean over groups of the group mean difference.
        level: coverage of the interval.
    """
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_test needs scores on the same queries: got {a.size} and {b.size} values")
    d = a - b
    n = d.size
    diff, lo, hi = bootstrap_ci(d, level=level, n_boot=n_resamples, seed=seed, groups=groups)
    w, _ = _weights(n, groups)
    wd = w * d  # the statistic is sum(sign * wd)
    observed = abs(float(wd.sum()))
    tol = 1e-12 * max(1.0, observed)  # flips that tie the observed value in exact arithmetic count as extreme
    if n <= 62 and 2 ** n <= n_resamples:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)  # (2^n, n) every sign pattern
        p = float(np.mean(np.abs(signs @ wd) >= observed - tol))
    else:
        rng = np.random.default_rng(seed)
        count, step = 0, max(1, _CHUNK // n)
        for start in range(0, n_resamples, step):
            signs = rng.choice(np.array([-1.0, 1.0]), size=(min(step, n_resamples - start), n))  # (b, n)
            count += int(np.sum(np.abs(signs @ wd) >= observed - tol))
        p = (1 + count) / (1 + n_resamples)
    return {"diff": diff, "lo": lo, "hi": hi, "p": p}


def mark(p: float | None, alpha: float = ALPHA) -> str:
    """``*`` where p < alpha (the difference is significant), else ``""``; ``SIGNIFICANCE_RULE`` says so."""
    return "*" if p is not None and p < alpha else ""
