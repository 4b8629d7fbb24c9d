"""Learning curves of finished runs against the tokens they read: is a scale trained enough to mean something?

    python benchmarks/learning_curves.py --out results/small-scale/learning-curves \\
        tiny=runs/tiny/version_0 whole_only=runs/chunk_alignment_ablation/align=whole_only ...

For each run: its windows (rebuilt from its ``config.yaml`` by the data module, the same rule training used;
no teacher, no student) give the tokens of one epoch, so every logged step maps to the student tokens read
by then (steps x tokens per epoch / steps per epoch). Writes ``<out>.md`` (steps, epochs, tokens, first and
last val cosines and losses, wall time) and ``<out>.png`` (val/cos_whole, val/cos_chunk and train/loss
against tokens read, every run on the same axes; the teacher baselines ``val/cos_*_baseline`` dashed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from dewey_lab.files import atomic_write
from dewey_lab.runs.compare import read_run

PANELS = ("val/cos_whole", "val/cos_chunk", "train/loss")


def epoch_tokens(run_dir: Path) -> tuple[int, int, int]:
    """(training windows, student tokens in them, the longest window) of one epoch of the run's data."""
    from dewey_lab.data.datamodule import DistillDataModule

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    examples = DistillDataModule.from_config(config).examples()["train"]
    return len(examples), sum(len(e.input_ids) for e in examples), max(len(e.input_ids) for e in examples)


def curves(runs: dict[str, Path]) -> dict[str, dict]:
    out = {}
    for name, run_dir in runs.items():
        data = read_run(run_dir)
        info, scalars = data["info"], data["scalars"]
        windows, tokens, longest = epoch_tokens(run_dir)
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        epochs = config["trainer"]["max_epochs"]
        steps = info.get("global_step") or max(s for v in scalars.values() for s, _ in v)
        per_step = tokens * epochs / steps  # student tokens per optimizer step, averaged over the run
        out[name] = {"run": str(run_dir), "windows": windows, "epoch_tokens": tokens, "longest_window": longest,
                     "epochs": epochs, "steps": steps, "tokens": tokens * epochs, "tokens_per_step": per_step,
                     "wall_seconds": info.get("wall_seconds"), "finished": info.get("finished"),
                     "series": {k: [(s, s * per_step, v) for s, v in scalars.get(k, [])]
                                for k in (*PANELS, "val/cos_whole_baseline", "val/cos_chunk_baseline", "val/loss")}}
    return out


def report(found: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    lines = ["# Learning curves against tokens read", "",
             "Tokens: student tokens (special tokens included) of the run's training windows, rebuilt from its "
             "config.yaml, times its epochs; a step's tokens are the run's average per step. "
             "Command: `python benchmarks/learning_curves.py " + " ".join(f"{k}={v['run']}" for k, v in found.items()) +
             f" --out {out}`.", "",
             ("| run | windows x longest | epochs | steps | tokens read | tokens / step | val/cos_whole first -> last | "
              "val/cos_chunk first -> last | teacher baselines (whole / chunk) | wall (s) | finished |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in found.items():
        s = r["series"]

        def first_last(key: str, s=s) -> str:
            v = s[key]
            return f"{v[0][2]:.4f} (step {v[0][0]}) -> {v[-1][2]:.4f} (step {v[-1][0]})" if v else ""

        base = [f"{s[k][-1][2]:.4f}" if s[k] else "" for k in ("val/cos_whole_baseline", "val/cos_chunk_baseline")]
        lines.append(f"| {name} | {r['windows']} x {r['longest_window']} | {r['epochs']} | {r['steps']} | "
                     f"{r['tokens']:,} | {r['tokens_per_step']:,.0f} | {first_last('val/cos_whole')} | "
                     f"{first_last('val/cos_chunk')} | {' / '.join(base)} | {r['wall_seconds']} | {r['finished']} |")
    lines += ["", f"Plot: `{out.name}.png` (dashed: `val/cos_*_baseline` of each run).", ""]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.8))
    for ax, key in zip(axes, PANELS):
        for name, r in found.items():
            pts = r["series"][key]
            line, = ax.plot([p[1] for p in pts], [p[2] for p in pts], label=name, marker="o" if key != "train/loss" else None)
            base = r["series"].get(f"{key}_baseline") or []
            if base:
                ax.axhline(base[-1][2], linestyle="--", color=line.get_color(), alpha=0.6)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: minor labels overlap on a short axis
        ax.set_xlabel("student tokens read")
        ax.set_title(key)
        if key == "train/loss":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)
    atomic_write(out.with_suffix(".md"), "\n".join(lines) + "\n")
    atomic_write(out.with_suffix(".json"), json.dumps(found, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="name=run_directory")
    p.add_argument("--out", required=True, help="output path without suffix")
    a = p.parse_args(argv)
    runs = {}
    for spec in a.runs:
        name, _, path = spec.partition("=")
        if not path or not (Path(path) / "config.yaml").is_file():
            raise SystemExit(f"{spec!r}: give name=run_directory, a directory with config.yaml")
        runs[name] = Path(path)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report(curves(runs), out)
    print(out.with_suffix(".md"))


if __name__ == "__main__":
    main()
