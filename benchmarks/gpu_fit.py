"""A short real fit on one GPU, then the checkpoint scored by the evaluation's own loader. Self-contained.

    python benchmarks/gpu_fit.py                 # 50 steps, ModernBERT-base shape, bf16-mixed, packed rows
    python benchmarks/gpu_fit.py --smoke         # any machine: tiny shape, 6 steps

Runs where ``make bench-gpu`` runs (torch, transformers, lightning, torchmetrics; no hub, no network):
Lightning's Trainer fits ``DistillModule`` (attention ``auto``: flash-attn, else torch's varlen
kernels, else SDPA) on the offline pydoc corpus, tokenised with the shipped tokenizer, against
random unit teacher vectors (the teacher is not under test), with Dewey's losses; it prints the loss
curve, fails on a non-finite loss or one that does not fall, saves a checkpoint, loads it with
``dewey_lab.eval.load.load_embedder`` (what ``dewey-lab eval --model <ckpt>`` uses) and scores a
generated passkey task with it. The optimiser is StableAdamW when torch-optimi is installed, else
torch's AdamW (said in the output).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from bench_gpu import SHAPES, TOKENIZER, items_of, lengths_and_ids


def main(argv: list[str] | None = None) -> dict:
    import lightning as L

    from dewey_lab.data.items import collate
    from dewey_lab.model.module import DistillModule
    from dewey_lab.model.student import StudentConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default="runs/gpu_fit")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    smoke = a.smoke or not cuda
    steps, max_length, shape = (a.steps or 6, 256, "tiny") if smoke else (a.steps or 50, 2048, "base")
    dim = 32 if smoke else 4096
    ids = lengths_and_ids(max_length, 64)
    items = items_of(ids, dim)
    batches = [collate(items[i:i + 16], pack_length=max_length) for i in range(0, len(items), 16)]

    class Module(DistillModule):
        def configure_optimizers(self):
            try:
                return super().configure_optimizers()
            except ImportError:
                print("torch-optimi is not installed: AdamW instead of StableAdamW", file=sys.stderr)
                return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    torch.manual_seed(0)
    spec = StudentConfig(tokenizer=str(TOKENIZER), config={**SHAPES[shape], "max_position_embeddings": 8192})
    module = Module(student=spec, teacher_dim=dim, projection="linear", lr=3e-4, warmup_steps=5)
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs))

    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, max_steps=steps, logger=False,
                        precision="bf16-mixed" if cuda else "32-true", enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=a.out, callbacks=[Record()],
                        enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0)
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    seconds = time.perf_counter() - t0
    ckpt = Path(a.out) / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    finite = all(math.isfinite(x) for x in losses)
    k = max(1, len(losses) // 5)
    falls = sum(losses[-k:]) / k < sum(losses[:k]) / k

    from dewey_lab.eval.load import load_embedder
    from dewey_lab.eval.retrieval import DenseRetriever
    from dewey_lab.eval.run import build_tasks, evaluate

    embedder = load_embedder(str(ckpt), device="cuda" if cuda else "cpu")
    tasks = build_tasks(["passkey"], embedder.tokenizer, [256, 1024] if not smoke else [128], n_queries=10, n_docs=20)
    rows = evaluate(DenseRetriever(embedder, ("single", "multi"), progress=False), tasks, embedder.max_length)
    out = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "shape": shape, "steps": len(losses),
           "attn": module.student.config._attn_implementation, "seconds": round(seconds, 1),
           "loss_first": losses[0], "loss_last": losses[-1], "finite": finite, "falls": falls,
           "losses": [round(x, 4) for x in losses], "checkpoint": str(ckpt),
           "eval": [{k: r[k] for k in ("task", "length", "mode", "main")} for r in rows]}
    print(json.dumps(out))
    if not (finite and falls):
        raise SystemExit(f"gpu_fit: loss {'not finite' if not finite else 'did not fall'}: {losses}")
    return out


if __name__ == "__main__":
    main()
