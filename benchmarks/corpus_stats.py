"""What an experiment trains on: its corpus (documents, tokens, length distribution) and its windows and chunks.

    python benchmarks/corpus_stats.py -c experiments/small.yaml --out results/chunk_alignment_ablation/chunk-sizes

Reads the experiment's merged config (base.yaml, then each ``-c`` file), builds its corpus and its windows with the
data module (the same rule training uses; no teacher, no student) and writes ``<out>.md`` and ``<out>.json``:
documents and tokens by source package (all-MiniLM-L6-v2 tokens, no special tokens), the quantiles of document
length, the training / validation windows and which packages validation holds out, and the chunks' token lengths:
the median is what the multi-vector evaluation's late chunks should match (issue 29).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def merged(config_files: list[str]) -> dict:
    from dewey_lab.cli import BASE_CONFIG
    from dewey_lab.runs.lightning_cli import merged_config

    sub = {"default_config_files": [str(BASE_CONFIG)], "exit_on_error": False}
    kwargs = {"parser_mode": "omegaconf+", "exit_on_error": False, "fit": sub}
    return merged_config(["fit", *[a for f in config_files for a in ("-c", f)]], kwargs)


def corpus_stats(dm) -> dict:
    """Documents, tokens and their spread, in all and per source (the stdlib, then each package)."""
    import sys as _sys

    tok = dm.tokenizer
    docs = [doc for _, doc in dm._unique_documents()]  # what the windows are cut from
    lengths = []
    for at in range(0, len(docs), 128):
        block = docs[at:at + 128]
        lengths += [len(x) for x in tok([d.text for d in block], add_special_tokens=False, verbose=False)["input_ids"]]
    sources: Counter = Counter()
    tokens: Counter = Counter()
    for d, n in zip(docs, lengths):
        top = d.doc_id.split(".")[0]
        src = "stdlib" if top in _sys.stdlib_module_names else top
        sources[src] += 1
        tokens[src] += n
    arr = np.asarray(lengths)
    return {"documents": len(docs), "tokens": int(arr.sum()), "words": sum(len(d.text.split()) for d in docs),
            "length_quantiles": {str(q): float(np.quantile(arr, q)) for q in QUANTILES},
            "max": int(arr.max()), "over_2048": int((arr > 2048).sum()), "under_512": int((arr < 512).sum()),
            "sources": len(sources), "by_source": {s: [sources[s], tokens[s]] for s in sorted(sources)}}


def window_stats(dm) -> dict:
    ex = dm.examples()
    train, val = ex["train"], ex["val"]
    chunk_tokens = np.asarray([b - a for e in train for a, b in e.spans])
    per_window = np.asarray([len(e.spans) for e in train])
    window_tokens = np.asarray([len(e.input_ids) for e in train])
    held = sorted({e.doc_id.split(".")[0] for e in val})
    return {"train_windows": len(train), "val_windows": len(val), "val_held_out": held,
            "train_tokens": int(window_tokens.sum()),
            "window_tokens_quantiles": {str(q): float(np.quantile(window_tokens, q)) for q in QUANTILES},
            "chunks": len(chunk_tokens), "chunks_per_window_median": float(np.median(per_window)),
            "chunk_tokens_quantiles": {str(q): float(np.quantile(chunk_tokens, q)) for q in QUANTILES},
            "chunk_tokens_mean": float(chunk_tokens.mean())}


def report(result: dict, command: str) -> str:
    c, w = result["corpus"], result["windows"]
    q = c["length_quantiles"]
    cq, wq = w["chunk_tokens_quantiles"], w["window_tokens_quantiles"]
    top = sorted(c["by_source"].items(), key=lambda kv: -kv[1][1])[:12]
    lines = [
        f"# What {', '.join(result['config'])} trains on",
        "",
        f"Command: `{command}` (all-MiniLM-L6-v2 tokens, no special tokens).",
        "",
        "## Corpus",
        "",
        (f"- {c['documents']:,} documents from {c['sources']} sources (the standard library and each package), "
        f"{c['tokens']:,} tokens, {c['words']:,} words."),
        (f"- Document length in tokens: 10% {q['0.1']:.0f}, 25% {q['0.25']:.0f}, median {q['0.5']:.0f}, "
        f"75% {q['0.75']:.0f}, 90% {q['0.9']:.0f}, 99% {q['0.99']:.0f}, max {c['max']:,}; "
        f"{c['over_2048']:,} documents over 2,048 tokens, {c['under_512']:,} under 512."),
        "- Largest sources (documents, tokens): " + "; ".join(f"{s} {n:,} / {t:,}" for s, (n, t) in top) + ".",
        "",
        "## Windows and chunks",
        "",
        (f"- {w['train_windows']:,} training windows ({w['train_tokens']:,} student tokens, special tokens included), "
        f"{w['val_windows']:,} validation windows from the held-out packages: {', '.join(w['val_held_out'])}."),
        f"- Window tokens: 10% {wq['0.1']:.0f}, median {wq['0.5']:.0f}, 90% {wq['0.9']:.0f}.",
        (f"- {w['chunks']:,} training chunks, median {w['chunks_per_window_median']:.0f} per window. Chunk length in "
        f"tokens: 10% {cq['0.1']:.0f}, 25% {cq['0.25']:.0f}, **median {cq['0.5']:.0f}**, 75% {cq['0.75']:.0f}, "
        f"90% {cq['0.9']:.0f}, mean {w['chunk_tokens_mean']:.1f}."),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--config", action="append", required=True, help="experiment file(s), stacked in order")
    p.add_argument("--out", type=Path, default=None, help="write <out>.md and <out>.json (default: print)")
    a = p.parse_args()
    from dewey_lab.data.datamodule import DistillDataModule

    dm = DistillDataModule.from_config(merged(a.config))
    result = {"config": a.config, "corpus": corpus_stats(dm), "windows": window_stats(dm)}
    text = report(result, "python benchmarks/corpus_stats.py " + " ".join(sys.argv[1:]))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".md").write_text(text)
        a.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
