"""Runs that differ only in their seed: one variant, k seeds, and how far its score moves between them.

The convention (``dewey_lab.runs.study_eval`` documents it for study authors): a run's name, an eval study's
``label`` or a training run's variant name, carries its seed as one part ``seed=<n>`` or ``seed_everything=<n>``,
parts separated by ``/`` or ``,``: ``both/seed=1`` in an eval study's runs, ``align=both,seed_everything=1`` from a
sweep that lists ``seed_everything``. The rest of the name is the variant (``both``, ``align=both``).

Two spreads are reported side by side: over seeds, the 95% t-interval of the per-seed scores (training noise);
over queries, the 95% cluster-bootstrap interval of the per-query scores averaged over seeds (which queries
happened to be asked). Rows are ``dewey-lab eval`` rows (``model``, ``mode``, ``task``, ``length``, ``qids``,
``per_query``, optionally ``clusters`` and ``set``).
"""

from __future__ import annotations

import re

import numpy as np

from dewey_lab.eval.report import clusters_of
from dewey_lab.eval.stats import bootstrap_ci, seed_interval

SEED_PART = re.compile(r"(?:^|[/,])(?:seed|seed_everything)=(-?\d+)(?=$|[/,])")


def seed_of(name: str) -> tuple[str, int | None]:
    """``"both/seed=1"`` -> ("both", 1); ``"align=both,seed_everything=2"`` -> ("align=both", 2); a name without a
    seed part -> (name, None)."""
    m = SEED_PART.search(name)
    if not m:
        return name, None
    return (name[:m.start()] + name[m.end():]).strip("/,") or "seeds", int(m.group(1))


def same_queries(x: dict, y: dict) -> bool:
    """Two rows scored the same queries: same length, query ids and (training checks) generated set."""
    return x["length"] == y["length"] and x["qids"] == y["qids"] and x.get("set") == y.get("set")


def seed_runs(rows: list[dict], label: str, task: str, mode: str, length: int | None = None) -> dict | str:
    """{seed: that run's rows of (task, mode), sorted by length}: ``label`` names one run (seed None), else a
    variant whose runs carry seeds. A string instead says why there is none."""
    mine = [r for r in rows if r.get("per_query") and r["task"] == task and r["mode"] == mode
            and (length is None or r["length"] == length)]
    exact = [r for r in mine if r.get("model") == label]
    runs: dict[int | None, list[dict]] = {None: exact} if exact else {}
    if not exact:
        for r in mine:
            variant, seed = seed_of(r.get("model", ""))
            if variant == label and seed is not None:
                runs.setdefault(seed, []).append(r)
    if not runs:
        have = sorted({r.get("model", "") for r in mine})
        return f"no run {label!r} has {task} {mode} rows (runs with them: {', '.join(have) or 'none'})"
    for seed, rs in runs.items():
        rs.sort(key=lambda r: r["length"] or 0)
        if len({r["length"] for r in rs}) < len(rs):
            return (f"{label!r} is ambiguous: several runs of that name score {task} {mode} at one length (e.g. "
                    "one per extension); give each its own label")
    return runs


def pooled(runs: dict) -> tuple[list[float], list, list] | str:
    """Per-query scores averaged over the seeds, each query's length and cluster: (values, groups, clusters); a
    string where the seeds did not score the same queries."""
    first = next(iter(runs.values()))
    for rs in runs.values():
        if len(rs) != len(first) or not all(same_queries(x, y) for x, y in zip(rs, first)):
            return "its seeds did not score the same queries (lengths, query ids or generated sets differ)"
    values = np.mean([[v for r in rs for v in r["per_query"]] for rs in runs.values()], axis=0)  # (Q,)
    groups = [r["length"] for r in first for _ in r["per_query"]]
    return values.tolist(), groups, [c for r in first for c in clusters_of(r)]


def run_score(rs: list[dict]) -> float:
    """One run's score: the mean over lengths of its mean over queries (the summary's number)."""
    return float(np.mean([np.mean(r["per_query"]) for r in rs]))


def seed_summary(rows: list[dict]) -> list[dict]:
    """One entry per (variant with two or more seeds, mode, task): {"variant", "mode", "task", "seeds", "scores",
    "mean", "seed_ci" (t-interval over seeds), "query_ci" (cluster bootstrap of the seed-averaged per-query
    scores, stratified by length; None where the seeds scored different queries)}."""
    seeded: dict[str, set[int]] = {}
    for r in rows:
        variant, seed = seed_of(r.get("model", ""))
        if seed is not None and r.get("per_query"):
            seeded.setdefault(variant, set()).add(seed)
    out = []
    for variant in (v for v, seeds in seeded.items() if len(seeds) > 1):
        named = [r for r in rows if r.get("per_query") and seed_of(r.get("model", ""))[0] == variant]
        for mode in dict.fromkeys(r["mode"] for r in named):
            for task in dict.fromkeys(r["task"] for r in named if r["mode"] == mode):
                runs = seed_runs(rows, variant, task, mode)
                if isinstance(runs, str) or len(runs) < 2:
                    continue
                scores = [run_score(rs) for rs in runs.values()]
                mean, lo, hi = seed_interval(scores)
                values = pooled(runs)
                query_ci = None if isinstance(values, str) else list(bootstrap_ci(values[0], groups=values[1],
                                                                                  clusters=values[2])[1:])
                out.append({"variant": variant, "mode": mode, "task": task, "seeds": sorted(runs), "scores": scores,
                            "mean": mean, "seed_ci": [lo, hi], "query_ci": query_ci})
    return out


def seed_lines(summary: list[dict], what: str) -> list[str]:
    """Markdown: one row per variant and mode, one column per task; ``what`` names the queries' source."""
    if not summary:
        return []
    tasks = list(dict.fromkeys(s["task"] for s in summary))
    lines = [(f"Seeds ({what}): runs whose names differ only in `seed=<n>` / `seed_everything=<n>` are one variant. "
             "Each cell: the mean over seeds (%), `seeds [lo, hi]`: the 95% t-interval over the per-seed scores "
             "(t with k − 1 degrees of freedom: training noise), `queries [lo, hi]`: the 95% cluster-bootstrap "
             "interval of the seed-averaged per-query scores (stratified by length; which queries were asked)."), "",
             "| variant: mode | seeds | " + " | ".join(tasks) + " |", "|---|---|" + "---:|" * len(tasks)]
    for variant, mode in dict.fromkeys((s["variant"], s["mode"]) for s in summary):
        mine = {s["task"]: s for s in summary if (s["variant"], s["mode"]) == (variant, mode)}
        cells = [_cell(mine[t]) if t in mine else "" for t in tasks]
        seeds = sorted({n for s in mine.values() for n in s["seeds"]})
        lines.append(f"| {variant}: {mode} | {', '.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _cell(s: dict) -> str:
    lo, hi = s["seed_ci"]
    text = f"{100 * s['mean']:.2f} seeds [{100 * lo:.2f}, {100 * hi:.2f}]"
    return text + (f" queries [{100 * s['query_ci'][0]:.2f}, {100 * s['query_ci'][1]:.2f}]" if s["query_ci"] else "")
