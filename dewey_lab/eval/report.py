"""Results: score rows -> per-task summaries, the LongEmbed average, JSON and a markdown table.

A row is one (task, length, mode) with every metric; the summary averages the main metric over
lengths per task (the paper's passkey / needle score) and, when all six LongEmbed tasks were run
in a mode, their mean (the paper's "Avg."). In a study every interval is a cluster bootstrap (queries on one
document resample together) and every ``*`` a Holm-adjusted paired test against the mode's reference, the
family being every test of the evaluation (``holm_family``). Files are written whole or not at all (temp
file + rename), so a crash never leaves a half-written result.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

from dewey_lab.eval.stats import SIGNIFICANCE_RULE, bootstrap_ci, holm, mark, paired_test
from dewey_lab.files import atomic_write

LONGEMBED_SIX = ("passkey", "needle", "narrativeqa", "qmsum", "2wikimqa", "summ_screen_fd")
HOLM_FAMILY = ("every paired test against the reference in this evaluation: each other run x mode x task x "
               "length, and each average over lengths")


def summarize(rows: list[dict]) -> dict:
    """{mode: {task: mean main score over lengths, ..., "longembed_avg": mean of six}} in percent."""
    out: dict[str, dict[str, float]] = {}
    for mode in dict.fromkeys(_run(r) for r in rows):
        per_task: dict[str, list[float]] = {}
        for r in rows:
            if _run(r) == mode:
                per_task.setdefault(r["task"], []).append(r["main"])
        scores = {t: 100 * sum(v) / len(v) for t, v in per_task.items()}
        if all(t in scores for t in LONGEMBED_SIX):
            scores["longembed_avg"] = sum(scores[t] for t in LONGEMBED_SIX) / len(LONGEMBED_SIX)
        out[mode] = scores
    return out


def add_statistics(rows: list[dict]) -> dict:
    """Intervals for the summary and paired tests against a reference, from the rows' ``per_query`` scores.

    The reference of a mode is its first run (``_run``: model + extension, e.g. the unextended model);
    rows marked ``context`` (a study's baselines and controls, ``run._context_runs``) get intervals only. Every
    other run of that mode is tested against it on the same task, length and queries, each row
    gaining ``vs_ref`` {"ref", "diff", "lo", "hi", "p", "p_holm"}. Intervals and tests are cluster bootstraps
    and cluster sign flips over the rows' ``clusters`` (each query's relevant document; rows written before
    it existed: one cluster per query). Returns {"summary_ci": {run: {task: [lo, hi]}} (stratified over
    lengths: the interval of the mean over lengths), "reference": {mode: run},
    "summary_vs_ref": {run: {task: {"diff", "lo", "hi", "p", "p_holm"}}} and "holm" (``holm_family``) where
    there is more than one run}. Rows without ``per_query`` (results written before it existed) get nothing.
    """
    scored = [r for r in rows if r.get("per_query")]
    by_run: dict[str, dict[str, list[dict]]] = {}  # run -> task -> rows over lengths
    for r in scored:
        by_run.setdefault(_run(r), {}).setdefault(r["task"], []).append(r)
    summary_ci = {run: {t: _interval(*_stacked(rs)) for t, rs in tasks.items()} for run, tasks in by_run.items()}
    scored = [r for r in scored if not r.get("context")]  # context rows (baselines, controls): intervals, no test
    by_run = {run: tasks for run, tasks in by_run.items() if any(not r.get("context") for rs in tasks.values()
                                                                 for r in rs)}
    reference: dict[str, str] = {}
    for r in scored:
        reference.setdefault(r["mode"], _run(r))
    out: dict = {"summary_ci": summary_ci}
    if len(by_run) <= len(reference):  # one run per mode: nothing to compare
        return out
    ref_rows = {(r["mode"], r["task"], r["length"]): r for r in scored if _run(r) == reference[r["mode"]]}
    vs: dict[str, dict[str, dict]] = {}
    for run, tasks in by_run.items():
        for task, rs in tasks.items():
            mode = rs[0]["mode"]
            if run == reference[mode]:
                continue
            refs = [ref_rows.get((mode, task, r["length"])) for r in rs]
            paired = [(r, f) for r, f in zip(rs, refs) if f is not None and f["qids"] == r["qids"]]
            for r, f in paired:
                r["vs_ref"] = {"ref": reference[mode], **_rounded(paired_test(r["per_query"], f["per_query"],
                                                                              clusters=clusters_of(r)))}
            if paired and len(paired) == len(rs):  # the average only over the same lengths and queries
                a, groups, clusters = _stacked([r for r, _ in paired])
                b, _, _ = _stacked([f for _, f in paired])
                vs.setdefault(run, {})[task] = _rounded(paired_test(a, b, groups=groups, clusters=clusters))
    return {**out, "reference": reference, "summary_vs_ref": vs, "holm": holm_family(rows, vs)}


def holm_family(rows: list[dict], summary_vs_ref: dict) -> dict:
    """Holm-adjust, in place, the family of every test against the reference in one evaluation: each row's
    ``vs_ref`` (run x mode x task x length) and each average over lengths (``summary_vs_ref``; a task scored at
    one length has one test, counted once). Each test gains ``p_holm`` beside its raw ``p``; returns
    {"family": what the family is, "m": its size}, which the tables' captions quote."""
    tests = [r["vs_ref"] for r in rows if r.get("vs_ref")]
    rows_of: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r.get("vs_ref"):
            rows_of.setdefault((_run(r), r["task"]), []).append(r)
    linked = []  # (summary test, the one row test it repeats)
    for run, tasks in summary_vs_ref.items():
        for task, test in tasks.items():
            rs = rows_of.get((run, task), [])
            if len(rs) == 1:
                linked.append((test, rs[0]["vs_ref"]))
            else:
                tests.append(test)
    for test, p in zip(tests, holm([t["p"] for t in tests])):
        test["p_holm"] = round(p, 6)
    for test, same in linked:
        test["p_holm"] = same["p_holm"]
    return {"family": HOLM_FAMILY, "m": len(tests)}


def clusters_of(row: dict) -> list:
    """Each of a row's queries' cluster: ``clusters`` (its relevant document), else the query itself."""
    clusters = row.get("clusters") or row["qids"]
    if len(clusters) != len(row["per_query"]):
        raise ValueError(f"{row.get('task')}: {len(clusters)} clusters for {len(row['per_query'])} queries; "
                         "rerun dewey-lab eval to rewrite the results")
    return list(clusters)


def _stacked(rows: list[dict]) -> tuple[list[float], list, list]:
    """Per-query scores of one run's rows over lengths, each score's length (the bootstrap's strata) and its
    cluster."""
    values = [v for r in rows for v in r["per_query"]]
    return values, [r["length"] for r in rows for _ in r["per_query"]], [c for r in rows for c in clusters_of(r)]


def _interval(values: list[float], lengths: list, clusters: list | None = None) -> list[float]:
    return [round(x, 6) for x in bootstrap_ci(values, groups=lengths, clusters=clusters)[1:]]


def _rounded(d: dict) -> dict:
    return {k: round(v, 6) for k, v in d.items()}


def _run(row: dict) -> str:
    """``single``, or ``single + pcw to 4096`` when the row ran through an extension (to its target length)."""
    ext = row.get("extension", "none")
    label = row["mode"] if ext == "none" else f"{row['mode']} + {ext}"
    if ext != "none" and row.get("target"):  # the same method to 1k and to 4k are two runs (s = 2, s = 8)
        label += f" to {row['target']}"
    return f"{row['model']}: {label}" if "model" in row else label  # a study's rows name their model


def pooling_lines(rows: list[dict]) -> list[str]:
    """Markdown lines saying how each mode pooled queries and passages (the rows' ``query_pooling`` /
    ``passage_pooling``, written by ``DenseRetriever.pooling_of``), one line per (mode, query, passages) with
    the runs that share it; none for rows without them (BM25, the controls, results written before 2026-12)."""
    seen: dict[tuple[str, str, str], list[str]] = {}
    for r in rows:
        if r.get("query_pooling"):
            runs = seen.setdefault((r["mode"], r["query_pooling"], r["passage_pooling"]), [])
            name = r.get("model", "") + (f" + {r['extension']}" if r.get("extension", "none") != "none" else "")
            if name and name not in runs:
                runs.append(name)
    if not seen:
        return []
    return ["How each mode pooled (query / passages):", "",
            *(f"- {mode}: {q} / {p}" + (f" ({', '.join(runs)})" if runs else "")
              for (mode, q, p), runs in seen.items()), ""]


def markdown(payload: dict) -> str:
    """Per-length table for synthetic tasks (rows: lengths; columns: task x mode), then one row per
    real task, then the summary. Scores in percent; a dagger marks lengths where passages were
    truncated at the model's window."""
    rows, lines = payload["rows"], [f"# {payload['model']}", ""]
    meta = payload.get("settings", {})
    lines.append(", ".join(f"{k}: {v}" for k, v in meta.items() if v not in (None, "")))
    lines.append("")
    if payload.get("reference"):  # a study: say what the marks compare with
        refs = "; ".join(f"{m}: {run}" for m, run in payload["reference"].items())
        lines += [f"{SIGNIFICANCE_RULE} {holm_caption(payload)} Reference per mode: {refs}.", ""]
    elif any("ci" in r for r in rows):
        lines += [("[lo, hi]: 95% percentile cluster-bootstrap interval over queries (documents resampled with "
                   "their queries)."), ""]
    lines += pooling_lines(rows)
    synth = [r for r in rows if r["length"] is not None]
    if synth:
        cols = list(dict.fromkeys((r["task"], _run(r)) for r in synth))
        lines += ["Acc@1 (%) per length:", "","| length | " + " | ".join(f"{t} {m}" for t, m in cols) + " |",
                  "|---:|" + "---:|" * len(cols)]
        for length in sorted({r["length"] for r in synth}):
            cells = []
            for t, m in cols:
                hit = [r for r in synth if (r["task"], _run(r), r["length"]) == (t, m, length)]
                cells.append(_cell(hit[0]) if hit else "")
            lines.append(f"| {length} | " + " | ".join(cells) + " |")
        lines.append("")
    real = [r for r in rows if r["length"] is None]
    if real:
        lines += ["| task | mode | nDCG@10 | nDCG@1 | Recall@10 | queries | docs |", "|---|---|---:|---:|---:|---:|---:|"]
        for r in real:
            lines.append(f"| {r['task']} | {_run(r)} | {_cell(r, 'ndcg@10')} | {100 * r['ndcg@1']:.2f} | "
                         f"{100 * r['recall@10']:.2f} | {r['n_queries']} | {r['n_docs']} |")
        lines.append("")
    summary = payload["summary"]
    tasks = list(dict.fromkeys(t for s in summary.values() for t in s))
    lines += ["| mode | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    ci, vs = payload.get("summary_ci", {}), payload.get("summary_vs_ref", {})
    for mode, s in summary.items():
        cells = [_score(s[t] / 100, ci.get(mode, {}).get(t), vs.get(mode, {}).get(t, {}).get("p_holm")) if t in s else ""
                 for t in tasks]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    if any(r["truncated"] for r in rows):
        lines += ["", "† passages longer than the model's window were truncated to it (no extension method)."]
    warned = {r["task"] + (f"@{r['length']}" if r["length"] else ""): r["warnings"] for r in rows if r.get("warnings")}
    if warned:
        lines += ["", "Read with care (counted in the files):", ""]
        lines += [f"- {task}: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in w.items()) for task, w in warned.items()]
    return "\n".join(lines) + "\n"


def holm_caption(payload: dict) -> str:
    """The sentence naming the Holm family of a payload's marks (computed now for results written before it)."""
    info = payload.get("holm") or holm_family(payload["rows"], payload.get("summary_vs_ref", {}))
    payload["holm"] = info
    return f"Holm family (m = {info['m']}): {info['family']}; raw and adjusted p in the JSON."


def _cell(row: dict, key: str = "main") -> str:
    """``85.00 [70.00, 95.00] *``: the score, its interval and the significance mark (Holm-adjusted p), in
    percent."""
    ci = row.get("ci" if key in ("main", row.get("main_metric")) else f"ci_{key}")
    p = row.get("vs_ref", {}).get("p_holm") if key in ("main", row.get("main_metric")) else None
    return _score(row[key], ci, p) + (" †" if row["truncated"] else "")


def _score(value: float, ci: list | None, p: float | None = None) -> str:
    text = f"{100 * value:.2f}" + (f" [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]" if ci else "")
    return text + (f" {mark(p)}" if mark(p) else "")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def write_results(payload: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """``<out_dir>/<model>/<time>-<tasks>.json`` and ``.md``, each written atomically."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder = Path(out_dir) / slug(payload["model"])
    base = folder / f"{stamp}-{slug(payload['settings'].get('tasks', 'tasks'))[:60]}"
    json_path, md_path = base.with_suffix(".json"), base.with_suffix(".md")
    atomic_write(json_path, json.dumps(payload, indent=2) + "\n")
    atomic_write(md_path, markdown(payload))
    return json_path, md_path
