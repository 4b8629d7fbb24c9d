"""How long the command line takes to start: ``import dewey_lab.cli`` and each command's ``--help``.

    .venv/bin/python benchmarks/startup.py                        # this tree, 5 runs each -> stdout
    .venv/bin/python benchmarks/startup.py --before /tmp/before   # and an older copy of the package, interleaved

``--before DIR`` is a directory holding an older ``dewey_lab/`` (and its ``experiments/``), put first on
PYTHONPATH; its runs alternate with this tree's, so both see the same load on shared cores. Every command
runs from a scratch directory (so the current directory shadows neither tree); a figure is the median wall
time over ``--repeat`` runs (``time.perf_counter`` around the process, as ``/usr/bin/time -f %e``), and
``-X importtime``'s cumulative microseconds for ``dewey_lab.cli``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
COMMANDS = {
    'python -c "import dewey_lab.cli"': [sys.executable, "-c", "import dewey_lab.cli"],
    "dewey-lab --help": [str(BIN / "dewey-lab"), "--help"],
    "dewey-lab eval --help": [str(BIN / "dewey-lab"), "eval", "--help"],
    "dewey-lab fit --help": [str(BIN / "dewey-lab"), "fit", "--help"],
}
HEAVY = ("torch", "lightning", "transformers", "sentence_transformers")


def _env(tree: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONPATH": tree} if tree else env


def wall(cmd: list[str], tree: str | None, cwd: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=_env(tree), cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def import_time(tree: str | None, cwd: str) -> tuple[float, list[str]]:
    """(seconds ``import dewey_lab.cli`` takes by ``-X importtime``, which of HEAVY it imported)."""
    code = f"import sys, dewey_lab.cli; print(*[m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=_env(tree), cwd=cwd,
                         capture_output=True, text=True, check=True)
    line = next(ln for ln in out.stderr.splitlines() if ln.endswith("| dewey_lab.cli"))
    return int(line.split("|")[1]) / 1e6, out.stdout.split()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default=None, help="a directory with an older dewey_lab/ to compare against")
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args(argv)
    trees = {"after": None, "before": a.before} if a.before else {"now": None}
    times: dict[tuple[str, str], list[float]] = {}
    heavy = {}
    with tempfile.TemporaryDirectory() as cwd:
        for _ in range(a.repeat):
            for label, tree in trees.items():
                seconds, heavy[label] = import_time(tree, cwd)
                times.setdefault(("-X importtime: dewey_lab.cli (cumulative)", label), []).append(seconds)
                for name, cmd in COMMANDS.items():
                    times.setdefault((name, label), []).append(wall(cmd, tree, cwd))
    names = list(dict.fromkeys(name for name, _ in times))
    print(f"| command | {' | '.join(f'{t} (median s)' for t in trees)} | runs |")
    print(f"|---|{'---:|' * len(trees)}---:|")
    for name in names:
        cells = " | ".join(f"{statistics.median(times[name, t]):.2f}" for t in trees)
        print(f"| `{name}` | {cells} | {a.repeat} |")
    for label in trees:
        print(f"\n{label}: `import dewey_lab.cli` leaves {', '.join(heavy[label]) or 'none'} of "
              f"{', '.join(HEAVY)} in sys.modules")


if __name__ == "__main__":
    main()
