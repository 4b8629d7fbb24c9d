"""Peak memory and time to embed one long passage with the tiny student on CPU: blocked
sliding-window SDPA (dewey_lab.model.attention, what the Embedder uses past 2048 tokens) against the
dense-mask SDPA path transformers builds by default.

    python benchmarks/long_passage_memory.py --lengths 8192,16384,32768 --dense-up-to 16384

Each measurement runs in its own process, so peak RSS is that configuration's alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

from isolated import TINY_STUDENT, run_case  # benchmarks/ is the script's own folder, on sys.path


def measure(length: int, path: str, precision: str = "32-true") -> dict:
    import torch

    from dewey_lab.model.attention import banded, key_masks
    from dewey_lab.model.student import StudentConfig, build_student, load_tokenizer
    from dewey_lab.resolve import OFFLINE_TEACHER

    torch.set_num_threads(2)
    spec = StudentConfig(tokenizer=OFFLINE_TEACHER, attn_implementation="sdpa",
                         config={**TINY_STUDENT, "max_position_embeddings": 131072})
    model = build_student(spec, load_tokenizer(OFFLINE_TEACHER)).eval()
    ids = torch.randint(1000, 20000, (1, length))
    mask = torch.ones_like(ids)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    bf16 = precision == "bf16-mixed"
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if path == "banded":
            with banded(model):
                model(input_ids=ids, attention_mask=key_masks(mask))
        else:
            model(input_ids=ids, attention_mask=mask)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"length": length, "path": path, "seconds": round(seconds, 3), "peak_mib": int(peak),
            "model_mib": int(base), "precision": precision}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="8192,16384,32768")
    p.add_argument("--dense-up-to", type=int, default=16384, help="skip the dense path above this (32k: ~17 GiB)")
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"], help="bf16-mixed: autocast")
    p.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(int(a.one[0]), *a.one[1:])))
        return
    print("| length | path | seconds | peak RSS (MiB) |\n|---:|---|---:|---:|")
    for n in [int(x) for x in a.lengths.split(",")]:
        for path in ("banded", "dense"):
            if path == "dense" and n > a.dense_up_to:
                continue
            r = run_case(__file__, n, path, a.precision)
            if isinstance(r, str):
                print(f"| {n} | {path} | failed: {r} | |")
                continue
            print(f"| {n} | {path} | {r['seconds']} | {r['peak_mib']} |", flush=True)


if __name__ == "__main__":
    main()
