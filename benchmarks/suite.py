"""``make bench``: throughput and memory, measured side by side in one run -> results/bench.md.

    python benchmarks/suite.py                       # every section (~25 min on 2 CPU cores)
    python benchmarks/suite.py --sections train,st   # some of them

Sections, each on the same student, data and batch within it:

* ``peak``: this machine's matmul ceiling, fp32 and bf16 GFLOP/s on the threads torch uses, at the
  student's own GEMM shapes (4 x 2,048 tokens through hidden 256: QKV, attention out, GLU in, MLP out)
  and a 2,048^3 square, best of ``--repeats``; and which bf16 matrix units the CPU has. The best bf16
  figure at the student's shapes is the peak every MFU in this file is a fraction of. Any section that
  reports an MFU measures it (and writes this section) even when ``peak`` is not asked for.
* ``fill``: teacher-fill texts/s, ours (dedupe, length-sorted token-budget batches, cache) against
  ``SentenceTransformer.encode`` on the same texts; then a second fill (all cache hits).
* ``train``: training real (non-padding) tokens/s, packed against padded, fixed-size and
  token-budget batches; the offline corpus's own lengths (whole documents cut at ``--max-length``).
* ``precision``: fp32 against bf16 autocast, medians of ``--precision-repeat`` alternating runs in this
  process: the small scale's training step (4 rows of 2,048 packed corpus tokens, SDPA, DistillModule's
  losses, StableAdamW) and a study evaluation (an ``Embedder`` over passkey passages of 2k / 4k / 8k
  tokens (``--embed-per-length`` of each, 7: 21 passages), late chunks on:
  vectors/s and tokens/s).
* ``st``: ours against sentence-transformers' distillation trainer (SentenceTransformerTrainer +
  MSELoss on the precomputed teacher vectors), same student init, texts and batch size.
* ``stream``: a streamed corpus's costs (``data.stream``): reading and hashing a document (every
  process pays it for every document) against cutting it into windows (paid once, by its shard),
  and the training batches/s a stream loader delivers from a filled cache with 0 and 2 workers.
* ``multivector``: chunk vectors of one passage, one pass (late chunking) against one pass per
  chunk, at 1k / 4k / 16k tokens.
* ``long``: one long passage's forward time and peak memory at 2k / 8k / 32k tokens.
* ``cache``: the teacher cache's write / read / lookup throughput and size per million vectors
  (``benchmarks/cache_throughput.py``).
* ``gpu``: a pointer to ``make bench-gpu`` (``benchmarks/bench_gpu.py``), which runs on a bare GPU box.

Each training and long-passage case runs in its own process (``isolated.run_case``); the
numbers are wall-clock and these machines are noisy, so compare ratios within one run.
Benchmarks report; no test depends on them.

MFU (model FLOP utilisation) = model FLOPs per real token x real tokens/s / the measured bf16 peak.
FLOPs per token are ``bench_gpu.train_flops_per_token`` (6 N for the N non-embedding weights, plus
12 x hidden x context per layer for attention, context = the token's own text on global layers and at
most ModernBERT's 128-token window on local ones); inference and encoding count a third of it (2 N plus
the forward attention term). An fp32 run is a fraction of the bf16 peak too (its own ceiling, the fp32
peak, is beside it in ``peak``).

A run of some sections (``--sections``) writes results/bench-<sections>.md unless ``--out``; with
``--merge`` it rewrites those sections inside an existing report (results/bench.md) and keeps the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
from bench_gpu import SHAPES, train_flops_per_token  # benchmarks/ is the script's own folder, on sys.path
from isolated import TINY_STUDENT, run_case

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ["peak", "fill", "train", "st", "precision", "stream", "multivector", "long", "cache", "gpu"]
MFU_SECTIONS = {"train", "st", "precision", "multivector", "long"}
TINY = {**TINY_STUDENT, "max_position_embeddings": 131072}


# -- shared set-up ----------------------------------------------------------------------------------
def data_module(cache_dir: str, max_length: int, batch_size: int = 16, stream: dict | None = None, **batching):
    """The offline corpus's first windows of ``max_length`` tokens; ``batching`` and ``stream``: their groups' fields."""
    from dewey_lab.data.datamodule import DistillDataModule
    from dewey_lab.data.fill import CacheConfig
    from dewey_lab.data.packing import BatchConfig
    from dewey_lab.data.pydoc import PydocCorpus
    from dewey_lab.data.streaming import StreamConfig
    from dewey_lab.data.teacher import SentenceTransformerTeacher
    from dewey_lab.data.windows import WindowConfig

    teacher = SentenceTransformerTeacher(max_length=256, batch_size=64, batch_tokens=8192)
    return DistillDataModule(corpus=PydocCorpus(), teacher=teacher, cache=CacheConfig(cache_dir),
                             windows=WindowConfig(max_length=max_length, overflow="truncate", val_fraction=0.0),
                             batching=BatchConfig(batch_size=batch_size, **batching), stream=StreamConfig(**(stream or {})))


def student_module(config: dict, attn: str = "sdpa", seed: int = 0):
    from dewey_lab.model.module import DistillModule
    from dewey_lab.model.student import StudentConfig
    from dewey_lab.resolve import OFFLINE_TEACHER

    torch.manual_seed(seed)
    spec = StudentConfig(tokenizer=OFFLINE_TEACHER, config=dict(config), attn_implementation=attn)
    return DistillModule(student=spec, teacher_dim=384, projection="linear", warmup_steps=10)


def set_threads() -> None:
    torch.set_num_threads(min(os.cpu_count() or 1, 16))


# -- peak and MFU ----------------------------------------------------------------------------------
def student_gemms(config: dict, tokens: int = 4 * 2048) -> dict[str, tuple[int, int, int]]:
    """(M, K, N) of the student's linear layers on ``tokens`` tokens (ModernBERT: fused QKV, a GLU whose
    ``Wi`` is 2 x intermediate wide, ``Wo`` back to hidden)."""
    h, i = config["hidden_size"], config["intermediate_size"]
    return {"qkv": (tokens, h, 3 * h), "attn out": (tokens, h, h), "mlp in (GLU)": (tokens, h, 2 * i),
            "mlp out": (tokens, i, h)}


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 3, min_s: float = 0.2) -> float:
    """Best-of-``repeats`` GFLOP/s (2 M K N per product) of an (M, K) @ (K, N) matmul in ``dtype``; each repeat
    runs enough products to last ``min_s``."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    out = torch.empty(m, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: oneDNN picks and JITs its kernel
    t0, calls = time.perf_counter(), 0
    while calls < 3 or time.perf_counter() - t0 < min_s / 4:  # size a repeat
        torch.mm(a, b, out=out)
        calls += 1
    per = (time.perf_counter() - t0) / calls
    calls = max(1, int(min_s / max(per, 1e-9)))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b, out=out)
        best = min(best, (time.perf_counter() - t0) / calls)
    return 2 * m * k * n / best / 1e9


def bench_peak(config: dict, repeats: int = 3, square: int = 2048, tokens: int = 4 * 2048,
               min_s: float = 0.2) -> dict:
    """fp32 and bf16 GFLOP/s per shape; ``peak_gflops``: the best bf16 figure at the student's shapes."""
    from dewey_lab.precision import cpu_bf16_units

    shapes = {**student_gemms(config, tokens), f"square {square}": (square, square, square)}
    rows = [{"name": name, "mkn": mkn, **{key: matmul_gflops(*mkn, dtype, repeats, min_s)
                                          for key, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}}
            for name, mkn in shapes.items()]
    student = [r for r in rows if not r["name"].startswith("square")]
    return {"rows": rows, "threads": torch.get_num_threads(), "units": list(cpu_bf16_units()),
            "capability": torch.backends.cpu.get_cpu_capability(),
            "peak_gflops": max(r["bf16"] for r in student), "fp32_peak_gflops": max(r["fp32"] for r in student)}


def peak_lines(pk: dict, repeats: int) -> list[str]:
    return [
        "## Peak: matmul GFLOP/s on this CPU", "",
        (f"{pk['threads']} torch threads; bf16 matrix units: {', '.join(pk['units']) or 'none'} (torch's CPU "
         f"capability: {pk['capability']}). `torch.mm` of an (M, K) @ (K, N) pair, best of {repeats}; the "
         "student's GEMMs are the small scale's (hidden 256, intermediate 512) on 4 x 2,048 tokens."), "",
        "| GEMM | M x K x N | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 |", "|---|---|---:|---:|---:|",
        *[f"| {r['name']} | {' x '.join(map(str, r['mkn']))} | {fmt(r['fp32'], 0)} | {fmt(r['bf16'], 0)} | "
          f"{fmt(r['bf16'] / r['fp32'])}x |" for r in pk["rows"]], "",
        (f"**Peak for MFU: {fmt(pk['peak_gflops'], 0)} GFLOP/s**, the best bf16 figure at the student's shapes "
         f"(fp32's best there: {fmt(pk['fp32_peak_gflops'], 0)} GFLOP/s). Every MFU in this file is a fraction "
         "of the bf16 figure, fp32 runs included.")]


def model_config(config: dict):
    """The ModernBertConfig a student of ``config`` gets (layer types, local window) and its non-embedding
    parameter count, built on the meta device (no weights)."""
    from transformers import ModernBertConfig, ModernBertModel

    cfg = ModernBertConfig(vocab_size=30522, pad_token_id=0, cls_token_id=101, sep_token_id=102, bos_token_id=101,
                           eos_token_id=102, **config)  # the offline tokenizer's ids (the vocabulary is not counted)
    with torch.device("meta"):
        model = ModernBertModel(cfg)
    return cfg, sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)


def flops_per_token(config: dict, texts: list[int], train: bool = True) -> float:
    """Model FLOPs per real token (``bench_gpu.train_flops_per_token``); inference: a third of training's."""
    cfg, params = model_config(config)
    f = train_flops_per_token(cfg, params, texts)
    return f if train else f / 3


def mfu(tokens_per_s: float, config: dict, texts: list[int], peak_gflops: float, train: bool = True) -> float:
    """Fraction of ``peak_gflops`` that ``tokens_per_s`` real tokens of ``texts``-long texts amount to."""
    return tokens_per_s * flops_per_token(config, texts, train) / (peak_gflops * 1e9)


def pct(x: float) -> str:
    return f"{x:.1%}"


# -- fp32 against bf16 ------------------------------------------------------------------------------
def precision_train_cases(config: dict, rows: int = 4, length: int = 2048) -> tuple[dict, dict]:
    """(cases, info): the small scale's training step, fp32 and bf16 autocast, on ``rows`` packed rows of
    corpus texts (DistillModule's forward and losses, StableAdamW: what ``make train`` runs, without the
    Trainer)."""
    from bench_gpu import TOKENIZER, items_of, lengths_and_ids
    from optimi import StableAdamW

    from dewey_lab.data.items import collate
    from dewey_lab.model.module import DistillModule
    from dewey_lab.model.student import StudentConfig

    torch.manual_seed(0)
    items = items_of(lengths_and_ids(length, 64), 384)
    take = 1
    while take < len(items) and collate(items[:take + 1], pack_length=length)["input_ids"].shape[0] <= rows:
        take += 1
    batch = collate(items[:take], pack_length=length)
    spec = StudentConfig(tokenizer=str(TOKENIZER), attn_implementation="sdpa", config=dict(config))
    module = DistillModule(student=spec, teacher_dim=384, projection="linear")
    opt = StableAdamW(module.parameters(), lr=1e-4, weight_decay=0.0)

    def step(bf16: bool, dense: bool = False) -> None:
        with dense_masks(dense), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            emb = module(batch)
        loss, _ = module.compute_losses(batch, emb)  # fp32 inside, as in training
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    texts = [len(it["input_ids"]) for it in items[:take]]
    info = {"rows": batch["input_ids"].shape[0], "row_tokens": batch["input_ids"].shape[1], "texts": texts,
            "real_tokens": int(batch["attention_mask"].sum())}
    return {"fp32": lambda: step(False), "bf16": lambda: step(True), "fp32_dense": lambda: step(False, True)}, info


@contextlib.contextmanager
def dense_masks(on: bool):
    """Inside: ``DistillModule`` runs packed rows as it did before 2026-12 (one dense (R, 1, T, T) document
    mask per layer type, every layer computing T x T scores; ``packed_attention.dense``)."""
    if not on:
        yield
        return
    from packed_attention import dense

    from dewey_lab.model import module

    before = module.forward_rows
    module.forward_rows = dense
    try:
        yield
    finally:
        module.forward_rows = before


def precision_embed_cases(config: dict, lengths=(2048, 4096, 8192), per_length: int = 7) -> tuple[dict, dict]:
    """(cases, info): an ``Embedder`` of the small student (random init) over passkey passages of each
    length, single vectors and late chunks, fp32 against ``dtype=bfloat16``."""
    from dewey_lab.eval.embedder import Embedder
    from dewey_lab.eval.tasks.synthetic import make_synthetic
    from dewey_lab.model.student import StudentConfig, build_student, load_tokenizer
    from dewey_lab.resolve import OFFLINE_TEACHER

    torch.manual_seed(0)
    student = build_student(StudentConfig(tokenizer=OFFLINE_TEACHER, attn_implementation="sdpa",
                                          config={**config, "max_position_embeddings": max(lengths)})).eval()
    tokenizer = load_tokenizer(OFFLINE_TEACHER)
    docs = [d for task in make_synthetic("passkey", tokenizer, list(lengths), n_queries=1, n_docs=per_length)
            for d in task.corpus.values()]
    embedders = {name: Embedder(student, tokenizer, max_length=max(lengths), token_budget=8192, device="cpu",
                                dtype=dtype) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    e = embedders["fp32"]
    items = e.tokenize(docs, e.passage_prompt)
    texts = [len(it.input_ids) for it in items]
    out = e.encode_passages(docs)
    info = {"passages": len(docs), "texts": texts, "vectors": out.single.shape[0] + out.chunks.shape[0],
            "chunks": out.chunks.shape[0]}
    return {name: (lambda e=e: e.encode_passages(docs)) for name, e in embedders.items()}, info


def bench_precision(config: dict, repeat: int, per_length: int = 7) -> dict:
    """Median seconds of fp32 and bf16, alternating (``precision_ratio.interleave``), per case."""
    from precision_ratio import interleave

    set_threads()
    out = {}
    for name, build in (("train", precision_train_cases),
                        ("embed", lambda c: precision_embed_cases(c, per_length=per_length))):
        cases, info = build(config)
        times = interleave(cases, repeat)
        out[name] = {**info, "runs": times, **{f"{k}_s": statistics.median(v) for k, v in times.items()}}
    return out


# -- fill -------------------------------------------------------------------------------------------
def bench_fill(a) -> dict:
    from sentence_transformers import SentenceTransformer

    from dewey_lab.resolve import OFFLINE_TEACHER, resolve_model

    set_threads()
    cache = Path(a.work) / "teacher_cache"
    shutil.rmtree(cache, ignore_errors=True)
    dm = data_module(str(cache), a.max_length)
    examples = dm.examples()["train"]
    all_texts = [t for e in examples for t in e.teacher_texts()]
    _ = dm.teacher.model  # load the teacher before the clock starts (both sides)
    t0 = time.perf_counter()
    dm.prepare_data()
    first = time.perf_counter() - t0
    st = SentenceTransformer(resolve_model(OFFLINE_TEACHER), device="cpu")
    st.max_seq_length = 256
    t0 = time.perf_counter()
    st.encode(all_texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    baseline = time.perf_counter() - t0
    again = data_module(str(cache), a.max_length)
    again.examples()
    t0 = time.perf_counter()
    again.prepare_data()
    second = time.perf_counter() - t0
    return {"texts": len(all_texts), "unique": dm.fill_stats.unique_texts, "first_s": first, "st_s": baseline,
            "second_s": second, "second_hits": again.fill_stats.hit_rate, "cache": str(cache)}


# -- streaming --------------------------------------------------------------------------------------
def bench_stream(a) -> dict:
    from dewey_lab.data.windows import text_digest

    set_threads()
    dm = data_module(str(Path(a.work) / "teacher_cache"), a.max_length, a.batch_size, stream={"enabled": True})
    docs = list(dm.corpus.documents())
    mb = sum(len(d.text.encode()) for d in docs) / 1e6
    passes, t0 = 0, time.perf_counter()
    while passes < 3 or time.perf_counter() - t0 < 2:
        for d in dm.corpus.documents():
            text_digest(d.text)
        passes += 1
    read_s = (time.perf_counter() - t0) / passes
    dm.windower.windows(docs[:8])  # load the tokenizer before the clock
    t0 = time.perf_counter()
    n_windows = sum(len(dm.windower.windows(docs[i:i + 64])) for i in range(0, len(docs), 64))
    window_s = time.perf_counter() - t0
    out = {"docs": len(docs), "mb": mb, "read_us": read_s / len(docs) * 1e6, "window_us": window_s / len(docs) * 1e6,
           "windows": n_windows, "loaders": []}
    for workers in (0, 2):
        dm = data_module(str(Path(a.work) / "teacher_cache"), a.max_length, a.batch_size, num_workers=workers,
                         stream={"enabled": True, "fill": False, "block": 256})
        dm.prepare_data()
        dm.setup("fit")
        it = iter(dm.train_dataloader())
        next(it)  # workers started, first block read
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 10:
            n += len(next(it)["doc_row"])
        out["loaders"].append({"workers": workers, "texts_per_s": n / (time.perf_counter() - t0)})
    return out


# -- training throughput ----------------------------------------------------------------------------
def train_case(a, layout: str, shape: str = "tiny", attn: str = "sdpa", device: str = "cpu") -> dict:
    """Steady-state training throughput of one layout, in this process."""
    set_threads()
    pack, budget = {"padded": (False, None), "packed": (True, None), "budget_padded": (False, a.budget),
                    "budget_packed": (True, a.budget)}[layout]
    dm = data_module(str(Path(a.work) / "teacher_cache"), a.max_length, a.batch_size, pack=pack,
                     batch_tokens=budget)
    module = student_module(TINY if shape == "tiny" else {**SHAPES[shape], "max_position_embeddings": 8192}, attn)
    timer = StepTimer(a.warmup)
    trainer = L.Trainer(accelerator=device, devices=1, max_steps=a.warmup + a.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0,
                        precision=a.precision, callbacks=[timer])
    trainer.fit(module, datamodule=dm)
    out = timer.summary()
    out.update(layout=layout, shape=shape, attn=attn, texts=[e.n_tokens for e in dm.examples()["train"]])
    return out


class StepTimer(L.Callback):
    """Wall time between the ends of consecutive steps (data loading included), after ``warmup``."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.ends, self.real, self.computed, self.texts = warmup, [], [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch["attention_mask"].is_cuda:
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        self.real.append(int(batch["attention_mask"].sum()))
        self.computed.append(batch["attention_mask"].numel())
        self.texts.append(batch["doc_row"].numel())

    def summary(self) -> dict:
        w = self.warmup
        seconds = self.ends[-1] - self.ends[w - 1]
        real, texts = sum(self.real[w:]), sum(self.texts[w:])
        return {"steps": len(self.ends) - w, "seconds": seconds, "real_tokens_per_s": real / seconds,
                "texts_per_s": texts / seconds, "padding": 1 - real / sum(self.computed[w:]),
                "mean_text_tokens": real / texts, "texts_per_step": texts / (len(self.ends) - w)}


def st_case(a) -> dict:
    """sentence-transformers' own distillation: SentenceTransformerTrainer + MSELoss, same student init."""
    import numpy as np
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MSELoss
    from transformers import TrainerCallback

    from dewey_lab.export import export

    set_threads()
    dm = data_module(str(Path(a.work) / "teacher_cache"), a.max_length, a.batch_size)
    examples = dm.examples()["train"]
    labels = dm.cache.get_many([e.keys[0] for e in examples])
    module = student_module(TINY)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    ckpt = Path(a.work) / "st_student.ckpt"
    trainer.save_checkpoint(ckpt)
    model = export(str(ckpt), str(Path(a.work) / "st_student"), pooling="cls", max_length=a.max_length)
    data = Dataset.from_dict({"text": [e.text for e in examples], "label": [np.asarray(v) for v in labels]})
    ends: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    args = SentenceTransformerTrainingArguments(
        output_dir=str(Path(a.work) / "st_out"), per_device_train_batch_size=a.batch_size,
        max_steps=a.warmup + a.steps, learning_rate=1e-4, warmup_steps=10, report_to="none", save_strategy="no",
        logging_strategy="no", dataloader_drop_last=True, use_cpu=True, seed=0, disable_tqdm=True,
        bf16=a.precision == "bf16-mixed")
    SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=MSELoss(model),
                               callbacks=[Timer()]).train()
    seconds = ends[-1] - ends[a.warmup - 1]
    texts = a.batch_size * (len(ends) - a.warmup)
    mean_tokens = statistics.mean(e.n_tokens for e in examples)  # the same tokenizer and truncation
    return {"steps": len(ends) - a.warmup, "seconds": seconds, "texts_per_s": texts / seconds,
            "real_tokens_per_s": texts * mean_tokens / seconds, "mean_text_tokens": mean_tokens,
            "texts": [e.n_tokens for e in examples]}


# -- multi-vector ----------------------------------------------------------------------------------
def bench_multivector(a) -> list[dict]:
    from dewey_lab.data.pydoc import PydocCorpus
    from dewey_lab.encode import load

    set_threads()
    module = student_module(TINY)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    ckpt = Path(a.work) / "mv_student.ckpt"
    trainer.save_checkpoint(ckpt)
    enc = load(str(ckpt), pooling="mean", window=max(a.mv_lengths), device="cpu",
               dtype="bfloat16" if a.precision == "bf16-mixed" else "float32")
    tok = enc.embedder.tokenizer
    corpus = "\n\n".join(d.text for d in PydocCorpus().documents())
    offsets = tok(corpus, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    rows = []
    with torch.inference_mode():
        for n in a.mv_lengths:
            text = corpus[: offsets[n - 3][1]]  # n tokens with CLS and SEP
            chunks = enc.encode_chunks(text)  # warm-up, and the spans both sides use
            pieces = [text[s:e] for s, e in chunks.char_spans]
            timings = {}
            for name, fn in (("one_pass", lambda text=text: enc.encode_chunks(text)),
                             ("per_chunk", lambda pieces=pieces: [enc.encode([p]) for p in pieces]),
                             ("per_chunk_batched", lambda pieces=pieces: enc.encode(pieces))):
                best = float("inf")
                for _ in range(a.repeats):
                    t0 = time.perf_counter()
                    fn()
                    best = min(best, time.perf_counter() - t0)
                timings[name] = best
            rows.append({"tokens": n, "chunks": len(pieces), "passes": chunks.windows, **timings})
    return rows


# -- report ----------------------------------------------------------------------------------------
def fmt(x: float, digits: int = 2) -> str:
    return f"{x:,.{digits}f}"


UPDATED = "Sections marked *(updated)* were rerun by"


class Report:
    """results/bench.md, rewritten after every section so a crash keeps what was measured."""

    def __init__(self, path: Path, argv: list[str], merge: bool = False) -> None:
        self.path, self.parts, self.kept = path, [], []
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        self.head = [
            "# Benchmarks", "",
            f"`python benchmarks/suite.py {' '.join(argv)}`".replace("suite.py `", "suite.py`"),
            (f"on {platform.node()}: {os.cpu_count()} CPU cores, {device}; torch {torch.__version__}; "
            f"{datetime.date.today().isoformat()}."), "",
            "Wall-clock and noisy: compare ratios within this file, which were all measured in one run.", ""]
        if merge and path.exists():  # keep the old head and the sections this run does not rewrite
            head, *sections = path.read_text().split("\n## ")
            when = self.head[3]
            kept = [x for x in head.rstrip("\n").splitlines() if not x.startswith(UPDATED)]  # one such line
            while len(kept) > 1 and kept[-1] == kept[-2] == "":
                kept.pop()
            self.head = [*kept, *([""] if kept[-1] else []),
                         (f"{UPDATED} {self.head[2]} {when} Compare ratios within one section (one run)."), ""]
            self.kept = [("## " + x).rstrip("\n").splitlines() + [""] for x in sections]

    def add(self, lines: list[str]) -> None:
        title = lines[0]
        self.kept = [p for p in self.kept if p[0].removesuffix(" *(updated)*") != title]
        self.parts.append([title + (" *(updated)*" if self.head[-2].startswith(UPDATED) else ""),
                           *lines[1:], ""])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(self.head + [x for p in self.parts + self.kept for x in p]).rstrip("\n")
                             + "\n")
        print("\n".join(lines), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--out", default=None, help="default: results/bench.md for every section, else "
                   "results/bench-<sections>.md (a partial run never overwrites the full report)")
    p.add_argument("--work", default=str(REPO / "results" / "bench_work"), help="teacher cache and checkpoints")
    p.add_argument("--max-length", type=int, default=2048, help="training window (the paper's 2048)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--budget", type=int, default=16 * 2048, help="tokens per token-budget batch")
    p.add_argument("--steps", type=int, default=8, help="timed training steps per case")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps per case")
    p.add_argument("--mv-lengths", default="1024,4096,16384")
    p.add_argument("--long-lengths", default="2048,8192,32768")
    p.add_argument("--repeats", type=int, default=2, help="best of this many (multi-vector; peak: at least 3)")
    p.add_argument("--precision-repeat", type=int, default=5, help="alternating fp32 / bf16 runs per case (precision)")
    p.add_argument("--embed-per-length", type=int, default=7, help="passages per length, 2k / 4k / 8k (precision)")
    p.add_argument("--precision", default="auto", choices=["auto", "32-true", "bf16-mixed"],
                   help="training precision of train and st (sentence-transformers' bf16 flag), and the compute dtype "
                   "of multivector and long; auto: the CPU scales' rule (bf16 where the CPU has bf16 matrix units)")
    p.add_argument("--merge", action="store_true", help="rewrite only the sections run inside --out (default: "
                   "results/bench.md), keeping its other sections")
    p.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.precision == "auto":
        from dewey_lab.precision import choose

        a.precision, why = choose("cpu")
        if not a.one:
            print(f"precision: {a.precision} ({why})", flush=True)
    a.mv_lengths = [int(x) for x in a.mv_lengths.split(",")]
    if a.one:  # a case in its own process
        kind, *rest = a.one
        result = {"train": lambda: train_case(a, *rest), "st": lambda: st_case(a), "fill": lambda: bench_fill(a),
                  "mv": lambda: bench_multivector(a), "stream": lambda: bench_stream(a),
                  "precision": lambda: bench_precision(TINY_STUDENT, a.precision_repeat, a.embed_per_length)}[kind]()
        print(json.dumps(result))
        return
    sections = a.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        sys.exit(f"error: unknown section {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    argv = sys.argv[1:]
    if a.out is None:
        full = set(sections) == set(SECTIONS)
        a.out = str(REPO / "results" / ("bench.md" if full or a.merge else f"bench-{'-'.join(sections)}.md"))
    report = Report(Path(a.out), argv, merge=a.merge)
    Path(a.work).mkdir(parents=True, exist_ok=True)
    common = [f"--work={a.work}", f"--max-length={a.max_length}", f"--batch-size={a.batch_size}",
              f"--budget={a.budget}", f"--steps={a.steps}", f"--warmup={a.warmup}",
              f"--mv-lengths={','.join(map(str, a.mv_lengths))}", f"--repeats={a.repeats}",
              f"--precision-repeat={a.precision_repeat}", f"--embed-per-length={a.embed_per_length}",
              f"--precision={a.precision}"]
    bf16 = a.precision == "bf16-mixed"
    in_words = ("bf16 (`bf16-mixed`: autocast over fp32 weights)" if bf16 else "fp32 (`32-true`)")

    def case(*args):
        out = run_case(__file__, *args, *common)
        if isinstance(out, str):  # run_case gives the failed process's last error line
            sys.exit(f"error: benchmark case {' '.join(args)} failed: {out}")
        return out

    peak = None
    if "peak" in sections or MFU_SECTIONS & set(sections):
        set_threads()
        pk = bench_peak(TINY, max(3, a.repeats))
        peak = pk["peak_gflops"]
        report.add(peak_lines(pk, max(3, a.repeats)))
    mfu_note = (f"MFU: model FLOPs (training 6 N + attention; encoding a third of it) x real tokens/s over the "
                f"measured bf16 peak, {fmt(peak or 0, 0)} GFLOP/s (section Peak).")
    needs_cache = {"train", "st", "stream"} & set(sections)  # their data modules read the teacher cache
    if "fill" in sections or (needs_cache and not (Path(a.work) / "teacher_cache").exists()):
        f = case("fill")
        report.add([
            "## Teacher fill (all-MiniLM-L6-v2 on CPU)", "",
            (f"The offline corpus's {f['texts']:,} windows and chunks ({f['unique']:,} unique) at "
            f"max_length {a.max_length}: ours (`prepare_data`: dedupe, length-sorted {8192}-token batches, "
            "cache writes; the teacher's `dtype: auto`, so bf16 autocast where the CPU has bf16 matrix units) against "
            "`SentenceTransformer.encode(texts, batch_size=64)` (fp32, its default) on the same texts."), "",
            "| fill | seconds | texts/s | ratio |", "|---|---:|---:|---:|",
            f"| sentence-transformers `encode` | {fmt(f['st_s'], 1)} | {fmt(f['texts'] / f['st_s'], 0)} | 1.00 |",
            (f"| ours, first fill (empty cache) | {fmt(f['first_s'], 1)} | {fmt(f['texts'] / f['first_s'], 0)} | "
            f"**{fmt(f['st_s'] / f['first_s'])}x** |"),
            (f"| ours, second fill (hit rate {f['second_hits']:.0%}) | {fmt(f['second_s'], 2)} | "
            f"{fmt(f['texts'] / f['second_s'], 0)} | **{fmt(f['first_s'] / f['second_s'], 0)}x the first fill** |")])
    if "train" in sections:
        rows = [case("train", layout) for layout in ("padded", "packed", "budget_padded", "budget_packed")]
        base = rows[0]["real_tokens_per_s"]
        report.add([
            "## Training throughput: packed against padded (tiny student, CPU)", "",
            (f"Whole documents of the offline corpus cut at {a.max_length} tokens (mean "
            f"{fmt(rows[0]['mean_text_tokens'], 0)}), {a.batch_size} texts per fixed batch or "
            f"{a.budget:,} tokens per token-budget batch; {a.steps} timed steps after {a.warmup} untimed, "
            f"data loading included. Real tokens exclude padding. {in_words}."), "", mfu_note, "",
            "| layout | texts/step | padding | real tokens/s | MFU | ratio to padded |", "|---|---:|---:|---:|---:|---:|",
            *[f"| {r['layout']} | {fmt(r['texts_per_step'], 1)} | {r['padding']:.0%} | "
              f"{fmt(r['real_tokens_per_s'], 0)} | {pct(mfu(r['real_tokens_per_s'], TINY, r['texts'], peak))} | "
              f"**{fmt(r['real_tokens_per_s'] / base)}x** |" for r in rows]])
        ours = rows[1]
    if "st" in sections:
        if "train" not in sections:
            ours = case("train", "packed")
        s = case("st")
        report.add([
            "## Ours against sentence-transformers' distillation trainer (tiny student, CPU)", "",
            ("Same student init, texts (whole documents at max_length "
            f"{a.max_length}) and batch size ({a.batch_size}); theirs: `SentenceTransformerTrainer` + "
            "`MSELoss` on our cached teacher vectors (whole-text loss only, padded batches); ours: "
            "`DistillModule` packed, with the chunk losses too (more work per step). Both "
            + ("bf16 (ours `bf16-mixed`, theirs `bf16=True`)." if bf16 else "fp32.")), "", mfu_note, "",
            "| trainer | texts/s | real tokens/s | MFU | ratio |", "|---|---:|---:|---:|---:|",
            (f"| sentence-transformers | {fmt(s['texts_per_s'])} | {fmt(s['real_tokens_per_s'], 0)} | "
             f"{pct(mfu(s['real_tokens_per_s'], TINY, s['texts'], peak))} | 1.00 |"),
            (f"| ours (packed) | {fmt(ours['texts_per_s'])} | {fmt(ours['real_tokens_per_s'], 0)} | "
             f"{pct(mfu(ours['real_tokens_per_s'], TINY, ours['texts'], peak))} | "
            f"**{fmt(ours['texts_per_s'] / s['texts_per_s'])}x** |")])
    if "precision" in sections:
        r = case("precision")
        tr, em = r["train"], r["embed"]
        train_tps = {k: tr["real_tokens"] / tr[f"{k}_s"] for k in ("fp32", "bf16")}
        embed_tokens = sum(em["texts"])
        report.add([
            "## fp32 against bf16 autocast (small student, CPU)", "",
            (f"Medians of {a.precision_repeat} runs each, fp32 and bf16 alternating in one process (after one "
             "untimed run each). Training step: the small scale's student (hidden 256, intermediate 512, 4 "
             f"layers, 4 heads, SDPA) on {tr['rows']} packed rows of {tr['row_tokens']:,} tokens "
             f"({len(tr['texts'])} corpus texts, {tr['real_tokens']:,} real tokens), `DistillModule` forward + "
             "losses (fp32, outside autocast) + backward + StableAdamW; bf16 is `torch.autocast(\"cpu\", "
             "bfloat16)` over fp32 weights (Lightning's `bf16-mixed`). Study evaluation: `Embedder."
             f"encode_passages` over {em['passages']} passkey passages of 2k / 4k / 8k tokens "
             f"({embed_tokens:,} tokens), single vectors and late chunks ({em['vectors']:,} vectors), fp32 "
             "against `dtype=bfloat16` (eval's `--dtype auto` here)."), "", mfu_note, "",
            "| case | fp32 s | bf16 s | fp32 tokens/s | bf16 tokens/s | fp32 MFU | bf16 MFU | bf16 speed-up |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            (f"| training step | {fmt(tr['fp32_s'])} | {fmt(tr['bf16_s'])} | {fmt(train_tps['fp32'], 0)} | "
             f"{fmt(train_tps['bf16'], 0)} | {pct(mfu(train_tps['fp32'], TINY, tr['texts'], peak))} | "
             f"{pct(mfu(train_tps['bf16'], TINY, tr['texts'], peak))} | **{fmt(tr['fp32_s'] / tr['bf16_s'])}x** |"),
            (f"| study evaluation | {fmt(em['fp32_s'])} | {fmt(em['bf16_s'])} | "
             f"{fmt(embed_tokens / em['fp32_s'], 0)} | {fmt(embed_tokens / em['bf16_s'], 0)} | "
             f"{pct(mfu(embed_tokens / em['fp32_s'], TINY, em['texts'], peak, train=False))} | "
             f"{pct(mfu(embed_tokens / em['bf16_s'], TINY, em['texts'], peak, train=False))} | "
             f"**{fmt(em['fp32_s'] / em['bf16_s'])}x** |"), "",
            (f"Against the training step as it ran before 2026-12 (fp32, and a dense (R, 1, T, T) document mask on "
             "every layer, so every layer computed T x T scores; now each packed text attends on its own, "
             f"`attention.forward_rows`), timed alternating with the two above: {fmt(tr['fp32_dense_s'])} s, "
             f"{fmt(tr['real_tokens'] / tr['fp32_dense_s'], 0)} tokens/s: the default (bf16) step is "
             f"**{fmt(tr['fp32_dense_s'] / tr['bf16_s'])}x** faster, fp32 now {fmt(tr['fp32_dense_s'] / tr['fp32_s'])}x."),
            "",
            (f"Study evaluation vectors/s: fp32 {fmt(em['vectors'] / em['fp32_s'], 1)}, bf16 "
             f"{fmt(em['vectors'] / em['bf16_s'], 1)}. Runs (s): training fp32 "
             f"{', '.join(fmt(x) for x in tr['runs']['fp32'])}; bf16 {', '.join(fmt(x) for x in tr['runs']['bf16'])}; "
             f"fp32 before 2026-12 {', '.join(fmt(x) for x in tr['runs']['fp32_dense'])}; "
             f"evaluation fp32 {', '.join(fmt(x) for x in em['runs']['fp32'])}; bf16 "
             f"{', '.join(fmt(x) for x in em['runs']['bf16'])}.")])
    if "stream" in sections:
        r = case("stream")
        train_rate = ours["texts_per_s"] if "train" in sections or "st" in sections else None
        report.add([
            "## Streaming corpus: what each process pays (CPU)", "",
            (f"The offline corpus ({r['docs']} documents, {fmt(r['mb'], 1)} MB) as a stream at max_length "
            f"{a.max_length}. Every process reads and hashes every document to find its shard's; only the "
            "shard's owner cuts it into windows (tokenizer + chunk spans)."), "",
            "| per document | microseconds |", "|---|---:|",
            f"| read + hash (every process) | {fmt(r['read_us'], 1)} |",
            f"| cut into windows (its shard only) | {fmt(r['window_us'], 1)} |",
            (f"| shards at which reading costs a process as much as its share of the cutting | "
            f"**{fmt(r['window_us'] / r['read_us'], 0)}** |"), "",
            f"Training batches ({a.batch_size} texts) from a filled cache, tokenised and collated:", "",
            "| loader workers | texts/s |" + (" vs. the packed training step |" if train_rate else ""),
            "|---:|---:|" + ("---:|" if train_rate else ""),
            *[f"| {x['workers']} | {fmt(x['texts_per_s'], 0)} |"
              + (f" **{fmt(x['texts_per_s'] / train_rate, 0)}x** |" if train_rate else "") for x in r["loaders"]]])
    if "multivector" in sections:
        rows = case("mv")
        report.add([
            "## Multi-vector passage encoding: one pass against one pass per chunk (tiny student, CPU)", "",
            ("256-token chunks with 64 overlap, mean-pooled. One pass reads the passage once (late chunking); "
            "per chunk reads each chunk alone, one call each or all chunks in one batch. Best of "
            f"{a.repeats}. {'bf16 (`dtype=bfloat16`)' if bf16 else 'fp32'}. Tokens/s and MFU are the one pass's (the "
            "passage's tokens once)."), "", mfu_note, "",
            ("| tokens | chunks | one pass (s) | one pass tokens/s | one pass MFU | per chunk (s) | "
             "per chunk, batched (s) | per chunk / one pass | batched / one pass |"),
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *[f"| {r['tokens']:,} | {r['chunks']} | {fmt(r['one_pass'], 3)} | {fmt(r['tokens'] / r['one_pass'], 0)} | "
              f"{pct(mfu(r['tokens'] / r['one_pass'], TINY, [r['tokens']], peak, train=False))} | "
              f"{fmt(r['per_chunk'], 3)} | "
              f"{fmt(r['per_chunk_batched'], 3)} | **{fmt(r['per_chunk'] / r['one_pass'])}x** | "
              f"{fmt(r['per_chunk_batched'] / r['one_pass'])}x |" for r in rows]])
    if "long" in sections:
        script = str(Path(__file__).parent / "long_passage_memory.py")
        rows = []
        for n in map(int, a.long_lengths.split(",")):
            for path in ("banded", "dense") if n <= 8192 else ("banded",):
                r = run_case(script, n, path, a.precision)
                rows.append(r if isinstance(r, dict) else {"length": n, "path": path, "error": r})
        report.add([
            "## One long passage: forward time and peak memory (tiny student, CPU, inference)", "",
            ("`banded`: our blocked sliding-window SDPA (what the Embedder uses past 2,048 tokens); `dense`: "
            f"transformers' default SDPA path with dense L x L masks (skipped past 8k). {'bf16 autocast' if bf16 else 'fp32'}; one forward, "
            "first call (no warm-up)."), "", mfu_note, "",
            ("| tokens | path | seconds | tokens/s | MFU | peak RSS (MiB) | growth over the model load "
             "(MiB; 0: below its peak) |"), "|---:|---|---:|---:|---:|---:|---:|",
            *[f"| {r['length']:,} | {r['path']} | " + (f"failed: {r['error']} | | | | |" if "error" in r else
              f"{fmt(r['seconds'])} | {fmt(r['length'] / r['seconds'], 0)} | "
              f"{pct(mfu(r['length'] / r['seconds'], TINY, [r['length']], peak, train=False))} | "
              f"{r['peak_mib']:,} | {r['peak_mib'] - r['model_mib']:,} |") for r in rows]])
    if "cache" in sections:
        import subprocess

        script = str(Path(__file__).parent / "cache_throughput.py")
        out = subprocess.run([sys.executable, script], capture_output=True, text=True, check=False)
        if out.returncode:
            sys.exit(f"error: {script} failed: {(out.stderr.strip().splitlines() or ['no output'])[-1]}")
        first, *table = out.stdout.strip().splitlines()
        report.add(["## Teacher cache: throughput and size", "",
                    f"`python {Path(script).relative_to(REPO)}`: {first}", "", *table])
    if "gpu" in sections:  # the GPU figures have their own self-contained command
        report.add(["## GPU", "", "See `make bench-gpu` (`benchmarks/bench_gpu.py` -> results/bench-gpu.md)."])
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
