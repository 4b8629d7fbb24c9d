"""What the tokenise-once data layer changes, window by window, against the code before it.

    python benchmarks/text_fix_diff.py                 # the tiny scale (make train) -> results/text-fix/diff.{md,json}
    python benchmarks/text_fix_diff.py -c experiments/tiny.yaml -c experiments/chunking_ablation.yaml

The old code (commit ``0b9fa95``, checked out as a git worktree in ``--old``, created if missing; a
worktree leaves this checkout's index alone) cuts the corpus of the merged config into windows and
encodes every one as training did: its text re-tokenised with ``truncation=True`` at ``max_length``,
and each chunk's token span found from the re-tokenised offsets. It runs in a child process (the old
package is imported from the worktree) and writes what it built to JSON. The new code
(``windows.Windower``) builds the same config's windows here. The windows are compared one by one
(train then val, in corpus order):

* the window's text (the whole-text teacher text) and its chunk texts (each chunk's teacher text);
* for every window whose teacher texts are all unchanged and whose tokens the old code did not alter
  by re-tokenising, the student's item: input ids, content mask, chunk token spans and cache keys.

Each change is put down to its cause: a window re-tokenised longer than ``max_length`` (truncated), or
re-tokenised into other tokens (it starts inside a word), a chunk cut or dropped by that truncation, or
a chunk whose edge fell inside a token (its teacher text now covers the whole tokens).

Then the batches: on the documents none of whose windows changed, both codes build their data module
(the config's windows, a stand-in teacher whose vector is a hash of the text) in the four layouts of
``batching_ablation`` (padded, packed, token budget padded and packed), and every training batch of two
epochs and every validation batch must be the same, tensor for tensor: what the model reads, so the
same numbers from the same model code.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OLD_COMMIT = "0b9fa95"

# Run inside the old worktree: every window of the merged config as the old DistillDataset encoded it.
OLD_DUMP = r"""
import json, sys, warnings
warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
from dewey_lab.cli import BASE_CONFIG, merged_config
from dewey_lab.datamodule import DistillDataModule, encode_with_spans, example_keys
configs, out = json.loads(sys.argv[1]), sys.argv[2]
kw = {"parser_mode": "omegaconf+", "exit_on_error": False}
kw.update({s: {"default_config_files": [str(BASE_CONFIG)], "exit_on_error": False} for s in ("fit", "validate", "test", "predict")})
dm = DistillDataModule.from_config(merged_config(["fit", *[a for c in configs for a in ("-c", c)]], kw))
w, fp, rows = dm.windower, dm.teacher.fingerprint, []
for split in ("train", "val"):
    for ex in dm.examples()[split]:
        cut = encode_with_spans(w.tokenizer, ex.text, ex.chunks, w.max_length, w.prompt)
        full = encode_with_spans(w.tokenizer, ex.text, ex.chunks, 1 << 30, w.prompt)
        whole, chunks = example_keys(fp, ex)
        rows.append({"split": split, "doc": ex.doc_id, "text": ex.text, "chunks": ex.chunks, "ids": cut["input_ids"],
                     "content": cut["content_mask"], "spans": cut["spans"], "full_spans": full["spans"],
                     "full_length": len(full["input_ids"]), "keys": [whole.hex()] + [k.hex() for k in chunks]})
json.dump({"max_length": w.max_length, "rows": rows}, open(out, "w"))
"""


# Both codes' batches: a stand-in teacher (a text's vector is its hash), every batch of two epochs and of
# validation. ``{teacher}`` and ``{data}`` are the two codes' module paths; ``build`` makes the data module.
BATCHES = r"""
import hashlib, json, sys, warnings
import numpy as np, torch
from {data}.corpus import JsonlCorpus
from {data}.datamodule import DistillDataModule
from {teacher} import Teacher

class HashTeacher(Teacher):
    fingerprint = "hash-teacher"

    def encode(self, texts):
        return np.stack([np.frombuffer(hashlib.sha256(t.encode("utf-8", "surrogatepass")).digest(), dtype=np.uint8)[:8]
                         .astype(np.float32) / 255 for t in texts])

def batches(args, build):
    out = {{}}
    for name, layout in args["layouts"].items():
        dm = build(JsonlCorpus(args["corpus"]), HashTeacher(), f"{{args['cache']}}/{{name}}", args["windows"], layout)
        dm.prepare_data()
        dm.setup("fit")
        loader = dm.train_dataloader()
        out[name] = {{"train": [b for _ in range(2) for b in loader], "val": list(dm.val_dataloader())}}
    return out
"""

OLD_BATCHES = BATCHES.format(data="dewey_lab", teacher="dewey_lab.teacher") + r"""
args = json.loads(sys.argv[1])
def build(corpus, teacher, cache, windows, layout):
    return DistillDataModule(corpus=corpus, teacher=teacher, cache_dir=cache, **windows, **layout)
torch.save(batches(args, build), sys.argv[2])
"""

LAYOUTS = {"padded": {"pack": False, "batch_tokens": None}, "packed": {"pack": True, "batch_tokens": None},
           "budget_padded": {"pack": False, "batch_tokens": 4096}, "budget_packed": {"pack": True, "batch_tokens": 4096}}


def same_batches(old: Path, dm, docs: list[str]) -> dict:
    """Every batch of both codes on the documents ``docs`` (of ``dm``'s corpus), in every layout: equal?"""
    import torch

    from dewey_lab.data.datamodule import DistillDataModule
    from dewey_lab.data.fill import CacheConfig
    from dewey_lab.data.packing import BatchConfig
    from dewey_lab.data.windows import WindowConfig

    if type(dm.chunker).__name__ != "Chunker" or vars(dm.chunker) != vars(type(dm.chunker)(seed=dm.seed)):
        return {"skipped": "the config sets its own chunker; the batch check runs on the default one"}
    wanted = set(docs)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "unchanged.jsonl"
        corpus.write_text("".join(json.dumps({"id": d.doc_id, "text": d.text}) + "\n"
                                  for d in dm.corpus.documents() if d.doc_id in wanted))
        windows = {k: getattr(dm.windows, k) for k in ("tokenizer", "max_length", "overflow", "min_window_tokens",
                                                        "max_windows_per_doc", "prompt", "val_fraction",
                                                        "max_val_examples")}
        args = {"corpus": str(corpus), "cache": f"{tmp}/old_cache", "windows": {**windows, "seed": dm.seed},
                "layouts": {k: {**v, "batch_size": dm.batching.batch_size} for k, v in LAYOUTS.items()}}
        env = {**os.environ, "PYTHONPATH": str(old), "DEWEY_LOG": "WARNING"}
        subprocess.run([sys.executable, "-c", OLD_BATCHES, json.dumps(args), f"{tmp}/old.pt"], cwd=old, env=env,
                       check=True, stdout=subprocess.DEVNULL)
        before = torch.load(f"{tmp}/old.pt", weights_only=False)
        scope: dict = {}
        exec(BATCHES.format(data="dewey_lab.data", teacher="dewey_lab.data.teacher"), scope)  # noqa: S102 (our own text)

        def build(corpus, teacher, cache, windows, layout):
            windows = dict(windows)
            seed = windows.pop("seed")
            return DistillDataModule(corpus=corpus, teacher=teacher, cache=CacheConfig(cache), seed=seed,
                                     windows=WindowConfig(**windows), batching=BatchConfig(**layout))

        now = scope["batches"]({**args, "cache": f"{tmp}/new_cache"}, build)
    out = {"documents": len(wanted)}
    for name in LAYOUTS:
        pairs = [(split, a, b) for split in ("train", "val") for a, b in zip(before[name][split], now[name][split])]
        same = all(len(before[name][s]) == len(now[name][s]) for s in ("train", "val")) and all(
            a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
            for _, a, b in pairs)
        out[name] = {"train_batches": len(now[name]["train"]), "val_batches": len(now[name]["val"]),
                     "texts": sum(len(b["doc_row"]) for b in now[name]["train"]), "identical": same}
    return out


def old_windows(old: Path, configs: list[str]) -> dict:
    if not (old / "dewey_lab" / "datamodule.py").exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), OLD_COMMIT], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "old.json"
        env = {**os.environ, "PYTHONPATH": str(old), "DEWEY_LOG": "WARNING"}
        paths = [str((REPO / c).resolve()) if not Path(c).is_absolute() else c for c in configs]
        old_paths = [p.replace(str(REPO), str(old)) for p in paths]  # the old experiment files (old class paths)
        subprocess.run([sys.executable, "-c", OLD_DUMP, json.dumps(old_paths), str(out)], cwd=old, env=env, check=True)
        return json.loads(out.read_text())


def new_windows(configs: list[str]):
    from dewey_lab.cli import BASE_CONFIG, merged_config
    from dewey_lab.data.datamodule import DistillDataModule

    kw = {"parser_mode": "omegaconf+", "exit_on_error": False}
    kw.update({s: {"default_config_files": [str(BASE_CONFIG)], "exit_on_error": False}
               for s in ("fit", "validate", "test", "predict")})
    dm = DistillDataModule.from_config(merged_config(["fit", *[a for c in configs for a in ("-c", c)]], kw))
    examples = dm.examples()
    return dm, [("train", e) for e in examples["train"]] + [("val", e) for e in examples["val"]]


def compare(old: dict, dm, new: list) -> dict:
    """Counts of what changed and why, and up to 5 examples of each kind."""
    counts: collections.Counter = collections.Counter()
    samples: dict[str, list] = collections.defaultdict(list)
    tok = dm.tokenizer

    def note(kind: str, what: dict) -> None:
        counts[kind] += 1
        if len(samples[kind]) < 5:
            samples[kind].append(what)

    if len(old["rows"]) != len(new):
        raise SystemExit(f"the old code cut {len(old['rows'])} windows, the new {len(new)}: not the same windowing")
    teacher_tok, teacher_len = dm.teacher.model.tokenizer, dm.teacher.model.max_seq_length
    changed_docs: set[str] = set()
    for row, (split, ex) in zip(old["rows"], new, strict=True):
        if (row["split"], row["doc"]) != (split, ex.doc_id) or row["text"] != ex.text:
            raise SystemExit(f"window of {ex.doc_id} differs in its text: not the same windowing")
        counts["windows"] += 1
        counts["chunks_drawn"] += len(row["chunks"])
        counts["chunks_new"] += len(ex.chunks)
        teacher_n = len(teacher_tok(ex.text)["input_ids"])
        counts["whole_texts_over_the_teacher_window"] += teacher_n > teacher_len
        truncated = row["full_length"] > old["max_length"]
        counts["whole_texts_over_the_teacher_window_truncated_before"] += teacher_n > teacher_len and truncated
        retokenised = list(row["ids"]) != ex.input_ids.tolist()
        if truncated:
            note("windows_truncated_by_re_tokenising", {"doc": ex.doc_id, "re_tokenised": row["full_length"],
                                                         "max_length": old["max_length"]})
        elif retokenised:
            note("windows_re_tokenised_into_other_tokens", {
                "doc": ex.doc_id, "old_first_tokens": tok.convert_ids_to_tokens(row["ids"][1:4]),
                "new_first_tokens": tok.convert_ids_to_tokens(ex.input_ids[1:4].tolist())})
        # chunks: the chunker's spans on the same text, old status against new teacher text
        new_texts = ex.teacher_texts()[1:]
        kept = [i for i, (s, e) in enumerate(row["chunks"]) if row["full_spans"][i] is not None]
        if len(kept) != len(new_texts):
            raise SystemExit(f"window of {ex.doc_id}: {len(kept)} chunks with tokens before, {len(new_texts)} now")
        changed_chunks = 0
        for i, new_text in zip(kept, new_texts, strict=True):
            s, e = row["chunks"][i]
            old_text, cut, full = row["text"][s:e], row["spans"][i], row["full_spans"][i]
            if cut is None:
                note("chunks_dropped_by_truncation_before", {"doc": ex.doc_id, "chunk": old_text[:60]})
            elif cut != full:
                note("chunks_cut_by_truncation_before", {
                    "doc": ex.doc_id, "student_tokens_before": cut[1] - cut[0], "chunk_tokens": full[1] - full[0]})
            if new_text != old_text:
                changed_chunks += 1
                note("chunk_texts_changed_to_token_edges", {"doc": ex.doc_id, "before": old_text[-40:],
                                                                "now": new_text[-40:]})
        if changed_chunks:
            counts["windows_with_a_chunk_text_changed"] += 1
        if truncated or retokenised or changed_chunks:
            changed_docs.add(ex.doc_id)
            continue
        counts["windows_unchanged"] += 1
        same = (list(row["content"]) == ex.content_mask.tolist()
                and [tuple(sp) for sp in row["spans"] if sp is not None] == list(ex.spans)
                and row["keys"][0] == ex.keys[0].hex()
                and [row["keys"][1 + i] for i in kept] == [k.hex() for k in ex.keys[1:]])
        counts["unchanged_windows_with_an_identical_item" if same else "unchanged_windows_with_another_item"] += 1
        if not same:
            note("unchanged_window_item_differs", {"doc": ex.doc_id})
    unchanged_docs = sorted({ex.doc_id for _, ex in new} - changed_docs)
    return {"counts": dict(counts), "samples": dict(samples), "unchanged_documents": unchanged_docs}


def markdown(configs: list[str], result: dict) -> str:
    c = collections.Counter(result["counts"])
    rows = [
        ("windows (train + val); the same windows and whole-text teacher texts before and after", c["windows"]),
        ("chunks drawn / with student tokens now", f"{c['chunks_drawn']} / {c['chunks_new']}"),
        ("windows the old code re-tokenised past max_length (the student read a truncated window)",
         c["windows_truncated_by_re_tokenising"]),
        ("windows the old code re-tokenised into other tokens within max_length (they start inside a word)",
         c["windows_re_tokenised_into_other_tokens"]),
        ("chunks cut by that truncation before (the teacher embedded the whole chunk, the student read part)",
         c["chunks_cut_by_truncation_before"]),
        ("chunks dropped by that truncation before (now in the item)", c["chunks_dropped_by_truncation_before"]),
        ("chunk teacher texts changed (a chunk edge inside a token: now the whole tokens)",
         f"{c['chunk_texts_changed_to_token_edges']} in {c['windows_with_a_chunk_text_changed']} windows"),
        ("windows unchanged (every teacher text, and the tokens the student reads)", c["windows_unchanged"]),
        ("... whose student item (ids, content mask, chunk token spans, cache keys) is identical",
         c["unchanged_windows_with_an_identical_item"]),
        ("... whose student item differs", c["unchanged_windows_with_another_item"]),
        ("whole texts longer than the teacher's own window (the teacher truncates them, before and after)",
         c["whole_texts_over_the_teacher_window"]),
        ("... of which the old code truncated too (for the student)", c["whole_texts_over_the_teacher_window_truncated_before"]),
    ]
    lines = [
        "# Tokenise once: what the teacher and the student see, before and after",
        "",
        (f"Config: `{' + '.join(['experiments/base.yaml', *configs])}` (what `make train` runs). "
         f"Old code: commit `{OLD_COMMIT}`. Rerun: `python benchmarks/text_fix_diff.py`."),
        "",
        "| | count |",
        "|---|---:|",
        *(f"| {label} | {value} |" for label, value in rows),
        "",
        "Every window's whole-text teacher text is unchanged (the windowing is the same); what changed is what",
        "the student reads of a window the old code re-tokenised, and the chunk texts whose teacher text and",
        "student tokens disagreed. The last row is not this change's: a teacher re-tokenises a window's text",
        "itself, and a window that starts inside a word (`##ars` read alone as `ars`) can take it one token past",
        "its own window, so it drops the text's last token, before and after (where the teacher shares the",
        "student's tokenizer and window, as in tiny.yaml, the old code truncated the same windows for the",
        "student). Cutting split windows at word starts would end it, but moves every later window of those",
        "documents: a change of the windowing, left for a decision.",
        "",
        "Examples of each kind:",
        "",
    ]
    for kind, samples in result["samples"].items():
        lines.append(f"- `{kind}`: " + "; ".join(json.dumps(r, ensure_ascii=False) for r in samples[:3]))
    batches = result.get("batches") or {}
    if "skipped" in batches:
        lines += ["", f"Batches: not compared ({batches['skipped']})."]
    elif batches:
        intro = (f"**Batches.** On the {batches['documents']} documents none of whose windows changed, both codes' "
                 "data modules (a stand-in teacher: a text's vector is its hash) give these batches, compared tensor "
                 "for tensor (ids, masks, positions, chunk positions, teacher vectors):")
        lines += ["", intro, "", "| layout | training batches (2 epochs) | texts | validation batches | identical |",
                  "|---|---:|---:|---:|---|"]
        for name, b in batches.items():
            if name != "documents":
                same = "yes" if b["identical"] else "NO"
                lines.append(f"| {name} | {b['train_batches']} | {b['texts']} | {b['val_batches']} | {same} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--config", action="append", help="experiment files stacked on base.yaml (default: tiny)")
    p.add_argument("--old", default="/tmp/old", help="worktree of the old code (created if missing)")
    p.add_argument("--out", default=str(REPO / "results" / "text-fix" / "diff"), help="report path, no suffix")
    args = p.parse_args()
    configs = args.config or ["experiments/tiny.yaml"]
    old = old_windows(Path(args.old), configs)
    dm, new = new_windows(configs)
    result = {"configs": configs, "old_commit": OLD_COMMIT, **compare(old, dm, new)}
    result["batches"] = same_batches(Path(args.old), dm, result["unchanged_documents"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    out.with_suffix(".md").write_text(markdown(configs, result))
    print(markdown(configs, result))


if __name__ == "__main__":
    main()
