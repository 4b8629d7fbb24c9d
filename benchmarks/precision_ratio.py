"""fp32 against bf16 autocast on this machine, as ratios from one run (``trainer.precision: auto``'s case).

    .venv/bin/python benchmarks/precision_ratio.py             # ~6 min on 2 shared CPU cores -> stdout (markdown + JSON)
    .venv/bin/python benchmarks/precision_ratio.py --repeat 3  # fewer repetitions

Cases, each timed ``--repeat`` times with fp32 and bf16 alternating (shared cores drift; a ratio of
medians from interleaved runs is what to read):

* ``train step``: the small scale's student (small.yaml: hidden 256, 4 layers, 4 heads, intermediate 512,
  SDPA) on 4 x 2,048 tokens, forward + backward + AdamW step; bf16 is autocast over fp32 parameters
  (what Lightning's ``bf16-mixed`` does), the loss in fp32 outside it as ``DistillModule`` computes it.
* ``student embed``: ``Embedder`` over 20 passages of 2,048 tokens (generated passkey documents), the
  same student, single and late-chunk vectors, fp32 against ``dtype=bfloat16`` (eval's ``--dtype auto``).
* ``teacher fill``: the offline MiniLM teacher's ``encode`` of 256 passkey-filler texts of ~200 tokens,
  ``dtype: float32`` against ``auto`` (bf16 autocast where the CPU has bf16 matrix units).

Reports only; no test depends on it. ``benchmarks/suite.py`` may call ``measure()``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SMALL_STUDENT = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
                 "max_position_embeddings": 8192}
"""small.yaml's student."""


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleave(cases: dict, repeat: int) -> dict[str, list[float]]:
    """Seconds per call of each case, the cases alternating (one warm-up call each, not counted)."""
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeat):
        for name, fn in cases.items():
            times[name].append(_timed(fn))
    return times


def train_cases(rows: int = 4, length: int = 2048) -> dict:
    from dewey_lab.model.student import StudentConfig, build_student
    from dewey_lab.resolve import OFFLINE_TEACHER

    torch.manual_seed(0)
    student = build_student(StudentConfig(tokenizer=OFFLINE_TEACHER, config=dict(SMALL_STUDENT),
                                          attn_implementation="sdpa"))
    head = torch.nn.Linear(SMALL_STUDENT["hidden_size"], 384)
    params = [*student.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(1000, 20000, (rows, length))
    mask = torch.ones_like(ids)
    target = torch.nn.functional.normalize(torch.randn(rows, 384), dim=-1)

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hidden = student(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
            whole = head(hidden.mean(1))  # (B, D)
        loss = (1 - torch.nn.functional.cosine_similarity(whole.float(), target, dim=-1)).sum()  # fp32, outside
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"fp32": lambda: step(False), "bf16": lambda: step(True)}


def embed_cases(n_docs: int = 20, length: int = 2048) -> dict:
    from dewey_lab.eval.embedder import Embedder
    from dewey_lab.eval.tasks.synthetic import make_synthetic
    from dewey_lab.model.student import StudentConfig, build_student, load_tokenizer
    from dewey_lab.resolve import OFFLINE_TEACHER

    torch.manual_seed(0)
    student = build_student(StudentConfig(tokenizer=OFFLINE_TEACHER, config=dict(SMALL_STUDENT),
                                          attn_implementation="sdpa")).eval()
    tokenizer = load_tokenizer(OFFLINE_TEACHER)
    docs = list(make_synthetic("passkey", tokenizer, length, n_queries=1, n_docs=n_docs)[0].corpus.values())
    embedders = {name: Embedder(student, tokenizer, max_length=length, token_budget=8192, device="cpu", dtype=dtype)
                 for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    return {name: (lambda e=e: e.encode_passages(docs)) for name, e in embedders.items()}


def teacher_cases(n_texts: int = 256) -> dict:
    from dewey_lab.data.teacher import SentenceTransformerTeacher
    from dewey_lab.eval.tasks.synthetic import PASSKEY_FILLER

    fp32 = SentenceTransformerTeacher(dtype="float32", max_length=256)
    auto = SentenceTransformerTeacher(dtype="auto", max_length=256)
    auto.__dict__["model"] = fp32.model  # the same weights; auto adds bf16 autocast where the CPU has the units
    words = (PASSKEY_FILLER + " ") * 40
    texts = [f"{i} " + words[i % 50:][:900] for i in range(n_texts)]
    return {"fp32": lambda: fp32.encode(texts), f"auto ({auto.compute})": lambda: auto.encode(texts)}


def measure(repeat: int = 5) -> list[dict]:
    rows = []
    for name, build, what in (("train step", train_cases, "4 x 2,048 tokens, fwd + bwd + AdamW"),
                              ("student embed", embed_cases, "20 passages x 2,048 tokens"),
                              ("teacher fill", teacher_cases, "256 texts x ~200 tokens, MiniLM")):
        times = interleave(build(), repeat)
        (_, fp32), (bf16_name, bf16) = times.items()
        a, b = statistics.median(fp32), statistics.median(bf16)
        rows.append({"case": name, "what": what, "fp32_s": round(a, 3), f"{bf16_name}_s": round(b, 3),
                     "fp32_over_bf16": round(a / b, 2), "fp32_runs": [round(t, 3) for t in fp32],
                     "bf16_runs": [round(t, 3) for t in bf16]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 16))
    a = p.parse_args()
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    torch.set_num_threads(a.threads)
    from dewey_lab.precision import choose, cpu_bf16_units

    rows = measure(a.repeat)
    precision, why = choose("cpu")
    print(f"CPU: {platform.processor() or platform.machine()}, {a.threads} threads, bf16 units: "
          f"{', '.join(cpu_bf16_units()) or 'none'}; auto -> {precision} ({why}); torch {torch.__version__}\n")
    print("| case | what | fp32 s (median) | bf16 s (median) | fp32 / bf16 |\n|---|---|---|---|---|")
    for r in rows:
        bf16 = next(v for k, v in r.items() if k.endswith("_s") and k != "fp32_s")
        print(f"| {r['case']} | {r['what']} | {r['fp32_s']:.2f} | {bf16:.2f} | {r['fp32_over_bf16']:.2f} |")
    print()
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
