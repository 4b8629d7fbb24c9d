"""A study's primary endpoint, scored: the one comparison its file declared before the runs.

The study file's opening comment holds one ``# endpoint:`` line (parsed by ``dewey_lab.runs.study_eval.endpoint``);
``make compare`` scores it on the study's per-query results and opens ``results/<study>/report.md`` with it: both
values with their cluster-bootstrap intervals, the paired difference with its interval and its p. It is the
study's one confirmatory test, so its p is the raw two-sided cluster sign-flip p, not adjusted for the many
exploratory tests the tables below carry (those are Holm-adjusted within each table's family). A variant run with
several seeds (``dewey_lab.runs.seeds``) enters with its per-query scores averaged over its seeds, its t-interval
over seeds beside the query interval. An endpoint the results cannot answer (its task or mode was not scored,
other queries, ...) is said so in the section, never a crash.
"""

from __future__ import annotations

from dewey_lab.eval.stats import bootstrap_ci, paired_test, seed_interval
from dewey_lab.runs.seeds import pooled, run_score, same_queries, seed_runs
from dewey_lab.runs.study_eval import ENDPOINT_EXAMPLE, ENDPOINT_FORMAT, ENDPOINT_METRICS, Endpoint

TITLE = "## Primary endpoint (declared before the run)"


def endpoint_result(ep: Endpoint, rows: list[dict]) -> dict:
    """{"endpoint", "a", "b" ({"label", "value", "ci", "seeds", "seed_ci"}), "diff", "ci", "p", "n_queries",
    "n_clusters", "lengths"} from ``dewey-lab eval``-style rows; {"endpoint", "missing": why} where they cannot
    answer it."""
    out: dict = {"endpoint": str(ep)}
    scored = [r for r in rows if r.get("per_query")]
    tasks = sorted({r["task"] for r in scored})
    if ep.task not in tasks:
        return {**out, "missing": f"task {ep.task} is not in these results (tasks with per-query scores: "
                                  f"{', '.join(tasks) or 'none'})"}
    modes = sorted({r["mode"] for r in scored if r["task"] == ep.task})
    if ep.mode not in modes:
        return {**out, "missing": f"{ep.task} was not scored in mode {ep.mode} (its modes: {', '.join(modes)})"}
    lengths = sorted({r["length"] for r in scored if (r["task"], r["mode"]) == (ep.task, ep.mode)}, key=str)
    if ep.length is not None and ep.length not in lengths:
        return {**out, "missing": f"{ep.task} was not scored at length {ep.length} (lengths: "
                                  f"{', '.join(map(str, lengths))})"}
    kept = sorted({r.get("main_metric", "?") for r in scored if (r["task"], r["mode"]) == (ep.task, ep.mode)})
    if kept != [ENDPOINT_METRICS[ep.metric.lower()]]:
        return {**out, "missing": f"per-query scores of {ep.task} are kept for {', '.join(kept)} only, not "
                                  f"{ep.metric}; declare the task's main metric"}
    sides = {}
    for name in (ep.a, ep.b):
        runs = seed_runs(scored, name, ep.task, ep.mode, ep.length)
        if isinstance(runs, str):
            return {**out, "missing": runs}
        values = pooled(runs)
        if isinstance(values, str):
            return {**out, "missing": f"{name}: {values}"}
        sides[name] = (runs, values)
    first_a, first_b = (next(iter(sides[n][0].values())) for n in (ep.a, ep.b))
    if len(first_a) != len(first_b) or not all(same_queries(x, y) for x, y in zip(first_a, first_b)):
        return {**out, "missing": f"{ep.a} and {ep.b} did not score the same queries (lengths, query ids or "
                                  "generated sets differ), so they cannot be paired"}
    (va, groups, clusters), vb = sides[ep.a][1], sides[ep.b][1][0]
    test = paired_test(va, vb, groups=groups, clusters=clusters)

    def side(name: str) -> dict:
        runs, (values, _, _) = sides[name]
        mean, lo, hi = bootstrap_ci(values, groups=groups, clusters=clusters)
        seeds = sorted(s for s in runs if s is not None)
        seed_ci = list(seed_interval([run_score(rs) for rs in runs.values()])[1:]) if len(seeds) > 1 else None
        return {"label": name, "value": mean, "ci": [lo, hi], "seeds": seeds, "seed_ci": seed_ci}

    return {**out, "a": side(ep.a), "b": side(ep.b), "diff": test["diff"], "ci": [test["lo"], test["hi"]],
            "p": test["p"], "n_queries": len(va), "n_clusters": len(set(zip(groups, clusters))),
            "lengths": sorted({g for g in groups if g is not None})}


def endpoint_lines(ep: Endpoint | None, result: dict | None, source: str) -> list[str]:
    """The report's first section; ``source`` says which results were read (e.g. the post-fit evaluation)."""
    lines = [TITLE, ""]
    if ep is None:
        return lines + [(f"None declared: every comparison in this report is exploratory. Declare one in the study "
                        f"file's opening comment: `{ENDPOINT_FORMAT}`, e.g. `{ENDPOINT_EXAMPLE}`."), ""]
    lines += [f"`{ep}`: the study file's `# endpoint:` line, declared before the runs; scored on {source}.", ""]
    if result is None or "missing" in result:
        why = "no results were read" if result is None else result["missing"]
        return lines + [(f"**NOT ANSWERED: {why}.** The declared comparison is not in these results; no other "
                        "table of this report stands in for it."), ""]
    a, b = result["a"], result["b"]
    lines += [f"| | {ep.metric} (%) | 95% cluster-bootstrap interval | over seeds |", "|---|---:|---:|---|"]
    for s in (a, b):
        seeds = "" if not s["seed_ci"] else (f"mean of seeds {', '.join(map(str, s['seeds']))}; 95% t-interval "
                                             f"[{100 * s['seed_ci'][0]:.2f}, {100 * s['seed_ci'][1]:.2f}]")
        lines.append(f"| {s['label']} | {100 * s['value']:.2f} | [{100 * s['ci'][0]:.2f}, {100 * s['ci'][1]:.2f}] "
                     f"| {seeds} |")
    lo, hi = result["ci"]
    lines.append(f"| {a['label']} − {b['label']} | {100 * result['diff']:+.2f} | [{100 * lo:+.2f}, {100 * hi:+.2f}] "
                 f"| p = {result['p']:.4g} |")
    strata = (f", stratified by length (the mean of per-length means over {', '.join(map(str, result['lengths']))})"
              if len(result["lengths"]) > 1 else "")
    lines += ["", (f"Paired over the same {result['n_queries']} queries in {result['n_clusters']} clusters (each query's "
              "relevant document, or the query itself where the results kept none: a cluster's queries resample and "
              f"flip together){strata}; p: two-sided paired cluster sign-flip "
              "randomisation test. This is the study's one declared test: its p is **not** adjusted for "
              "multiplicity; every `*` elsewhere in this report is Holm-adjusted within its table's family."), ""]
    return lines
