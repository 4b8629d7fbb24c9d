"""``make bench-gpu``: the student's training throughput on one GPU -> results/bench-gpu.md. Self-contained.

    python benchmarks/bench_gpu.py            # CUDA: ModernBERT-base and -large at 2,048 tokens, bf16 (< 8 min)
    python benchmarks/bench_gpu.py --smoke    # any machine: tiny shapes, the same code paths (< 2 min on a CPU)

Runs on a bare, offline CUDA machine with torch and transformers (the DistillModule also needs
lightning and torchmetrics): no package of ours installed (the repository goes on sys.path), no hub,
no teacher, no corpus download, no cache. What it measures:

* random-init ModernBERT-base / -large shapes (answerdotai's config.json values) as the student,
  a linear projection to a 4,096-d teacher space (Linq-Embed-Mistral's width) and Dewey's two loss
  terms (cosine on the whole text and on 256-token chunks, similarity-matrix MSE);
* real text lengths: the offline pydoc corpus (rendered from this Python's standard library),
  tokenised with all-MiniLM-L6-v2's tokenizer, shipped in ``benchmarks/tokenizer/``; each document
  cut at 2,048 tokens; teacher vectors are random (the teacher is not what is timed);
* per shape: padded rows through SDPA against packed rows through torch's varlen kernels (and
  flash-attn when it imports), each with ``torch.compile`` off and on; a step is forward, both
  losses, backward and AdamW (torch's; StableAdamW is torch-optimi's, not on a bare machine);
* real (non-padding) tokens/s, model FLOP utilisation against 989 TFLOP/s dense bf16 (H100/H200
  datasheet), peak GPU memory;
* one long passage through the large shape at 32k and 128k tokens (inference): time and peak memory.

FLOPs counted per real token (``train_flops_per_token``): 6 N for the N non-embedding weights
(forward + backward), plus attention 12 x hidden x context per layer (QK^T and AV, 2 x 2 x hidden x
context forward, x3 with backward), the context being the token's own text on global layers and at
most the 128-token window on local ones. Padding is not counted: only useful work is.

On a GPU each case runs in its own process (peak memory is its own; the smoke run keeps them in one);
the whole run stops adding cases when its time budget (``--budget``, 420 s) is spent and says which
were left out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # dewey_lab from this checkout, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))
from isolated import run_case

TOKENIZER = Path(__file__).resolve().parent / "tokenizer"  # all-MiniLM-L6-v2's (Apache-2.0): 30,522 WordPiece ids
SHAPES = {  # ModernBERT-base / -large (answerdotai config.json), random init: no hub needed
    "base": {"hidden_size": 768, "intermediate_size": 1152, "num_hidden_layers": 22, "num_attention_heads": 12},
    "large": {"hidden_size": 1024, "intermediate_size": 2624, "num_hidden_layers": 28, "num_attention_heads": 16},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2,
             "local_attention": 16},
}
DENSE_BF16_TFLOPS = 989.0  # H100 / H200 SXM datasheet, dense bf16
TEACHER_DIM = 4096  # Linq-Embed-Mistral
CHUNK = 256  # tokens per chunk target


# -- data -----------------------------------------------------------------------------------------
def lengths_and_ids(max_length: int, n_texts: int, seed: int = 0) -> list[list[int]]:
    """Token ids of ``n_texts`` offline-corpus documents, each cut at ``max_length`` tokens."""
    from transformers import AutoTokenizer

    from dewey_lab.data.pydoc import PydocCorpus

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER), local_files_only=True)
    docs = [d.text for d in PydocCorpus(cache_path=str(REPO / "data" / "pydoc_corpus.jsonl")).documents()]
    random.Random(seed).shuffle(docs)
    out = []
    for text in docs[:n_texts]:
        out.append(tok(text[: max_length * 16], truncation=True, max_length=max_length)["input_ids"])
    return out


def items_of(ids: list[list[int]], dim: int, seed: int = 0) -> list[dict]:
    """Collate-ready items: text tokens between CLS and SEP, 256-token chunks, random unit teacher vectors."""
    import numpy as np

    rng = np.random.default_rng(seed)
    items = []
    for x in ids:
        n = len(x)
        spans = [(a, min(a + CHUNK, n - 1)) for a in range(1, n - 1, CHUNK)]
        t = rng.standard_normal((1 + len(spans), dim)).astype("float32")
        t /= np.linalg.norm(t, axis=1, keepdims=True)
        items.append({"input_ids": x, "content_mask": [False] + [True] * (n - 2) + [False], "spans": spans,
                      "t_whole": t[0], "t_chunk": t[1:]})
    return items


def train_flops_per_token(cfg, params: int, texts: list[int]) -> float:
    """Model FLOPs per real token of one training step (see the module docstring)."""
    globals_ = sum(t == "full_attention" for t in cfg.layer_types)
    locals_ = cfg.num_hidden_layers - globals_
    total = sum(texts)
    ctx_global = sum(n * n for n in texts) / total  # a token attends its own text
    ctx_local = sum(n * min(n, cfg.local_attention) for n in texts) / total
    return 6 * params + 12 * cfg.hidden_size * (globals_ * ctx_global + locals_ * ctx_local)


# -- one case, in its own process -----------------------------------------------------------------
def train_case(shape: str, attn: str, layout: str, compiled: str, max_length: int, batch: int, steps: int,
               warmup: int) -> dict:
    from dewey_lab.data.items import collate
    from dewey_lab.model.module import DistillModule
    from dewey_lab.model.student import StudentConfig

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    ids = lengths_and_ids(max_length, batch * 4)
    dim = TEACHER_DIM if shape != "tiny" else 32
    items = items_of(ids, dim)
    batches = [collate(items[i:i + batch], pack_length=max_length if layout == "packed" else None)
               for i in range(0, len(items), batch)]
    spec = StudentConfig(tokenizer=str(TOKENIZER), attn_implementation=attn,
                         config={**SHAPES[shape], "max_position_embeddings": 8192})
    module = DistillModule(student=spec, teacher_dim=dim, projection="linear").to(device)
    if compiled == "on":
        module.student.compile(dynamic=True)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.0)
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ends, real, computed, losses = [], [], [], []
    for step in range(warmup + steps):
        b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batches[step % len(batches)].items()}
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            loss, _ = module.compute_losses(b, module(b))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
        real.append(int(b["attention_mask"].sum()))
        computed.append(b["attention_mask"].numel())
        losses.append(float(loss))
    seconds = ends[-1] - ends[warmup - 1]
    tokens = sum(real[warmup:])
    params = sum(p.numel() for n, p in module.student.named_parameters() if "embeddings" not in n)
    texts = [len(x) for x in ids]
    flops = train_flops_per_token(module.student.config, params, texts)
    return {"shape": shape, "attn": module.student.config._attn_implementation, "layout": layout,
            "compile": compiled, "steps": steps, "seconds": seconds, "real_tokens_per_s": tokens / seconds,
            "padding": 1 - tokens / sum(computed[warmup:]), "mean_text_tokens": sum(texts) / len(texts),
            "mfu": flops * tokens / seconds / (DENSE_BF16_TFLOPS * 1e12),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "loss_first": losses[0], "loss_last": losses[-1], "finite": all(math.isfinite(x) for x in losses)}


def long_case(shape: str, tokens: int) -> dict:
    """One passage of ``tokens`` random ids through the student, inference, bf16 on CUDA."""
    from dewey_lab.model.student import StudentConfig, build_student, load_tokenizer

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    spec = StudentConfig(tokenizer=str(TOKENIZER), config={**SHAPES[shape], "max_position_embeddings": 131072})
    model = build_student(spec, load_tokenizer(str(TOKENIZER))).to(device).eval()
    ids = torch.randint(1000, 30000, (1, tokens), device=device)
    if cuda:
        model = model.to(torch.bfloat16)
        torch.cuda.reset_peak_memory_stats()
    times = []
    with torch.inference_mode():
        for _ in range(2):  # the first pass includes kernel selection
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return {"shape": shape, "tokens": tokens, "attn": model.config._attn_implementation, "seconds": times[-1],
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


# -- the run ----------------------------------------------------------------------------------------
def plan(smoke: bool) -> tuple[list[tuple], list[tuple]]:
    """(training cases, long-passage cases)."""
    from dewey_lab.model.attention import TORCH_VARLEN, has_torch_varlen

    if smoke or not torch.cuda.is_available():
        layouts = [("sdpa", "padded"), ("sdpa", "packed")]
        if has_torch_varlen():
            layouts.append((TORCH_VARLEN, "packed"))
        train = [("tiny", a, lay, "off") for a, lay in layouts]
        return train, [("tiny", 2048)]
    import importlib.util

    layouts = [("sdpa", "padded")]
    if has_torch_varlen():
        layouts.append((TORCH_VARLEN, "packed"))
    if importlib.util.find_spec("flash_attn") is not None:
        layouts.append(("flash_attention_2", "packed"))
    train = [(shape, a, lay, c) for shape in ("base", "large") for c in ("off", "on") for a, lay in layouts]
    return train, [("large", 32768), ("large", 131072)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes and few steps (any machine)")
    p.add_argument("--out", default=str(REPO / "results" / "bench-gpu.md"))
    p.add_argument("--max_length", type=int, default=None, help="tokens per text (2,048; smoke: 256)")
    p.add_argument("--batch", type=int, default=16, help="texts per step (Dewey: 64 over several GPUs)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (GPU 10, smoke 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (GPU 3, smoke 1)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for all cases; later ones are skipped")
    p.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:  # a case in a child process: print its JSON
        kind, *args = a.one
        out = train_case(*args[:4], *map(int, args[4:])) if kind == "train" else long_case(args[0], int(args[1]))
        print(json.dumps(out))
        return
    smoke = a.smoke or not torch.cuda.is_available()
    max_length = a.max_length or (256 if smoke else 2048)
    steps, warmup = a.steps or (3 if smoke else 10), a.warmup or (1 if smoke else 3)
    batch = a.batch if not smoke else min(a.batch, 8)
    train, long = plan(smoke)
    t0, rows, longs, skipped = time.perf_counter(), [], [], []
    for case in train:
        if time.perf_counter() - t0 > a.budget:
            skipped.append(" ".join(case))
            continue
        r = (_inline(train_case, *case, max_length, batch, steps, warmup) if smoke else  # no peak memory to isolate
             run_case(__file__, "train", *case, max_length, batch, steps, warmup))
        rows.append(r if isinstance(r, dict) else dict(zip(("shape", "attn", "layout", "compile"), case), error=r))
        print(json.dumps(rows[-1]), file=sys.stderr)
    for shape, tokens in long:
        if time.perf_counter() - t0 > a.budget:
            skipped.append(f"{shape} {tokens}")
            continue
        r = _inline(long_case, shape, tokens) if smoke else run_case(__file__, "long", shape, tokens)
        longs.append(r if isinstance(r, dict) else {"shape": shape, "tokens": tokens, "error": r})
        print(json.dumps(longs[-1]), file=sys.stderr)
    write_report(Path(a.out), rows, longs, skipped, smoke, max_length, batch, steps, time.perf_counter() - t0)


def _inline(case, *args) -> dict | str:
    """A case in this process (smoke mode): its result, or its error's last line as ``run_case`` gives it."""
    try:
        return case(*args)
    except Exception as err:  # noqa: BLE001 - reported in the table, as a failed subprocess case is
        return f"{type(err).__name__}: {err}".splitlines()[0]


def _f(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def write_report(path: Path, rows: list[dict], longs: list[dict], skipped: list[str], smoke: bool, max_length: int,
                 batch: int, steps: int, seconds: float) -> None:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    about = (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {device}, torch {torch.__version__}, "
             f"Python {platform.python_version()}; {seconds:.0f} s in all. Texts: the offline pydoc corpus cut at "
             f"{max_length} tokens, {batch} per step; {steps} timed steps after warm-up; random teacher vectors "
             f"({TEACHER_DIM if not smoke else 32}-d). MFU against {DENSE_BF16_TFLOPS:.0f} TFLOP/s dense bf16 "
             "(FLOPs per real token: 6 N + 12 x hidden x context per layer; `benchmarks/bench_gpu.py`).")
    lines = [f"# make bench-gpu{' --smoke' if smoke else ''}", "", about, "",
             "| shape | attention | layout | compile | real tokens/s | MFU | peak GiB | padding | loss first -> last |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['attn']} | {r['layout']} | {r['compile']} | failed: {r['error'][:120]} "
                         "| | | | |")
            continue
        lines.append(f"| {r['shape']} | {r['attn']} | {r['layout']} | {r['compile']} | {r['real_tokens_per_s']:,.0f} | "
                     f"{r['mfu']:.1%} | {_f(r['peak_gib'], '.1f')} | {r['padding']:.1%} | "
                     f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} |")
    lines += ["", "One long passage (inference):", "", "| shape | tokens | attention | seconds | peak GiB |",
              "|---|---:|---|---:|---:|"]
    for r in longs:
        cells = (f"failed: {r['error'][:120]} | | |" if "error" in r
                 else f"{r['attn']} | {r['seconds']:.2f} | {_f(r['peak_gib'], '.1f')} |")
        lines.append(f"| {r['shape']} | {r['tokens']:,} | {cells}")
    if skipped:
        lines += ["", f"Not run (time budget spent): {', '.join(skipped)}."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
