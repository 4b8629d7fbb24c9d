"""Peak memory and time of ``dewey_lab.encode``'s ``encode_chunks`` on one long text, tiny student, CPU.

Two ways to read a text longer than the model's 8,192-token window, same chunks (256 / 64 tokens):

* ``macro``: overlapping 8,192-token macro-windows (the default): memory bounded by one window;
* ``whole``: one pass over the whole text (RoPE runs past its window; blocked sliding-window SDPA
  for local layers, SDPA without a mask for global ones): no L x L matrix, but global attention
  costs grow as L^2 in time.

    python benchmarks/encode_chunks_memory.py --lengths 8192,32768,131072 --whole-up-to 32768

Each measurement runs in its own process; the peak is the process's RSS high-water mark during
``encode_chunks`` alone (reset just before it), printed beside the RSS before the call.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

from isolated import TINY_STUDENT, run_case  # benchmarks/ is the script's own folder, on sys.path


def measure(length: int, how: str) -> dict:
    import torch

    from dewey_lab.encode import Encoder
    from dewey_lab.eval.embedder import Embedder
    from dewey_lab.eval.tasks.heldout import default_haystack
    from dewey_lab.model.student import StudentConfig, build_student, load_tokenizer
    from dewey_lab.resolve import OFFLINE_TEACHER

    torch.set_num_threads(2)
    tok = load_tokenizer(OFFLINE_TEACHER)
    spec = StudentConfig(tokenizer=OFFLINE_TEACHER, attn_implementation="sdpa",
                         config={**TINY_STUDENT, "max_position_embeddings": 8192})  # tiny.yaml
    model = build_student(spec, tok).eval()
    hay = default_haystack()[:200_000]  # ~40k tokens of the evaluation-only text, repeated as needed
    ids = tok(hay, add_special_tokens=False, verbose=False)["input_ids"]
    reps = length // len(ids) + 1
    text = tok.decode((ids * reps)[: length - 2])  # ~length tokens with CLS and SEP
    window = 8192 if how == "macro" else length + 16
    enc = Encoder(Embedder(model, tok, max_length=8192, device="cpu"), window=window)
    del hay, ids
    _trim()
    base = _rss_mib("VmRSS")
    _reset_peak()  # the haystack's tokenisation above set a high-water mark of its own
    t0 = time.perf_counter()
    out = enc.encode_chunks(text)
    seconds = time.perf_counter() - t0
    peak = _rss_mib("VmHWM")
    n_tokens = len(tok(text, verbose=False)["input_ids"])
    return {"length": n_tokens, "how": how, "chunks": len(out.char_spans), "passes": out.windows,
            "seconds": round(seconds, 1), "peak_mib": int(peak), "before_mib": int(base)}


def _rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, MiB (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the lifetime peak


def _trim() -> None:
    try:  # glibc: hand freed heap back to the OS, so the call's growth is not hidden by reuse
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset VmHWM to the current RSS
    except OSError:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="8192,32768,131072")
    p.add_argument("--whole-up-to", type=int, default=32768, help="skip the one-pass path above this (time ~ L^2)")
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(int(a.one[0]), a.one[1])))
        return
    print("| tokens | how | chunks | passes | seconds | peak RSS in the call (MiB) | RSS before (MiB) |\n"
          "|---:|---|---:|---:|---:|---:|---:|")
    for n in [int(x) for x in a.lengths.split(",")]:
        for how in ("macro", "whole"):
            if how == "whole" and n > a.whole_up_to:
                continue
            r = run_case(__file__, n, how)
            if isinstance(r, str):
                print(f"| {n} | {how} | failed: {r} | | | | |")
                continue
            print(f"| {r['length']} | {how} | {r['chunks']} | {r['passes']} | {r['seconds']} | {r['peak_mib']} | "
                  f"{r['before_mib']} |", flush=True)


if __name__ == "__main__":
    main()
