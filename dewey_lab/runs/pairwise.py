"""Every pair of a study's trained variants on its post-fit evaluation: paired differences, intervals, Holm.

The post-fit table (``dewey_lab.runs.study_eval``) tests each run against one reference; a study with three
variants and a start also asks how the variants differ from each other. This table answers it for every pair:

* the pairs: every two variants of the study (the runs whose model is one of the study's run directories,
  ``runs/<study>/...``; a later variant minus an earlier one, in the eval study's order), then each variant
  against every other trained student of the evaluation (the start a study continues from: ``start``). Reference
  models (teacher, BM25, the controls) and ``untrained:<run>`` are left out: they are context, not variants;
* a variant run with several seeds (``dewey_lab.runs.seeds``: labels ``both/seed=0``, ...) enters with its
  per-query scores averaged over its seeds, as the primary endpoint does (``dewey_lab.runs.endpoint``);
* per pair, scoring mode and task: the mean of a - b over the same queries (synthetic tasks: all lengths,
  stratified, the mean of per-length means; real-text tasks: the one set), its 95% paired cluster-bootstrap
  interval and the two-sided cluster sign-flip p (``dewey_lab.eval.stats.paired_test``), Holm-adjusted
  (``stats.holm``) over this table's family: every cell of it (each pair x mode x task), m stated in the caption;
* a cell the results cannot pair (a mode one side lacks, other queries) is left empty, never guessed.
"""

from __future__ import annotations

import os
from pathlib import Path

from dewey_lab.eval.stats import holm, mark, paired_test
from dewey_lab.runs.seeds import pooled, same_queries, seed_of, seed_runs


def _under(spec: str, root: Path) -> bool:
    """Whether an eval run's model spec names a run directory (or checkpoint) under the study's run folder."""
    return Path(os.path.abspath(spec)).is_relative_to(os.path.abspath(root))


def trained_variants(payload: dict, study_root: Path | None = None) -> tuple[list[str], list[str]]:
    """(the study's variants, the other trained students), by label with seeds merged, in the eval's order.
    Without ``study_root`` every trained student is a variant."""
    from dewey_lab.eval.load import UNTRAINED, is_student
    from dewey_lab.eval.run import NO_MODEL

    specs = {r.get("label") or str(r["model"]): str(r["model"]) for r in payload.get("settings", {}).get("runs") or []}
    variants: dict[str, None] = {}
    others: dict[str, None] = {}
    for r in payload["rows"]:
        label = r.get("model")
        spec = specs.get(label)
        if not label or spec is None or r.get("context") or spec in NO_MODEL or spec.startswith(UNTRAINED):
            continue
        name = seed_of(label)[0]
        if study_root is None or _under(spec, study_root):
            variants[name] = None
        elif is_student(spec):
            others[name] = None
    return list(variants), [o for o in others if o not in variants]


def pairs_of(variants: list[str], others: list[str]) -> list[tuple[str, str]]:
    """(a, b) for a - b: each later variant against each earlier one, then each variant against each other."""
    return [(variants[j], variants[i]) for j in range(len(variants)) for i in range(j)] + \
        [(v, o) for o in others for v in variants]


def pairwise(payload: dict, study_root: Path | None = None) -> dict:
    """{"pairs": [(a, b)], "variants", "others", "cells": [{"a", "b", "mode", "task", "diff", "lo", "hi", "p",
    "p_holm", "n_queries", "seeds_a", "seeds_b"}], "m": the Holm family's size}."""
    rows = [r for r in payload["rows"] if r.get("per_query")]
    variants, others = trained_variants(payload, study_root)
    pairs = pairs_of(variants, others)
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    cells = []
    for a, b in pairs:
        for mode in modes:
            for task in tasks:
                cell = _cell(rows, a, b, mode, task)
                if cell is not None:
                    cells.append(cell)
    for cell, adjusted in zip(cells, holm([c["p"] for c in cells])):
        cell["p_holm"] = adjusted
    return {"pairs": pairs, "variants": variants, "others": others, "cells": cells, "m": len(cells)}


def _cell(rows: list[dict], a: str, b: str, mode: str, task: str) -> dict | None:
    """The paired test of a - b in one mode and task (seed-averaged sides), or None where they cannot pair."""
    sides = []
    for name in (a, b):
        runs = seed_runs(rows, name, task, mode)
        values = runs if isinstance(runs, str) else pooled(runs)
        if isinstance(values, str):
            return None
        sides.append((runs, values))
    (runs_a, (va, groups, clusters)), (runs_b, (vb, _, _)) = sides
    first_a, first_b = next(iter(runs_a.values())), next(iter(runs_b.values()))
    if len(first_a) != len(first_b) or not all(same_queries(x, y) for x, y in zip(first_a, first_b)):
        return None
    test = paired_test(va, vb, groups=groups, clusters=clusters)
    return {"a": a, "b": b, "mode": mode, "task": task, **test, "n_queries": len(va),
            "seeds_a": sorted(s for s in runs_a if s is not None), "seeds_b": sorted(s for s in runs_b if s is not None)}


def pairwise_lines(result: dict) -> list[str]:
    """Markdown: a caption naming the pairs and the Holm family, one row per pair and mode, one column per task."""
    cells = result["cells"]
    if not cells:
        return []
    tasks = list(dict.fromkeys(c["task"] for c in cells))
    others = f", then each against {', '.join(result['others'])}" if result["others"] else ""
    lines = [(f"Pairwise differences between the study's variants ({', '.join(result['variants'])}: every pair, the "
              f"later minus the earlier{others}): mean a − b in points over the same queries, its 95% paired "
              "cluster-bootstrap interval, and p: the two-sided cluster sign-flip p, Holm-adjusted over this "
              f"table's family (m = {result['m']}: every cell, i.e. each pair x mode x task), `*` where it is below "
              "0.05. Synthetic tasks: Acc@1 over all lengths, stratified by length; real-text tasks: nDCG@10. A "
              "variant with several seeds enters with its per-query scores averaged over them. Reference models, "
              "the controls and untrained runs are not variants and are left out."), "",
             "| a − b | mode | " + " | ".join(tasks) + " |", "|---|---|" + "---:|" * len(tasks)]
    for a, b in result["pairs"]:
        for mode in dict.fromkeys(c["mode"] for c in cells):
            mine = {c["task"]: c for c in cells if (c["a"], c["b"], c["mode"]) == (a, b, mode)}
            if mine:
                lines.append(f"| {a} − {b} | {mode} | " + " | ".join(_text(mine.get(t)) for t in tasks) + " |")
    return [*lines, ""]


def _text(c: dict | None) -> str:
    if c is None:
        return ""
    star = mark(c["p_holm"])
    return (f"{100 * c['diff']:+.2f} [{100 * c['lo']:+.2f}, {100 * c['hi']:+.2f}] p = {c['p_holm']:.3g}"
            + (f" {star}" if star else ""))
