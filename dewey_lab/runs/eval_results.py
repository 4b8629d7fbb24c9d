"""A study's post-fit results gathered from several ``dewey-lab eval`` invocations into one payload.

A study that trains for hours evaluates each run as it finishes (``dewey-lab eval --config <eval study> --only
<label>``), so that a stop between runs loses nothing already scored and the per-query results can be committed
one run at a time. ``make compare --reuse-eval`` then reads every results file under the study's ``eval/`` folder
and keeps, for each run label, the rows of the newest file that scored it. Files are merged only when they scored
the same tasks, lengths, modes, sets and late-chunk settings as the newest file (the eval arguments other than
``runs``, ``only`` and ``out_dir``); any other file is named in ``skipped`` and left out. Rows follow the eval
study's ``runs`` order, so the first run stays the reference of every paired test, and the summary, intervals,
tests and Holm family are recomputed over the merged rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

VARYING = ("runs", "only")  # the settings one invocation of the same study may differ in


def _label(row: dict) -> str:
    return row.get("model", "?")


def _label_of(run: dict) -> str:
    """A study run's label (label, else model), as its rows name it."""
    return str(run.get("label") or run.get("model"))


def merged_results(folder: Path, config: Path) -> dict:
    """One eval payload from every results file under ``folder`` (the newest file per run label; see above)."""
    from dewey_lab.eval.report import add_statistics, summarize

    files = sorted(Path(folder).glob("*/*.json"))  # <out_dir>/<model>/<UTC time>-<tasks>.json: names sort by time
    if not files:
        raise FileNotFoundError(f"no results of {config} under {folder}; run make compare without --reuse-eval "
                                f"first, or dewey-lab eval --config {config}")
    payloads = [(f, json.loads(f.read_text())) for f in files]
    newest = payloads[-1][1]

    def key(p: dict) -> dict:
        return {k: v for k, v in p.get("settings", {}).items() if k not in VARYING}

    chosen: dict[str, tuple[Path, list[dict]]] = {}
    skipped = []
    for f, p in reversed(payloads):  # newest first: the first file to score a label keeps it
        if key(p) != key(newest):
            skipped.append(str(f))
            continue
        by_label: dict[str, list[dict]] = {}
        for row in p["rows"]:
            by_label.setdefault(_label(row), []).append(row)
        for label, rows in by_label.items():
            chosen.setdefault(label, (f, rows))
    study_runs = (yaml.safe_load(Path(config).read_text()) or {}).get("runs") or []  # the eval study's, in file order
    order = [_label_of(r) for r in study_runs]
    labels = [x for x in order if x in chosen] + sorted(x for x in chosen if x not in order)
    rows = [row for label in labels for row in chosen[label][1]]
    settings = {**key(newest), "runs": [r for r in study_runs if _label_of(r) in chosen]}
    return {"model": "study", "settings": settings, "rows": rows, "summary": summarize(rows),
            **add_statistics(rows), "merged_from": {label: str(chosen[label][0]) for label in labels},
            "skipped": sorted(skipped)}
