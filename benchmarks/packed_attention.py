"""Packed rows through ModernBERT's SDPA path: each text on its own (``forward_rows``) against dense masks.

    .venv/bin/python benchmarks/packed_attention.py     # ~1 min on 2 CPU cores -> stdout

The small scale's student (hidden 256, 4 layers, 4 heads, a 128-token window on layers 1 and 2) on 4 packed
rows of 2,048 tokens (11 documents), forward + backward, fp32 and bf16 autocast, alternating:

* ``dense``: every layer gets a (R, 1, T, T) document mask (sliding layers also the band), so each layer
  computes full 2,048 x 2,048 scores: ``forward_rows`` before 2026-12;
* ``per text``: ``forward_rows`` now: each text of a row attends on its own (``row_spans``), global layers
  by one unmasked SDPA per text (sum(n_i^2) scores, not T^2), sliding layers by ``banded_sdpa`` in
  ``PACKED_BLOCK``-query blocks of that text.

Prints the medians, the ratio and the largest difference of the two outputs. Reports only; no test depends on it.
"""

from __future__ import annotations

import statistics
import time

import torch

from dewey_lab.model import attention
from dewey_lab.model.student import StudentConfig, build_student, load_tokenizer
from dewey_lab.resolve import OFFLINE_TEACHER

LENGTHS = [[700, 900, 448], [2048], [1000, 1000, 48], [512, 512, 512, 512]]  # documents per 2,048-token row


def packed_batch(rows: list[list[int]], width: int = 2048) -> dict[str, torch.Tensor]:
    token_doc = torch.full((len(rows), width), -1)
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    d = 0
    for r, lengths in enumerate(rows):
        a = 0
        for n in lengths:
            token_doc[r, a:a + n], pos[r, a:a + n] = d, torch.arange(n)
            a, d = a + n, d + 1
    return {"input_ids": torch.randint(1000, 20000, (len(rows), width)), "position_ids": pos,
            "token_doc": token_doc, "attention_mask": (token_doc >= 0).long()}


def dense(model, batch):
    masks = attention.document_masks(batch["token_doc"], model.config.sliding_window)
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=masks).last_hidden_state


def main(repeat: int = 4) -> None:
    torch.manual_seed(0)
    tok = load_tokenizer(OFFLINE_TEACHER)
    spec = StudentConfig(tokenizer=OFFLINE_TEACHER, attn_implementation="sdpa",
                         config={"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
                                 "num_attention_heads": 4, "max_position_embeddings": 8192})
    model = build_student(spec, tok)
    batch = packed_batch(LENGTHS)
    with torch.no_grad():
        diff = float((dense(model, batch) - attention.forward_rows(model, batch)).abs().max())
    cases = {"dense": dense, "per text": attention.forward_rows}
    times: dict[tuple[str, bool], list[float]] = {}
    for rep in range(repeat + 1):  # the first round is a warm-up
        for bf16 in (False, True):
            for name, fn in cases.items():
                model.zero_grad()
                t = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    h = fn(model, batch)
                h.float().pow(2).mean().backward()
                if rep:
                    times.setdefault((name, bf16), []).append(time.perf_counter() - t)
    print(f"largest |dense - per text| (fp32): {diff:.2e}; {torch.get_num_threads()} threads, "
          f"PACKED_BLOCK {attention.PACKED_BLOCK}\n")
    print("| precision | dense s | per text s | dense / per text |\n|---|---:|---:|---:|")
    for bf16 in (False, True):
        a, b = (statistics.median(times[(n, bf16)]) for n in cases)
        print(f"| {'bf16 autocast' if bf16 else 'fp32'} | {a:.3f} | {b:.3f} | {a / b:.2f}x |")
    before, now = statistics.median(times[("dense", False)]), statistics.median(times[("per text", True)])
    print(f"\nbf16 per text against fp32 dense (the path before 2026-12): {before / now:.2f}x")


if __name__ == "__main__":
    main()
