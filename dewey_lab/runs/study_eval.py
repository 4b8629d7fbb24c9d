"""A study's evaluation after training: the ``dewey-lab eval`` study its file names, folded into its report.

A study names its post-fit evaluation in its opening comment, ``# eval: experiments/<name>.yaml``: a
``dewey-lab eval`` study whose ``runs`` are the study's run directories (each one's last checkpoint),
``untrained:<run>`` and the reference models (the teacher, BM25), all on the same generated sets and
real-text tasks, so every row scores the same queries. ``make compare`` runs it (passage vectors are
cached: a rerun, or a run after a kill, resumes) and adds to ``results/<study>/report.md``:

* one row per run and scoring mode: Acc@1 of each synthetic task per length and over lengths, nDCG@10
  of each real-text task, each with its 95% bootstrap interval, ``*`` where it differs from the
  reference row (the first run's row of the same mode; paired sign-flip test over the same queries);
* every pair of the study's variants, and each against the start (``dewey_lab.runs.pairwise``): paired
  differences with intervals and Holm-adjusted p over that table's cells;
* within each run, multi-vector against single-vector (paired, same queries): the paper's comparison;
* a seeds table where runs differ only in their seed (below);
* ``eval-<task>.png``: Acc@1 against length, one panel per scoring mode, trained runs with error bars,
  the reference models as dashed lines.

Statistics a reader can cite. Every interval is a 95% percentile *cluster* bootstrap: a query's cluster is its
relevant document (rows' ``clusters``; rows written before them: one cluster per query), documents are drawn with
replacement within each length and bring all their queries; over lengths the statistic is the mean of per-length
means. Every paired test is a two-sided cluster sign-flip test (a document's summed difference flips as a whole).
Every ``*`` is Holm-adjusted (``stats.holm``) over its table's family, stated in the caption, the raw p kept in the
JSON beside ``p_holm``: the post-fit table's family is every test against the reference in the evaluation (each
other run x mode x task x length, and each average over lengths: ``report.holm_family``); the multi - single
table's family is its cells (run x single-vector mode x task); the pairwise table's family is its cells (pair x
mode x task); ``make compare``'s training table's family is its cells (each other variant x task x length and
average, per scale).

Primary endpoint. A study file (one with a ``sweep:`` or a ``# eval:`` line) declares, in its opening comment, the
one comparison it was run to make, in one line::

    # endpoint: <task>[@<length>] <mode> <metric>, <A> vs <B>
    # endpoint: semantic/concat multi ndcg@10, both vs whole_only

task as ``dewey-lab eval`` names it (``passkey`` alone: the mean over lengths; ``passkey@1024``: one length);
mode as rows name it (single, single:mean, multi); metric acc@1 (= ndcg@1), ndcg@1, ndcg@10 or recall@10: the
task's main metric, whose per-query scores are kept; A and B run labels: the eval study's ``label`` where the
study has a ``# eval:`` line, else training variant names (``align=both``), scored on the training check's
per-query results (``passkey_last.json``). ``make compare`` opens the report with it (``dewey_lab.runs.endpoint``);
its p is not Holm-adjusted: it is the one declared test.

Seeds. Runs that differ only in their seed carry it as one part of their name, ``seed=<n>`` (or
``seed_everything=<n>``, as a sweep over it names its runs), parts separated by ``/`` or ``,``: eval-study labels
``both/seed=0``, ``both/seed=1``; training variants ``align=both,seed_everything=1``. The rest of the name is the
variant (``both``): the report gives each variant's mean over seeds with the 95% t-interval over the per-seed
scores (t with k - 1 degrees of freedom) beside the cluster-bootstrap interval over queries of the seed-averaged
per-query scores (``dewey_lab.runs.seeds``), and an endpoint naming the variant pairs its seed-averaged scores.
(The eval argument ``seed`` is the generated sets' seed: a run entry setting it would score other queries.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dewey_lab.eval.report import _run, _score, clusters_of, holm_caption, pooling_lines
from dewey_lab.eval.stats import SIGNIFICANCE_RULE, holm, mark, paired_test

EVAL_LINE = re.compile(r"#\s*eval:\s*(\S+)")
ENDPOINT_LINE = re.compile(r"#\s*endpoint:(.*)")
ENDPOINT_BODY = re.compile(r"(\S+)\s+(\S+)\s+(\S+)\s*,\s*(\S.*?)\s+vs\s+(\S.*?)")
ENDPOINT_FORMAT = "# endpoint: <task>[@<length>] <mode> <metric>, <A> vs <B>"
ENDPOINT_EXAMPLE = "# endpoint: semantic/concat multi ndcg@10, both vs whole_only"
ENDPOINT_METRICS = {"acc@1": "ndcg@1", "ndcg@1": "ndcg@1", "ndcg@10": "ndcg@10", "recall@10": "recall@10"}
REFERENCE_COLORS = ("black", "dimgrey", "darkgoldenrod", "purple", "teal")  # dashed: single vector, dotted: multi


def opening_comment(study_file: Path) -> list[str]:
    """The study file's first lines, up to the first that is not a comment ([] for a missing file)."""
    lines = []
    for line in study_file.read_text().splitlines() if study_file.is_file() else []:
        if not line.startswith("#"):
            break
        lines.append(line.strip())
    return lines


@dataclass(frozen=True)
class Endpoint:
    """A study's primary endpoint: ``a`` against ``b`` on one task (at one length, or over all), mode and metric."""

    task: str
    length: int | None
    mode: str
    metric: str
    a: str
    b: str

    def __str__(self) -> str:
        return f"{self.task}{'' if self.length is None else f'@{self.length}'} {self.mode} {self.metric}, " \
               f"{self.a} vs {self.b}"


def parse_endpoint(line: str, where: str = "endpoint") -> Endpoint:
    """``# endpoint: semantic/concat multi ndcg@10, both vs whole_only`` -> Endpoint; one line naming the fix else."""
    m = ENDPOINT_LINE.fullmatch(line.strip())
    body = ENDPOINT_BODY.fullmatch((m.group(1) if m else line).strip())
    fix = f"write '{ENDPOINT_FORMAT}', e.g. '{ENDPOINT_EXAMPLE}'"
    if not body:
        raise ValueError(f"{where}: malformed endpoint line {line.strip()!r}; {fix}")
    task, mode, metric, a, b = body.groups()
    if metric.lower() not in ENDPOINT_METRICS:
        raise ValueError(f"{where}: endpoint metric {metric!r} is not one of {', '.join(ENDPOINT_METRICS)}; {fix}")
    if a == b:
        raise ValueError(f"{where}: the endpoint compares {a!r} with itself; {fix}")
    at = re.fullmatch(r"(.+)@(\d+)(k?)", task)
    length = None if not at else int(at.group(2)) * (1024 if at.group(3) else 1)
    return Endpoint(at.group(1) if at else task, length, mode, metric, a, b)


def endpoint(study_file: Path) -> Endpoint | None:
    """The primary endpoint declared by the ``# endpoint:`` line of the study file's opening comment, or None."""
    found = [line for line in opening_comment(study_file) if ENDPOINT_LINE.fullmatch(line)]
    if len(found) > 1:
        raise ValueError(f"{study_file}: {len(found)} '# endpoint:' lines; a study declares one primary endpoint")
    return parse_endpoint(found[0], str(study_file)) if found else None


def eval_file(study_file: Path) -> Path | None:
    """The eval study named by a ``# eval: <path>`` line in the study file's opening comment, or None."""
    for line in opening_comment(study_file):
        m = EVAL_LINE.fullmatch(line)
        if m:
            path = Path(m.group(1))
            if not path.is_file():
                raise FileNotFoundError(f"{study_file} names the eval study {path}, which does not exist; fix its "
                                        "'# eval:' line")
            return path
    return None


def run_eval(config: Path, out_dir: Path) -> dict:
    """Run the eval study (``dewey-lab eval --config``); its JSON and markdown land under ``out_dir``."""
    from dewey_lab.eval.run import main

    return main(["--config", str(config), "--out_dir", str(out_dir)])


def is_student(model: str) -> bool:
    """``dewey_lab.eval.load.is_student``: a training run's student, else a reference model."""
    from dewey_lab.eval.load import is_student as student

    return student(model)


def references(payload: dict) -> set[str]:
    """Names (labels) of the runs that are reference models (teacher, BM25), not the study's students."""
    runs = payload.get("settings", {}).get("runs") or []
    return {r.get("label") or r["model"] for r in runs if not is_student(str(r.get("model", "")))}


def section(payload: dict, config: Path, plots: list[str], record: dict | None = None,
            study_root: Path | None = None) -> list[str]:
    """Markdown lines: the table of every run and mode, then every pair of the study's variants
    (``dewey_lab.runs.pairwise``; ``study_root``: the study's run folder, which says which runs are its variants),
    then multi- against single-vector within each run, then the seeds table; ``record`` (a dict) receives the
    pairwise and multi - single tests and the seed summary for the JSON."""
    from dewey_lab.runs.pairwise import pairwise, pairwise_lines
    from dewey_lab.runs.seeds import seed_lines, seed_summary

    rows = payload["rows"]
    runs = list(dict.fromkeys(_run(r) for r in rows))
    synth = list(dict.fromkeys(r["task"] for r in rows if r["length"] is not None))
    real = list(dict.fromkeys(r["task"] for r in rows if r["length"] is None))
    lengths = sorted({r["length"] for r in rows if r["length"] is not None})
    by_key = {(_run(r), r["task"], r["length"]): r for r in rows}
    summary, ci, vs = payload["summary"], payload.get("summary_ci", {}), payload.get("summary_vs_ref", {})
    lex = lexical_cells(payload)  # the columns shared tokens alone come close on: marked in the header
    head = ["run: mode", *(f"{t}@{_k(n)}" + LEXICAL_MARK * ((t, n) in lex) for t in synth for n in lengths),
            *(f"{t} avg" for t in synth), *(f"{t} nDCG@10" + LEXICAL_MARK * ((t, None) in lex) for t in real)]
    lines = [f"## After training: `{config}`", "",
             f"Every run scores the same queries. Synthetic tasks: Acc@1 (%); real-text tasks: nDCG@10 (%). "
             f"{SIGNIFICANCE_RULE} {holm_caption(payload)} Reference per mode: " +
             "; ".join(f"{m}: {r}" for m, r in payload.get("reference", {}).items()) + ".", "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for run in runs:
        cells = []
        for t in synth:
            for n in lengths:
                r = by_key.get((run, t, n))
                cells.append(_score(r["main"], r.get("ci"), r.get("vs_ref", {}).get("p_holm")) if r else "")
        for t in synth:
            value = summary.get(run, {}).get(t)
            cells.append("" if value is None else
                         _score(value / 100, ci.get(run, {}).get(t), vs.get(run, {}).get(t, {}).get("p_holm")))
        for t in real:
            r = by_key.get((run, t, None))
            cells.append(_score(r["main"], r.get("ci"), r.get("vs_ref", {}).get("p_holm")) if r else "")
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += pooling_lines(rows)
    if lex:
        lines += [LEXICAL_CAPTION, ""]
    between = pairwise(payload, study_root)
    lines += pairwise_lines(between)
    pairs = multi_vs_single(rows)
    if pairs:
        tasks = list(dict.fromkeys(t for p in pairs for t in p["tasks"]))
        m = sum(len(p["tasks"]) for p in pairs)
        lines += [("Multi-vector against single-vector within each run: mean difference in points, its 95% paired "
                   "cluster-bootstrap interval, `*` at Holm-adjusted p < 0.05 (cluster sign-flip test over the same "
                   f"queries; Holm family (m = {m}): every cell of this table, i.e. each run x single-vector mode x "
                   "task; synthetic tasks: Acc@1 over all lengths, stratified by length; real-text: nDCG@10)."), "",
                  "| run | comparison | " + " | ".join(tasks) + " |", "|---|---|" + "---:|" * len(tasks)]
        for p in pairs:
            cells = []
            for t in tasks:
                d = p["tasks"].get(t)
                cells.append("" if d is None else f"{100 * d['diff']:+.2f} [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]"
                             + (f" {mark(d['p_holm'])}" if mark(d["p_holm"]) else ""))
            lines.append(f"| {p['model']} | {p['a']} − {p['b']} | " + " | ".join(cells) + " |")
        lines.append("")
    seeds = seed_summary(rows)
    lines += seed_lines(seeds, "the post-fit evaluation's queries")
    if record is not None:
        record.update(pairwise=between, multi_vs_single=pairs, seeds=seeds)
    if plots:
        lines += ["Plots: " + ", ".join(f"`{p}`" for p in plots) + " (Acc@1 against length per scoring mode; "
                  "95% intervals as error bars; the reference models dashed).", ""]
    return lines


LEXICAL_MARK = "ˡ"
LEXICAL_MARGIN = 0.10  # 10 points of Acc@1 / nDCG@10
LEXICAL_CAPTION = ("ˡ lexical: the bag-of-words control (the mean of a fixed random token-vector table, no model; "
                   "dewey_lab/eval/controls.py) scores at most 10 points below the best model on this column, or above "
                   "it (best over modes; BM25 and the controls are not models): on this column no model is shown "
                   "to do more than count shared tokens, whether the column is easy for them (passkey) or the "
                   "models are weak on it.")


def lexical_cells(payload: dict, margin: float = LEXICAL_MARGIN) -> set[tuple[str, int | None]]:
    """(task, length) cells (length None: a real-text task) where the bag-of-words control's best mode scores
    at least the best model's main score minus ``margin``. A model is any run of the study that is not BM25 or a
    control (``settings.runs``' ``model``: bm25, length, bow), any mode, any extension; a payload without a
    bow run has no lexical cell."""
    from dewey_lab.eval.run import NO_MODEL

    kinds = {r.get("label") or r["model"]: str(r.get("model", "")) for r in payload.get("settings", {}).get("runs") or []}
    bow: dict[tuple, float] = {}
    best: dict[tuple, float] = {}
    for r in payload["rows"]:
        kind, key = kinds.get(r.get("model", "")), (r["task"], r["length"])
        if kind == "bow":
            bow[key] = max(bow.get(key, float("-inf")), r["main"])
        elif kind not in NO_MODEL:
            best[key] = max(best.get(key, float("-inf")), r["main"])
    return {k for k, v in bow.items() if k in best and v >= best[k] - margin - 1e-9}  # 1e-9: 10.00 points is within


def multi_vs_single(rows: list[dict]) -> list[dict]:
    """For each run with a ``multi`` mode: multi minus each single-vector mode, per task, over the same queries
    (stacked over lengths, stratified by length; queries clustered by document).
    [{"model", "a", "b", "tasks": {task: paired_test + "p_holm"}}], Holm-adjusted over every test returned."""
    by: dict[tuple[str, str, str], list[dict]] = {}  # (run, mode, task) -> rows over lengths
    for r in rows:
        if r.get("per_query") and r.get("context") != "baseline":  # BM25 and the controls: no multi - single
            ext = r.get("extension", "none")
            model = r.get("model", "") + ("" if ext == "none" else f" + {ext}")  # each extension its own run
            by.setdefault((model, r["mode"], r["task"]), []).append(r)
    out = []
    for model in dict.fromkeys(k[0] for k in by):
        modes = list(dict.fromkeys(k[1] for k in by if k[0] == model))
        if "multi" not in modes:
            continue
        for single in (m for m in modes if m.startswith("single")):
            tasks = {}
            for task in dict.fromkeys(k[2] for k in by if k[0] == model):
                a = sorted(by.get((model, "multi", task), []), key=lambda r: r["length"] or 0)
                b = sorted(by.get((model, single, task), []), key=lambda r: r["length"] or 0)
                if a and len(a) == len(b) and all(x["qids"] == y["qids"] and x["length"] == y["length"]
                                                  for x, y in zip(a, b)):
                    groups = [x["length"] for x in a for _ in x["per_query"]]
                    tasks[task] = paired_test([v for x in a for v in x["per_query"]],
                                              [v for y in b for v in y["per_query"]], groups=groups,
                                              clusters=[c for x in a for c in clusters_of(x)])
            if tasks:
                out.append({"model": model, "a": "multi", "b": single, "tasks": tasks})
    tests = [d for p in out for d in p["tasks"].values()]
    for d, adjusted in zip(tests, holm([d["p"] for d in tests])):
        d["p_holm"] = adjusted
    return out


def plot(payload: dict, out: Path) -> list[str]:
    """``eval-<task>.png`` per synthetic task; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["rows"] if r["length"] is not None]
    refs = references(payload)
    written = []
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        modes = list(dict.fromkeys(r["mode"] for r in mine if r.get("model", "") not in refs))
        if not modes:
            continue
        fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 3.6), sharey=True, squeeze=False)
        for ax, mode in zip(axes[0], modes):
            for name in dict.fromkeys(r.get("model", "") for r in mine):
                pts = sorted((r for r in mine if r.get("model", "") == name
                              and (r["mode"] == mode or (name in refs and r["mode"] in ("single", "multi", "bm25", "length")))),
                             key=lambda r: (r["mode"], r["length"]))
                for ref_mode in dict.fromkeys(r["mode"] for r in pts):
                    line = [r for r in pts if r["mode"] == ref_mode]
                    x, y = [r["length"] for r in line], [r["main"] for r in line]
                    label = name if name not in refs or ref_mode == "single" else f"{name} ({ref_mode})"
                    if name in refs:
                        color = REFERENCE_COLORS[sorted(refs).index(name) % len(REFERENCE_COLORS)]
                        ax.plot(x, y, linestyle="--" if ref_mode != "multi" else ":", color=color, alpha=0.8,
                                marker=".", label=label)
                    else:
                        err = [[r["main"] - r["ci"][0] for r in line], [r["ci"][1] - r["main"] for r in line]] \
                            if all(r.get("ci") for r in line) else None
                        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
            ax.set_xscale("log", base=2)
            lengths = sorted({r["length"] for r in mine})
            ax.set_xticks(lengths, [_k(n) for n in lengths])
            ax.minorticks_off()
            ax.set_title(f"{task}: {mode}")
            ax.set_xlabel("length (tokens)")
            ax.set_ylim(-0.02, 1.02)
        axes[0][0].set_ylabel("Acc@1")
        axes[0][-1].legend(fontsize=6, loc="best")
        fig.tight_layout()
        name = f"eval-{task.replace('/', '-')}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def _k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)
