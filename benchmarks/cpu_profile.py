"""Where a CPU training step and an evaluation batch spend their time: torch.profiler, fp32 and bf16.

    .venv/bin/python benchmarks/cpu_profile.py      # ~2 min on 2 CPU cores -> results/bench-cpu-profile-tables.md

The cases are ``suite.py``'s ``precision`` ones (the small scale's student): one training step on 4
packed rows of 2,048 corpus tokens (DistillModule forward + losses + backward + StableAdamW) and one
``Embedder.encode_passages`` call over 3 passkey passages of 2k / 4k / 8k tokens (late chunks on),
each after one untimed warm-up call, profiled with CPU activities. Tables:
``key_averages().table(sort_by="self_cpu_time_total", row_limit=15)``. Reports only.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from suite import TINY_STUDENT, precision_embed_cases, precision_train_cases  # benchmarks/ is on sys.path
from torch.profiler import ProfilerActivity, profile, record_function

REPO = Path(__file__).resolve().parent.parent


def profiled(fn, label: str) -> str:
    fn()  # warm-up: oneDNN kernel choice, allocator
    with profile(activities=[ProfilerActivity.CPU]) as prof, record_function(label):
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "results" / "bench-cpu-profile-tables.md"))
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 16))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    train, _ = precision_train_cases(TINY_STUDENT)
    embed, _ = precision_embed_cases(TINY_STUDENT, per_length=1)
    parts = [f"# torch.profiler tables ({a.threads} threads, torch {torch.__version__})", "",
             "`python benchmarks/cpu_profile.py`; reading: results/bench-cpu-profile.md.", ""]
    for name, cases in (("training step", train), ("evaluation batch", embed)):
        for dtype in ("fp32", "bf16"):
            table = profiled(cases[dtype], f"{name} {dtype}")
            parts += [f"## {name}, {dtype}", "", "```", table.rstrip(), "```", ""]
            print(parts[-4][:3000], flush=True)
    Path(a.out).write_text("\n".join(parts))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
