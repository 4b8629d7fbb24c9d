"""``make compare EXP=<study>``: one row per run of a study, and plots, from its TensorBoard logs.

Reads ``runs/<study>/<variant>/`` (event files, ``run_info.json``) and writes
``results/<study>/report.md`` with the final losses, validation cosines, passkey / needle Acc@1 per
length, wall time and teacher-cache hit rate of every variant, plus ``loss.png`` (train/loss
curves) and ``passkey.png`` (Acc@1 against length at the last check, one line per variant).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from dewey_lab.files import atomic_write

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
    return {"scalars": {k: sorted(v) for k, v in scalars.items()}, "info": info}


def synthetic_at_last_check(scalars: dict) -> dict[str, dict[int, float]]:
    """{"passkey": {length: acc}, "needle": ...} from the last logged ``val/<task>@<length>``."""
    out: dict[str, dict[int, float]] = {}
    for tag, points in scalars.items():
        m = re.fullmatch(r"val/(passkey|needle)@(\d+)", tag)
        if m and points:
            out.setdefault(m.group(1), {})[int(m.group(2))] = points[-1][1]
    return out


def compare(study: str, runs_dir: str = "runs", out_dir: str = "results", study_file: str | None = None) -> Path:
    """Rows follow the study file's variant order (``experiments/<study>.yaml``), then any other run."""
    root = Path(runs_dir) / study
    runs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not runs:
        raise FileNotFoundError(f"no runs under {root}; run make train EXP={study} first")
    order = _variant_order(Path(study_file) if study_file else Path("experiments") / f"{study}.yaml")
    runs.sort(key=lambda r: (order.index(r.name) if r.name in order else len(order), r.name))
    data = {r.name: read_run(r) for r in runs}
    lengths = sorted({n for d in data.values() for t in synthetic_at_last_check(d["scalars"]).values() for n in t})
    head = ["variant", *COLUMNS, *(f"{t}@{n}" for t in ("passkey", "needle") for n in lengths), "wall (s)",
            "teacher hit rate", "finished"]
    lines = [f"# {study}", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, d in data.items():
        s, info = d["scalars"], d["info"]
        synth = synthetic_at_last_check(s)
        cells = [f"{s[c][-1][1]:.4f}" if s.get(c) else "" for c in COLUMNS]
        cells += [f"{synth.get(t, {}).get(n, float('nan')):.2f}" for t in ("passkey", "needle") for n in lengths]
        rate = info.get("data", {}).get("teacher_cache_hit_rate")
        cells += [str(info.get("wall_seconds", "")), "" if rate is None else f"{rate:.3f}",
                  str(info.get("finished", ""))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    out = Path(out_dir) / study
    out.mkdir(parents=True, exist_ok=True)
    _plots(data, lengths, out)
    lines += ["", "Plots: `loss.png` (train/loss by step), `passkey.png` (Acc@1 against length, last check)."]
    atomic_write(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"


def _variant_order(study_file: Path) -> list[str]:
    from dewey_lab.sweep import sweep_block, variants

    return [name for name, _ in variants(sweep_block([str(study_file)]))] if study_file.is_file() else []


def _plots(data: dict, lengths: list[int], out: Path) -> None:
    losses = {name: d["scalars"].get("train/loss", []) for name, d in data.items()}
    _line_plot(out / "loss.png", {n: ([p[0] for p in v], [p[1] for p in v]) for n, v in losses.items() if v},
               "step", "train/loss")
    passkey = {name: synthetic_at_last_check(d["scalars"]).get("passkey", {}) for name, d in data.items()}
    _line_plot(out / "passkey.png", {n: (lengths, [acc.get(x, float("nan")) for x in lengths])
                                     for n, acc in passkey.items() if acc},
               "length (tokens)", "passkey Acc@1", log2_x=True)


def _line_plot(path: Path, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str,
               log2_x: bool = False) -> None:
    """One line per variant; markers when the x values are few (lengths)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (x, y) in series.items():
        ax.plot(x, y, label=name, marker="o" if log2_x else None)
    if log2_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m dewey_lab.compare <study>   (make compare EXP=<study>)")
    print(compare(argv[0]))


if __name__ == "__main__":
    main()
