"""Run one benchmark case in a fresh process (``script --one ARG ...``), so its peak memory is its own."""

from __future__ import annotations

import json
import subprocess
import sys


def run_case(script: str, *args) -> dict | str:
    """The case's JSON result, or the last line of its error output when it failed."""
    out = subprocess.run([sys.executable, script, "--one", *map(str, args)], check=False, capture_output=True,
                         text=True)
    if out.returncode:
        lines = out.stderr.strip().splitlines() or ["no output"]
        return lines[-1]
    return json.loads(out.stdout.strip().splitlines()[-1])
