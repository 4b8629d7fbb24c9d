"""What the benchmarks share: one case per fresh process (``script --one ARG ...``, so its peak
memory is its own), and the tiny student's shape."""

from __future__ import annotations

import json
import subprocess
import sys

TINY_STUDENT = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4}
"""tiny.yaml's student (ModernBertConfig fields); each benchmark adds the max_position_embeddings it needs."""


def run_case(script: str, *args) -> dict | str:
    """The case's JSON result, or the last line of its error output when it failed."""
    out = subprocess.run([sys.executable, script, "--one", *map(str, args)], check=False, capture_output=True,
                         text=True)
    if out.returncode:
        lines = out.stderr.strip().splitlines() or ["no output"]
        return lines[-1]
    return json.loads(out.stdout.strip().splitlines()[-1])
