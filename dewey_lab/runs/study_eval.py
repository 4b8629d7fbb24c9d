"""A study's evaluation after training: the ``dewey-lab eval`` study its file names, folded into its report.

A study names its post-fit evaluation in its opening comment, ``# eval: experiments/<name>.yaml``: a
``dewey-lab eval`` study whose ``runs`` are the study's run directories (each one's last checkpoint),
``untrained:<run>`` and the reference models (the teacher, BM25), all on the same generated sets and
real-text tasks, so every row scores the same queries. ``make compare`` runs it (passage vectors are
cached: a rerun, or a run after a kill, resumes) and adds to ``results/<study>/report.md``:

* one row per run and scoring mode: Acc@1 of each synthetic task per length and over lengths, nDCG@10
  of each real-text task, each with its 95% bootstrap interval, ``*`` where it differs from the
  reference row (the first run's row of the same mode; paired sign-flip test over the same queries);
* within each run, multi-vector against single-vector (paired, same queries): the paper's comparison;
* ``eval-<task>.png``: Acc@1 against length, one panel per scoring mode, trained runs with error bars,
  the reference models as dashed lines.
"""

from __future__ import annotations

import re
from pathlib import Path

from dewey_lab.eval.report import _run, _score
from dewey_lab.eval.stats import SIGNIFICANCE_RULE, mark, paired_test

EVAL_LINE = re.compile(r"#\s*eval:\s*(\S+)")
REFERENCE_COLORS = ("black", "dimgrey", "darkgoldenrod", "purple", "teal")  # dashed: single vector, dotted: multi


def eval_file(study_file: Path) -> Path | None:
    """The eval study named by a ``# eval: <path>`` line in the study file's opening comment, or None."""
    if not study_file.is_file():
        return None
    for line in study_file.read_text().splitlines():
        if not line.startswith("#"):
            break
        m = EVAL_LINE.fullmatch(line.strip())
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
    """Whether an eval run's model spec names a training run's student: a ``.ckpt``, a run directory, an
    experiment's run folder or ``untrained:<run>``; anything else (a hub id, a model directory, ``bm25``) is a
    reference model."""
    from dewey_lab.eval.load import UNTRAINED, run_kind

    return model.startswith(UNTRAINED) or run_kind(model) is not None


def references(payload: dict) -> set[str]:
    """Names (labels) of the runs that are reference models (teacher, BM25), not the study's students."""
    runs = payload.get("settings", {}).get("runs") or []
    return {r.get("label") or r["model"] for r in runs if not is_student(str(r.get("model", "")))}


def section(payload: dict, config: Path, plots: list[str]) -> list[str]:
    """Markdown lines: the table of every run and mode, then multi- against single-vector within each run."""
    rows = payload["rows"]
    runs = list(dict.fromkeys(_run(r) for r in rows))
    synth = list(dict.fromkeys(r["task"] for r in rows if r["length"] is not None))
    real = list(dict.fromkeys(r["task"] for r in rows if r["length"] is None))
    lengths = sorted({r["length"] for r in rows if r["length"] is not None})
    by_key = {(_run(r), r["task"], r["length"]): r for r in rows}
    summary, ci, vs = payload["summary"], payload.get("summary_ci", {}), payload.get("summary_vs_ref", {})
    head = ["run: mode", *(f"{t}@{_k(n)}" for t in synth for n in lengths), *(f"{t} avg" for t in synth),
            *(f"{t} nDCG@10" for t in real)]
    lines = [f"## After training: `{config}`", "",
             f"Every run scores the same queries. Synthetic tasks: Acc@1 (%); real-text tasks: nDCG@10 (%). "
             f"{SIGNIFICANCE_RULE} Reference per mode: " +
             "; ".join(f"{m}: {r}" for m, r in payload.get("reference", {}).items()) + ".", "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for run in runs:
        cells = []
        for t in synth:
            for n in lengths:
                r = by_key.get((run, t, n))
                cells.append(_score(r["main"], r.get("ci"), r.get("vs_ref", {}).get("p")) if r else "")
        for t in synth:
            value = summary.get(run, {}).get(t)
            cells.append("" if value is None else
                         _score(value / 100, ci.get(run, {}).get(t), vs.get(run, {}).get(t, {}).get("p")))
        for t in real:
            r = by_key.get((run, t, None))
            cells.append(_score(r["main"], r.get("ci"), r.get("vs_ref", {}).get("p")) if r else "")
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    lines.append("")
    pairs = multi_vs_single(rows)
    if pairs:
        tasks = list(dict.fromkeys(t for p in pairs for t in p["tasks"]))
        lines += [("Multi-vector against single-vector within each run: mean difference in points, its 95% paired "
                   "bootstrap interval, `*` at p < 0.05 (sign-flip test over the same queries; synthetic tasks: "
                   "Acc@1 over all lengths, stratified by length; real-text: nDCG@10)."), "",
                  "| run | comparison | " + " | ".join(tasks) + " |", "|---|---|" + "---:|" * len(tasks)]
        for p in pairs:
            cells = []
            for t in tasks:
                d = p["tasks"].get(t)
                cells.append("" if d is None else f"{100 * d['diff']:+.2f} [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]"
                             + (f" {mark(d['p'])}" if mark(d["p"]) else ""))
            lines.append(f"| {p['model']} | {p['a']} − {p['b']} | " + " | ".join(cells) + " |")
        lines.append("")
    if plots:
        lines += ["Plots: " + ", ".join(f"`{p}`" for p in plots) + " (Acc@1 against length per scoring mode; "
                  "95% intervals as error bars; the reference models dashed).", ""]
    return lines


def multi_vs_single(rows: list[dict]) -> list[dict]:
    """For each run with a ``multi`` mode: multi minus each single-vector mode, per task, over the same queries
    (stacked over lengths, stratified by length). [{"model", "a", "b", "tasks": {task: paired_test}}]."""
    by: dict[tuple[str, str, str], list[dict]] = {}  # (run, mode, task) -> rows over lengths
    for r in rows:
        if r.get("per_query"):
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
                                              [v for y in b for v in y["per_query"]], groups=groups)
            if tasks:
                out.append({"model": model, "a": "multi", "b": single, "tasks": tasks})
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
                              and (r["mode"] == mode or (name in refs and r["mode"] in ("single", "multi", "bm25")))),
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
