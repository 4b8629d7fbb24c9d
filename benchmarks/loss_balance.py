"""How much each loss term pulls on the student: gradient norms per term and target, cosine summed vs averaged.

    python benchmarks/loss_balance.py -c experiments/small.yaml --start runs/small_start \\
        --out results/chunk_alignment_ablation/loss-balance.md

On real training batches of the experiment (its windows, chunks and teacher cache: run its fill first) and the
student of ``--start`` (the checkpoint every variant starts from), each term's gradient with respect to the
student's parameters is taken alone: ``weight x term(target)`` for the cosine term summed over items (the Dewey
report's formula) and averaged, and for the similarity term (a mean by definition). With the sum, the chunk term
grows with the number of chunks per batch (~40 per 2k window) and the whole-text term with the number of windows,
so a ``both`` run trains mostly on chunks; with gradient clipping at 1.0 the scale of the sum also decides how
much of each step is clipped away. The report gives per-batch medians and the share of the whole-text terms in
the norm of the summed gradient, which is what a ``both`` run's step follows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from itertools import islice
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def grad_norm(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> tuple[float, list[torch.Tensor]]:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads))), grads


def norm_of_sum(*parts: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum(((sum(gs)).float() ** 2).sum() for gs in zip(*parts))))


def measure(config_files: list[str], start: str, batches: int) -> dict:
    from dewey_lab.cli import BASE_CONFIG
    from dewey_lab.data.datamodule import DistillDataModule
    from dewey_lab.model.losses import cosine_loss, similarity_mse_loss
    from dewey_lab.model.module import DistillModule
    from dewey_lab.runs.checkpoint import start_checkpoint
    from dewey_lab.runs.lightning_cli import merged_config

    sub = {"default_config_files": [str(BASE_CONFIG)], "exit_on_error": False}
    kwargs = {"parser_mode": "omegaconf+", "exit_on_error": False, "fit": sub}
    config = merged_config(["fit", *[a for f in config_files for a in ("-c", f)]], kwargs)
    weights = {name: term["init_args"].get("weight", 1.0) for name, term in config["model"]["losses"].items()}
    dm = DistillDataModule.from_config(config)
    dm.prepare_data()  # reads the cache; embeds whatever is missing (run the experiment's fill first)
    dm.setup("fit")
    ckpt = start_checkpoint(start)
    module = DistillModule.load_from_checkpoint(str(ckpt), map_location="cpu", weights_only=False)
    module.train()
    params = [p for p in module.student.parameters() if p.requires_grad]
    rows = []
    for batch in islice(dm.train_dataloader(), batches):
        t0 = time.perf_counter()
        emb = module(batch)
        pairs = {k: (emb[k].float(), batch[f"t_{k}"].float()) for k in ("whole", "chunk")}
        n = {k: len(pairs[k][0]) for k in pairs}
        g, norms = {}, {}
        for target in ("whole", "chunk"):
            for red in ("sum", "mean"):
                norms[f"cosine_{target}_{red}"], g[f"cosine_{target}_{red}"] = grad_norm(
                    weights["cosine"] * cosine_loss(*pairs[target], reduction=red), params)
            norms[f"similarity_{target}"], g[f"similarity_{target}"] = grad_norm(
                weights["similarity"] * similarity_mse_loss(*pairs[target]), params)
        for red in ("sum", "mean"):
            whole = [g[f"cosine_whole_{red}"], g["similarity_whole"]]
            chunk = [g[f"cosine_chunk_{red}"], g["similarity_chunk"]]
            norms[f"both_{red}"] = norm_of_sum(*whole, *chunk)
            norms[f"whole_terms_{red}"] = norm_of_sum(*whole)
            norms[f"chunk_terms_{red}"] = norm_of_sum(*chunk)
        rows.append({"n_whole": n["whole"], "n_chunk": n["chunk"], **norms, "seconds": time.perf_counter() - t0})
        print(f"batch {len(rows)}: {n['whole']} windows, {n['chunk']} chunks, "
              f"both sum {norms['both_sum']:.3g} / mean {norms['both_mean']:.3g}", file=sys.stderr)
    return {"config": config_files, "start": str(ckpt), "weights": weights, "rows": rows}


def report(result: dict, command: str) -> list[str]:
    rows = result["rows"]

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    lines = [
        "# Loss balance: gradient norm of each term on real small-scale batches",
        "",
        f"Command: `{command}`",
        (f"Start: `{result['start']}`; weights {result['weights']}; {len(rows)} training batches, medians shown; "
         f"{med('n_whole'):.0f} windows and {med('n_chunk'):.0f} chunks per batch. Gradients of `weight x term` "
         "with respect to the student's parameters, each term alone (fp32)."),
        "",
        "| term | target | cosine summed | cosine averaged |",
        "|---|---|---:|---:|",
    ]
    for target in ("whole", "chunk"):
        lines.append(f"| cosine | {target} | {med(f'cosine_{target}_sum'):.3g} | {med(f'cosine_{target}_mean'):.3g} |")
    for target in ("whole", "chunk"):
        lines.append(f"| similarity (a mean) | {target} | {med(f'similarity_{target}'):.3g} | "
                     f"{med(f'similarity_{target}'):.3g} |")
    for red, label in (("sum", "summed"), ("mean", "averaged")):
        share = statistics.median(r[f"whole_terms_{red}"] / (r[f"whole_terms_{red}"] + r[f"chunk_terms_{red}"])
                                  for r in rows)
        lines.append(f"| **both: all terms** ({label}) | whole + chunk | {med(f'both_{red}'):.3g} | |"
                     if red == "sum" else
                     f"| **both: all terms** ({label}) | whole + chunk | | {med(f'both_{red}'):.3g} |")
        lines.append(f"| whole-text terms' share of the norm (cosine {label}) | | "
                     + (f"{share:.1%} |  |" if red == "sum" else f" | {share:.1%} |"))
    lines += [
        "",
        ("The whole-text terms' share is ||g_whole|| / (||g_whole|| + ||g_chunk||), per batch. Gradient clipping "
         "(`trainer.gradient_clip_val: 1.0`) rescales any step whose total norm is above 1."),
        "",
        "<details><summary>per batch</summary>",
        "",
        ("| batch | windows | chunks | cos whole sum | cos chunk sum | cos whole mean | cos chunk mean | sim whole "
         "| sim chunk |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r['n_whole']} | {r['n_chunk']} | {r['cosine_whole_sum']:.3g} | "
                     f"{r['cosine_chunk_sum']:.3g} | {r['cosine_whole_mean']:.3g} | {r['cosine_chunk_mean']:.3g} | "
                     f"{r['similarity_whole']:.3g} | {r['similarity_chunk']:.3g} |")
    return [*lines, "", "</details>", ""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--config", action="append", required=True, help="experiment file(s), stacked in order")
    p.add_argument("--start", required=True, help="the checkpoint the variants start from (model.init_from)")
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--out", type=Path, default=None, help="write the markdown report here (default: print it)")
    a = p.parse_args()
    torch.manual_seed(0)
    result = measure(a.config, a.start, a.batches)
    command = "python benchmarks/loss_balance.py " + " ".join(sys.argv[1:])
    text = "\n".join(report(result, command))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
        a.out.with_suffix(".json").write_text(__import__("json").dumps(result, indent=1))
    else:
        print(text)


if __name__ == "__main__":
    main()
