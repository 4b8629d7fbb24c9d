"""How much each loss term pulls on the student: gradient norms per term and target, cosine summed vs averaged.

    python benchmarks/loss_balance.py -c experiments/small.yaml --start runs/small_start \\
        --out results/chunk_alignment_ablation/loss-balance.md

On real training batches of the experiment (its windows, chunks and teacher cache: run its fill first) and the
student of ``--start`` (the checkpoint every variant starts from), each term's gradient with respect to the
student's parameters is taken alone at weight 1: the cosine term summed over items (the Dewey report's formula) and
averaged, and the similarity term (a mean by definition), each on the whole texts and on the chunks. Three
weightings are then compared from those gradients (``WEIGHTINGS``): the paper's sum at 10 : 200, the average at
10 : 200, and the average at 10 x (windows per batch) : 200, which makes the whole-text cosine term exactly the
paper's sum and gives the chunk term the same weight per target. With the sum, the chunk term grows with the ~40
chunks per 2k window, so a ``both`` run trains mostly on chunks, and with gradient clipping at 1.0 the scale of the
sum decides how much of each step is clipped away. The report gives per-batch medians of each weighted term's
gradient norm, of all four together (a ``both`` step before clipping), and the whole-text terms' share.
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


def combo_norm(parts: list[tuple[float, list[torch.Tensor]]]) -> float:
    """|| sum_i w_i g_i || over every parameter, for (weight w_i, gradient list g_i) pairs."""
    total = 0.0
    for tensors in zip(*(grads for _, grads in parts)):  # one parameter's gradient from each term
        acc = sum(w * t for (w, _), t in zip(parts, tensors))
        total += float((acc.float() ** 2).sum())
    return total ** 0.5


# The weightings compared: (cosine reduction, cosine weight, similarity weight); "per_window" scales the averaged
# cosine's weight by the batch's windows so that the whole-text term equals the paper's sum exactly.
WEIGHTINGS = {"paper: cosine summed, 10 : 200": ("sum", 10.0, 200.0),
              "cosine averaged, 10 : 200": ("mean", 10.0, 200.0),
              "cosine averaged, 10 x windows : 200": ("mean", "per_window", 200.0)}


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
        g, unit = {}, {}  # each term's gradient at weight 1
        for target in ("whole", "chunk"):
            for red in ("sum", "mean"):
                unit[f"cosine_{target}_{red}"], g[f"cosine_{target}_{red}"] = grad_norm(
                    cosine_loss(*pairs[target], reduction=red), params)
            unit[f"similarity_{target}"], g[f"similarity_{target}"] = grad_norm(
                similarity_mse_loss(*pairs[target]), params)
        combos = {}
        for name, (red, w_cos, w_sim) in WEIGHTINGS.items():
            w = float(n["whole"]) * 10.0 if w_cos == "per_window" else w_cos
            terms = {t: [(w, g[f"cosine_{t}_{red}"]), (w_sim, g[f"similarity_{t}"])] for t in ("whole", "chunk")}
            combos[name] = {"cosine_weight": w, "whole": combo_norm(terms["whole"]),
                            "chunk": combo_norm(terms["chunk"]), "both": combo_norm(terms["whole"] + terms["chunk"]),
                            "whole_cosine": w * unit[f"cosine_whole_{red}"], "chunk_cosine": w * unit[f"cosine_chunk_{red}"],
                            "whole_similarity": w_sim * unit["similarity_whole"],
                            "chunk_similarity": w_sim * unit["similarity_chunk"]}
        rows.append({"n_whole": n["whole"], "n_chunk": n["chunk"], "unit": unit, "combos": combos,
                     "seconds": time.perf_counter() - t0})
        print(f"batch {len(rows)}: {n['whole']} windows, {n['chunk']} chunks", file=sys.stderr)
    return {"config": config_files, "start": str(ckpt), "rows": rows}


def report(result: dict, command: str) -> list[str]:
    rows = result["rows"]

    def med(get) -> float:
        return statistics.median(get(r) for r in rows)

    lines = [
        "# Loss balance: how hard each term pulls on the student, on real small-scale batches",
        "",
        f"Command: `{command}`",
        "",
        (f"Start: `{result['start']}`; {len(rows)} training batches (medians shown), "
         f"{med(lambda r: r['n_whole']):.0f} windows and {med(lambda r: r['n_chunk']):.0f} chunks per batch. Each "
         "entry is the norm of a term's gradient with respect to the student's parameters, the term alone (fp32); "
         "`both` is the norm of the summed gradient of all four terms, what a `both` run's step follows before "
         "clipping at 1.0; `whole share` is ||g_whole|| / (||g_whole|| + ||g_chunk||), whole-text terms against "
         "chunk terms."),
        "",
        "| weighting | cosine weight | cos whole | cos chunk | sim whole | sim chunk | both | whole share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in WEIGHTINGS:
        def c(key: str, name: str = name) -> float:
            return med(lambda r: r["combos"][name][key])

        def share_of(r: dict, name: str = name) -> float:
            return r["combos"][name]["whole"] / (r["combos"][name]["whole"] + r["combos"][name]["chunk"])

        lines.append(f"| {name} | {c('cosine_weight'):.0f} | {c('whole_cosine'):.3g} | {c('chunk_cosine'):.3g} | "
                     f"{c('whole_similarity'):.3g} | {c('chunk_similarity'):.3g} | {c('both'):.3g} | "
                     f"{med(share_of):.1%} |")
    lines += ["", "<details><summary>per batch, each term at weight 1</summary>", "",
              ("| batch | windows | chunks | cos whole sum | cos chunk sum | cos whole mean | cos chunk mean | "
               "sim whole | sim chunk |"),
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(rows, 1):
        u = r["unit"]
        lines.append(f"| {i} | {r['n_whole']} | {r['n_chunk']} | {u['cosine_whole_sum']:.3g} | "
                     f"{u['cosine_chunk_sum']:.3g} | {u['cosine_whole_mean']:.3g} | {u['cosine_chunk_mean']:.3g} | "
                     f"{u['similarity_whole']:.3g} | {u['similarity_chunk']:.3g} |")
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
