"""``make compare EXP=<study>``: one row per run of a study, and plots, from its TensorBoard logs.

Reads ``runs/<study>/<variant>/`` (event files, ``run_info.json``) and writes
``results/<study>/report.md`` with the final losses, validation cosines, passkey / needle Acc@1 per
length, wall time and teacher-cache hit rate of every variant, plus ``loss.png`` (train/loss
curves) and ``passkey.png`` (Acc@1 against length at the last check, one line per variant). Runs
are grouped by their identity (``dewey_lab.runs.identity``) and by scale: runs of another scale go in a
table of their own, never in the same rows. Where a run kept its last check's per-query results
(``passkey_last.json``, written by ``PasskeyCallback``), passkey / needle cells carry a 95% cluster-bootstrap
interval (one cluster per query unless the file gives ``clusters``) and ``*`` marks a variant that differs from
the first one at Holm-adjusted p < 0.05 (paired cluster sign-flip test over the same queries; the family: every
test of that table); ``<task> avg, step 0`` is the score where the run started (the callback's check at step 0).
Variants that differ only in their seed get a seeds table (``dewey_lab.runs.seeds``); a run continued under a
raised step or epoch limit is named below its table (its learning-rate decay restarted). A study whose file
names a post-fit evaluation (``# eval: <file>``) gets it run and reported too (``dewey_lab.runs.study_eval``),
with every pair of its variants, and each against the start, paired (``dewey_lab.runs.pairwise``).
The report opens with the study's primary endpoint (its ``# endpoint:`` line, ``dewey_lab.runs.endpoint``),
scored on the post-fit evaluation where the study has one, else on the training checks' per-query results;
``results/<study>/stats.json`` keeps the numbers behind every interval and mark (raw p beside ``p_holm``).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from dewey_lab.files import atomic_write
from dewey_lab.runs.eval_results import merged_results
from dewey_lab.runs.study_eval import endpoint, eval_file, plot, run_eval, section

PER_QUERY_FILE = "passkey_last.json"  # written by callbacks.PasskeyCallback at every check, so the last one stays
COLUMNS = ("train/loss", "val/loss", "val/cos_whole", "val/cos_chunk")


def read_run(run_dir: Path) -> dict:
    """{"scalars": {tag: [(step, value), ...]}, "info": run_info.json or {}} of one run directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(run_dir.glob("events.out.tfevents*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    info_file = run_dir / "run_info.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    per_query_file = run_dir / PER_QUERY_FILE
    per_query = json.loads(per_query_file.read_text()) if per_query_file.exists() else None
    return {"scalars": {k: sorted(v) for k, v in scalars.items()}, "info": info, "per_query": per_query}


def query_results(per_query: dict | None) -> dict[str, dict[int, dict]]:
    """{"passkey": {length: {"qids", "correct", "set"}}, ...}: single-vector per-query Acc@1 of the last
    check (``passkey_last.json``), the numbers behind ``val/<task>@<length>``; {} for a run without it."""
    results = (per_query or {}).get("results", {})
    return {task: {int(n): r for n, r in modes.get("single", {}).items()} for task, modes in results.items()}


def run_statistics(rows: list[str], data: dict, lengths: list[int]) -> dict[str, dict]:
    """{run: {"<task>@<length>" or "<task>_avg": {"ci": [lo, hi], "p": p vs the first run or None}}} for the
    runs with per-query results; the first row with them is the reference. A pair is tested only where both
    runs scored the same set (same seeded queries); an average over lengths only over the same lengths. Intervals
    and tests are clustered (``clusters`` per length where the file has them, else one per query); every test
    gains ``p_holm``, Holm-adjusted over all the tests returned (the table's family)."""
    from dewey_lab.eval.stats import bootstrap_ci, holm, paired_test

    have = [n for n in rows if query_results(data[n]["per_query"])]
    out: dict[str, dict] = {}
    ref = query_results(data[have[0]]["per_query"]) if have else {}
    for name in have:
        res, stats = query_results(data[name]["per_query"]), {}
        for task, per_length in res.items():
            ns = [n for n in lengths if n in per_length]
            for n in ns:
                stats[f"{task}@{n}"] = {"ci": list(bootstrap_ci(per_length[n]["correct"],
                                                                clusters=_clusters(per_length[n]))[1:]), "p": None}
            if not ns:
                continue
            values = [c for n in ns for c in per_length[n]["correct"]]
            groups = [n for n in ns for _ in per_length[n]["correct"]]
            clusters = [c for n in ns for c in _clusters(per_length[n])]
            stats[f"{task}_avg"] = {"ci": list(bootstrap_ci(values, groups=groups, clusters=clusters)[1:]), "p": None}
            other = ref.get(task, {})
            same = [n for n in ns if n in other and other[n]["set"] == per_length[n]["set"]
                    and other[n]["qids"] == per_length[n]["qids"]]
            if name == have[0]:
                continue
            for n in same:
                stats[f"{task}@{n}"]["p"] = paired_test(per_length[n]["correct"], other[n]["correct"],
                                                        clusters=_clusters(per_length[n]))["p"]
            if same and len(same) == len(ns) == len(other):
                b = [c for n in ns for c in other[n]["correct"]]
                stats[f"{task}_avg"]["p"] = paired_test(values, b, groups=groups, clusters=clusters)["p"]
        out[name] = stats
    tests = [t for stats in out.values() for t in stats.values() if t["p"] is not None]
    for t, adjusted in zip(tests, holm([t["p"] for t in tests])):
        t["p_holm"] = adjusted
    return out


def _clusters(result: dict) -> list:
    """A check's per-query clusters: its ``clusters`` (each query's document) where it kept them, else the queries."""
    return list(result.get("clusters") or result["qids"])


def training_rows(data: dict, names: list[str]) -> list[dict]:
    """The runs' last-check per-query results as ``dewey-lab eval`` rows (every task and mode kept; ``model``: the
    variant name, without an ``@<scale>`` suffix), for the endpoint and the seeds table."""
    rows = []
    for name in names:
        for task, modes in ((data[name]["per_query"] or {}).get("results") or {}).items():
            for mode, per_length in modes.items():
                for n, r in per_length.items():
                    rows.append({"model": name.split("@", 1)[0], "task": task, "mode": mode, "length": int(n),
                                 "main_metric": "ndcg@1", "qids": r["qids"], "clusters": _clusters(r),
                                 "per_query": [float(c) for c in r["correct"]], "set": r.get("set")})
    return rows


def synthetic_at_last_check(scalars: dict) -> dict[str, dict[int, float]]:
    """{"passkey": {length: acc}, "needle": ...} from the last logged ``val/<task>@<length>``."""
    out: dict[str, dict[int, float]] = {}
    for tag, points in scalars.items():
        m = re.fullmatch(r"val/(passkey|needle)@(\d+)", tag)
        if m and points:
            out.setdefault(m.group(1), {})[int(m.group(2))] = points[-1][1]
    return out


def compare(study: str, runs_dir: str = "runs", out_dir: str = "results", study_file: str | None = None,
            evaluate: bool | None = True) -> Path:
    """One table per scale (the experiment files stacked under the study), one row per run identity
    (``dewey_lab.runs.identity``: runs of one identity are one run, its newest finished directory reported);
    rows follow the study file's variant order (``experiments/<study>.yaml``), then any other run. A study
    whose file names an eval study (``# eval:``, ``dewey_lab.runs.study_eval``) gets its results too: run now
    (``evaluate`` True), read from its newest results (None), or left out (False)."""
    from dewey_lab.runs.endpoint import endpoint_lines, endpoint_result
    from dewey_lab.runs.identity import identity_key
    from dewey_lab.runs.seeds import seed_lines, seed_summary

    root = Path(runs_dir) / study
    runs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    kept = Path(out_dir) / study / "runs"  # finished runs' records committed with the results (no checkpoints)
    here = {p.name for p in runs}
    runs += sorted(p for p in kept.iterdir() if p.is_dir() and p.name not in here) if kept.is_dir() else []
    if not runs:
        raise FileNotFoundError(f"no runs under {root} or {kept}; run make train EXP={study} first")
    study_path = Path(study_file) if study_file else Path("experiments") / f"{study}.yaml"
    primary = endpoint(study_path)  # a malformed line stops here, before any work
    order = _variant_order(study_path)
    data = {r.name: {**read_run(r), "written": _written(r)} for r in runs}
    groups: dict[str, dict[str, list[str]]] = {}  # scale -> identity -> run directory names
    for name, d in data.items():
        identity = d["info"].get("identity") or {}
        scale = identity.get("scale", "unrecorded")
        groups.setdefault(scale, {}).setdefault(identity_key(identity) or f"dir:{name}", []).append(name)
    lengths = sorted({n for d in data.values() for t in synthetic_at_last_check(d["scalars"]).values() for n in t})
    tasks = [t for t in ("passkey", "needle") if any(t in synthetic_at_last_check(d["scalars"]) for d in data.values())]
    head = ["variant", *COLUMNS, *(f"{t}@{n}" for t in tasks for n in lengths), *(f"{t} avg" for t in tasks),
            *(f"{t} avg, step 0" for t in tasks), "wall (s)", "teacher hit rate", "finished", "identity", "runs"]
    lines = [f"# {study}", ""]
    if len(groups) > 1:
        lines += [f"Runs at {len(groups)} scales ({', '.join(sorted(groups))}): one table each, never mixed.", ""]
    out = Path(out_dir) / study
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {"training": {}, "training_seeds": {}}  # stats.json: the numbers behind the marks
    reported: list[str] = []  # the variant shown for each identity, every scale
    for scale in sorted(groups):
        rows = []
        for ident, names in groups[scale].items():
            shown = _representative(names, data)
            variant = shown.split("@", 1)[0]
            rows.append((order.index(variant) if variant in order else len(order), shown, ident, names))
        rows.sort(key=lambda r: (r[0], r[1]))
        names_in_order = [name for _, name, _, _ in rows]
        reported += names_in_order
        stats = run_statistics(names_in_order, data, lengths)
        record["training"][scale] = stats
        lines += [f"## scale: {scale}", ""]
        if stats:
            m = sum(t.get("p") is not None for s in stats.values() for t in s.values())
            lines += [(f"Acc@1 [lo, hi]: 95% cluster-bootstrap interval over the check's queries; `*`: differs from "
                       f"{next(iter(stats))} (the first variant with them) at Holm-adjusted p < 0.05, paired cluster "
                       f"sign-flip test over the same queries; Holm family (m = {m}): every test in this table (each "
                       "other variant x task x length, and each average over lengths)."), ""]
        without = [n for n in names_in_order if n not in stats]
        if lengths and without:  # runs written before the callback kept per-query results
            lines += [f"No per-query results ({PER_QUERY_FILE}) for {', '.join(without)}: shown without intervals.",
                      ""]
        lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for _, name, ident, names in rows:
            s, info = data[name]["scalars"], data[name]["info"]
            synth, st = synthetic_at_last_check(s), stats.get(name, {})
            cells = [f"{s[c][-1][1]:.4f}" if s.get(c) else "" for c in COLUMNS]
            cells += [_with_interval(synth.get(t, {}).get(n, float("nan")), st.get(f"{t}@{n}")) for t in tasks
                      for n in lengths]
            cells += [_with_interval(_average(synth.get(t, {}), lengths), st.get(f"{t}_avg")) for t in tasks]
            start = {t: [v for step, v in s.get(f"val/{t}_avg", []) if step == 0] for t in tasks}  # the start
            cells += [f"{start[t][0]:.2f}" if start[t] else "" for t in tasks]
            rate = info.get("data", {}).get("teacher_cache_hit_rate")
            cells += [str(info.get("wall_seconds", "")), "" if rate is None else f"{rate:.3f}",
                      str(info.get("finished", "")), "" if ident.startswith("dir:") else ident, str(len(names))]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += _continued_lines({name: data[name]["info"] for name in names_in_order})
        seeds = seed_summary(training_rows(data, names_in_order))
        record["training_seeds"][scale] = seeds
        lines += seed_lines(seeds, "the last training check's queries")
        suffix = "" if len(groups) == 1 else f"-{scale}"
        _plots({name: data[name] for _, name, _, _ in rows}, lengths, out, suffix, stats)
    evaluated = eval_file(study_path)
    result = None if primary is None else endpoint_result(primary, training_rows(data, reported))
    source = f"the last training check's per-query results ({PER_QUERY_FILE}) of each variant"
    if evaluated is not None and evaluate is not False:
        payload = run_eval(evaluated, out / "eval") if evaluate else merged_results(out / "eval", evaluated)
        record["eval"] = {}
        lines += section(payload, evaluated, plot(payload, out), record["eval"], study_root=root)
        source = f"the post-fit evaluation (`{evaluated}`)"
        result = None if primary is None else endpoint_result(primary, payload["rows"])
    elif evaluated is not None and primary is not None:
        result = {"endpoint": str(primary), "missing": f"it is scored on the post-fit evaluation (`{evaluated}`), "
                                                       "which this report leaves out (--skip-eval)"}
    record["endpoint"] = result
    lines[2:2] = endpoint_lines(primary, result, source)  # the report opens with it, below its title
    plots = "`loss.png`, `passkey.png`" if len(groups) == 1 else "`loss-<scale>.png`, `passkey-<scale>.png`"
    lines += [(f"Plots: {plots} (train/loss by step; passkey Acc@1 against length, last check, with 95% intervals "
               "where per-query results exist). `identity`: the hash "
              "of the resolved config and data fingerprints; `runs`: run directories of that identity (the newest "
              "finished one is shown).")]
    atomic_write(out / "report.md", "\n".join(lines) + "\n")
    atomic_write(out / "stats.json", json.dumps(record, indent=1, default=str) + "\n")
    return out / "report.md"


def _continued_lines(infos: dict[str, dict]) -> list[str]:
    """A note for each run resumed from a checkpoint trained under other step / epoch limits (trained longer):
    its learning rate decays to 0 over the new total, so its decay restarted where that total puts it."""
    found = []
    for name, info in infos.items():
        was = (info.get("resumed_from") or {}).get("limits")
        now = (info.get("identity") or {}).get("limits")
        if was and now and was != now:
            limits = ", ".join(f"{k} {was[k]} -> {now[k]}" for k in now if was.get(k) != now[k])
            found.append(f"{name} (from step {info['resumed_from'].get('step')}; {limits})")
    if not found:
        return []
    return [(f"Trained longer: {'; '.join(found)}. Each was continued from its own checkpoint under a raised limit; "
             "its learning rate decays linearly to 0 over the new total, so the decay restarted where that total "
             "puts it: not the same schedule as a run started with the new limit."), ""]


def _average(per_length: dict[int, float], lengths: list[int]) -> float:
    """Mean Acc@1 over the lengths a run checked (nan where it checked none)."""
    values = [per_length[n] for n in lengths if n in per_length]
    return sum(values) / len(values) if values else float("nan")


def _with_interval(value: float, stat: dict | None) -> str:
    """``0.80 [0.66, 0.92] *``; the plain value where the run has no per-query results."""
    if stat is None:
        return f"{value:.2f}"
    from dewey_lab.eval.stats import mark

    text = f"{value:.2f} [{stat['ci'][0]:.2f}, {stat['ci'][1]:.2f}]"
    p = stat.get("p_holm")  # the table's family, Holm-adjusted (run_statistics)
    return text + (f" {mark(p)}" if mark(p) else "")


def _representative(names: list[str], data: dict) -> str:
    """Of run directories of one identity: the newest finished one, else the newest (latest ``started``, then
    the latest ``run_info.json`` write: a rerun started within the same second as the run it replaced)."""
    def key(name: str):
        info = data[name]["info"]
        return (bool(info.get("finished")), info.get("started", ""), data[name].get("written", 0), name)

    return max(names, key=key)


def _written(run_dir: Path) -> int:
    """When a run directory's ``run_info.json`` was last written (ns; 0 without one)."""
    info = run_dir / "run_info.json"
    return info.stat().st_mtime_ns if info.is_file() else 0


def _variant_order(study_file: Path) -> list[str]:
    from dewey_lab.runs.sweep import sweep_block, variants

    return [name for name, _ in variants(sweep_block([str(study_file)]))] if study_file.is_file() else []


def _plots(data: dict, lengths: list[int], out: Path, suffix: str = "", stats: dict | None = None) -> None:
    losses = {name: d["scalars"].get("train/loss", []) for name, d in data.items()}
    _line_plot(out / f"loss{suffix}.png", {n: ([p[0] for p in v], [p[1] for p in v]) for n, v in losses.items() if v},
               "step", "train/loss")
    passkey = {name: synthetic_at_last_check(d["scalars"]).get("passkey", {}) for name, d in data.items()}
    stats = stats or {}
    errors = {}  # name -> (2, L) distances below / above each point: matplotlib's yerr
    for n, acc in passkey.items():
        cis = [stats.get(n, {}).get(f"passkey@{x}", {}).get("ci") for x in lengths]
        if acc and any(cis):
            y = [acc.get(x, float("nan")) for x in lengths]
            errors[n] = [[v - c[0] if c else 0.0 for v, c in zip(y, cis)], [c[1] - v if c else 0.0 for v, c in zip(y, cis)]]
    _line_plot(out / f"passkey{suffix}.png", {n: (lengths, [acc.get(x, float("nan")) for x in lengths])
                                     for n, acc in passkey.items() if acc},
               "length (tokens)", "passkey Acc@1", log2_x=True, errors=errors)


def _line_plot(path: Path, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str,
               log2_x: bool = False, errors: dict | None = None) -> None:
    """One line per variant; markers when the x values are few (lengths); error bars where ``errors`` has them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (x, y) in series.items():
        if errors and name in errors:
            ax.errorbar(x, y, yerr=errors[name], label=name, marker="o", capsize=3)
        else:
            ax.plot(x, y, label=name, marker="o" if log2_x else None)
    if log2_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if series:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    flags = {"--reuse-eval": None, "--skip-eval": False}  # the newest post-fit results / none
    args = [a for a in argv if a not in flags]
    if len(args) != 1 or len(argv) - len(args) > 1:
        raise SystemExit("usage: python -m dewey_lab.runs.compare <study> [--reuse-eval | --skip-eval]   "
                         "(make compare EXP=<study>; --reuse-eval reports the newest post-fit results instead of "
                         "running the study's eval, --skip-eval leaves them out)")
    print(compare(args[0], evaluate=next((flags[a] for a in argv if a in flags), True)))


if __name__ == "__main__":
    main()
