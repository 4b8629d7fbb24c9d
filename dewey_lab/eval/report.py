"""Results: score rows -> per-task summaries, the LongEmbed average, JSON and a markdown table.

A row is one (task, length, mode) with every metric; the summary averages the main metric over
lengths per task (the paper's passkey / needle score) and, when all six LongEmbed tasks were run
in a mode, their mean (the paper's "Avg."). Files are written whole or not at all (temp file +
rename), so a crash never leaves a half-written result.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

from dewey_lab.files import atomic_write

LONGEMBED_SIX = ("passkey", "needle", "narrativeqa", "qmsum", "2wikimqa", "summ_screen_fd")


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


def _run(row: dict) -> str:
    """``single``, or ``single + pcw to 4096`` when the row ran through an extension (to its target length)."""
    ext = row.get("extension", "none")
    label = row["mode"] if ext == "none" else f"{row['mode']} + {ext}"
    if ext != "none" and row.get("target"):  # the same method to 1k and to 4k are two runs (s = 2, s = 8)
        label += f" to {row['target']}"
    return f"{row['model']}: {label}" if "model" in row else label  # a study's rows name their model


def markdown(payload: dict) -> str:
    """Per-length table for synthetic tasks (rows: lengths; columns: task x mode), then one row per
    real task, then the summary. Scores in percent; a dagger marks lengths where passages were
    truncated at the model's window."""
    rows, lines = payload["rows"], [f"# {payload['model']}", ""]
    meta = payload.get("settings", {})
    lines.append(", ".join(f"{k}: {v}" for k, v in meta.items() if v not in (None, "")))
    lines.append("")
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
    for mode, s in summary.items():
        lines.append(f"| {mode} | " + " | ".join(f"{s[t]:.2f}" if t in s else "" for t in tasks) + " |")
    if any(r["truncated"] for r in rows):
        lines += ["", "† passages longer than the model's window were truncated to it (no extension method)."]
    warned = {r["task"] + (f"@{r['length']}" if r["length"] else ""): r["warnings"] for r in rows if r.get("warnings")}
    if warned:
        lines += ["", "Read with care (counted in the files):", ""]
        lines += [f"- {task}: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in w.items()) for task, w in warned.items()]
    return "\n".join(lines) + "\n"


def _cell(row: dict, key: str = "main") -> str:
    return f"{100 * row[key]:.2f}" + (" †" if row["truncated"] else "")


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
