"""``dewey-lab export``: a training checkpoint -> a sentence-transformers directory, no custom code.

    dewey-lab export --ckpt runs/tiny/version_0/checkpoints/last.ckpt --out models/tiny-student

The directory holds only stock sentence-transformers modules, so ``SentenceTransformer(out)`` loads
it without ``trust_remote_code`` (Dewey's own release needed remote code):

    Transformer (ModernBertModel + the tokenizer)  ->  [WordWeights]  ->  Pooling  ->  [Dense]  ->  Normalize

The pooling is the checkpoint's trained whole-text head unless ``--pooling`` names another
(``dewey_lab.model.pooling``). Each head declares the sentence-transformers Pooling modes whose average
it is (``PoolingHead.sentence_transformers_modes``); a head that declares none (``attention``: a learned
query, which no stock module computes) is refused in one line, never exported as something else.

* ``cls``: Pooling(cls). Exact.
* ``mean``: dewey_lab pools text tokens only (no CLS, SEP, prompt; the Dewey report). Stock Pooling
  would also average CLS and SEP, so a WordWeights module gives the special tokens weight 0 and
  Pooling(mean) then divides by the weight sum: exact. With a prompt, the prompt's tokens are
  ordinary words and are pooled too (no stock module can drop them and fix the count): the export
  warns, and vectors differ from ``dewey_lab.encode``'s.
* ``cls_mean``: Pooling(cls, mean) concatenated, then a Dense whose weight is ``0.5 [W, W]``, so the
  head sees ``0.5 (cls + mean)`` (k modes: ``[W, ..., W] / k``). Stock mean includes CLS and SEP here
  (WordWeights would zero the CLS state too): close, not exact; the export warns.
* ``last``: Pooling(lasttoken); exact unless the tokenizer has an EOS that dewey_lab appends and
  sentence-transformers does not.

Whether an export is exact is measured, not assumed: the saved model and dewey_lab encode a few probe
texts (queries and documents, with their prompts), and ``exact_in_sentence_transformers`` in
``dewey_lab.json`` says whether they agree to 1e-5; a new head needs no rule here.
* Dense: the student's projection to the teacher's space (absent when it was the identity);
  Normalize: unit vectors, as dewey_lab scores them.

Prompts (query / document), the pooling choice and the max length go into the saved config; a
model card (README.md) carries the training config and, with ``--eval_results``, an eval table.

``--multi-vector`` writes a ``MultiVectorEncoder`` (sentence-transformers >= 6) that scores as
``dewey-lab eval --mode multi`` does: one vector per late chunk (``--chunk-size`` / ``--chunk-overlap``
tokens, the eval's flags and defaults) with its token span, queries as the mean of their text tokens,
``model.similarity`` = max over chunks of ``q . chunk``:

    Transformer  ->  LateChunkPooling (dewey_lab.st_modules)  ->  [Dense]  ->  Normalize

No stock module pools position windows, so one module is ours: dewey_lab must be installed, and loading
takes ``MultiVectorEncoder(out, trust_remote_code=True)`` (sentence-transformers 6 imports a class outside
its namespace only with that flag; it imports the installed ``dewey_lab.st_modules``, downloads nothing).
Exactness is measured the same way, on queries and on every chunk of the probe texts.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from dewey_lab.model.pooling import PoolingHead

log = logging.getLogger(__name__)


def exportable() -> list[str]:
    """Names of the pooling heads sentence-transformers' stock modules can express."""
    return [n for n, head in PoolingHead.choices().items() if head().sentence_transformers_modes()]


def export(ckpt: str, out: str, *, pooling: str | None = None, query_prompt: str = "", passage_prompt: str = "",
           max_length: int | None = None, eval_results: str | None = None, push_to_hub: str | None = None,
           multi_vector: bool = False, chunk_size: int = 256, chunk_overlap: int = 64):
    """Write ``out`` and return the reloaded ``SentenceTransformer`` (what a user gets). ``pooling``: a head's
    name; None: the checkpoint's trained whole-text head. ``multi_vector``: write and return a
    ``MultiVectorEncoder`` of late chunks instead (``export_multi_vector``)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, WordWeights

    from dewey_lab.eval.embedder import Embedder
    from dewey_lab.eval.load import load_checkpoint
    from dewey_lab.model.student import load_tokenizer
    from dewey_lab.st_modules import added_token_ids

    if multi_vector:
        if pooling is not None:
            raise ValueError("--pooling picks the single-vector head; --multi-vector pools late chunks (queries: "
                             "the mean of their text tokens, as dewey-lab eval --mode multi): drop one of them")
        return export_multi_vector(ckpt, out, chunk_size=chunk_size, chunk_overlap=chunk_overlap,
                                   query_prompt=query_prompt, passage_prompt=passage_prompt, max_length=max_length,
                                   eval_results=eval_results, push_to_hub=push_to_hub)
    if pooling is not None and pooling not in PoolingHead.choices():
        raise ValueError(f"unknown pooling {pooling!r}; use one of {', '.join(exportable())}")
    module = load_checkpoint(ckpt)
    student = module.student
    head = PoolingHead.pick(pooling, module.whole_pooling, student.config.hidden_size)
    name, modes = head.name or type(head).__name__, head.sentence_transformers_modes()
    if not modes:
        raise ValueError(f"pooling {name!r} has no sentence-transformers equivalent (no stock module computes it); "
                         f"use the checkpoint itself (dewey-lab eval, dewey_lab.encode.load) or export another head "
                         f"with --pooling {' / '.join(exportable())}")
    tokenizer = load_tokenizer(module.spec.tokenizer_name)
    max_length = max_length or student.config.max_position_embeddings
    explained = False  # the known reasons a stock module differs from ours, said before the measurement
    if (query_prompt or passage_prompt) and modes == ("mean",):
        explained = True
        log.warning("export: sentence-transformers pools the prompt's tokens too with mean pooling; its "
                    "vectors will differ from dewey_lab.encode's (use --pooling cls for an exact export)")
    if "mean" in modes and len(modes) > 1:
        explained = True
        log.warning("export: %s's mean includes CLS and SEP in sentence-transformers; vectors are "
                    "close to, not equal to, dewey_lab.encode's (cls and mean export exactly)", name)

    out_dir = Path(out)
    modules = [_backbone(student, tokenizer, max_length)]
    hidden = student.config.hidden_size
    if modes == ("mean",):  # ours averages text tokens only: the added tokens weigh 0
        special = set(added_token_ids(tokenizer))
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        modules.append(WordWeights(vocab, {tok: 0.0 for i, tok in enumerate(vocab) if i in special}, 1.0))
    modules.append(Pooling(hidden, pooling_mode=modes[0] if len(modes) == 1 else modes, include_prompt=True))
    dense = _dense(module.projection, hidden, parts=len(modes))
    if dense is not None:
        modules.append(dense)
    modules.append(Normalize())
    model = SentenceTransformer(modules=modules, device="cpu",
                                prompts={"query": query_prompt, "document": passage_prompt})
    model.save(str(out_dir))
    reloaded = SentenceTransformer(str(out_dir), device="cpu")
    ours = Embedder(student, tokenizer, head=module.projection, pooling=head, max_length=max_length,
                    query_prompt=query_prompt, passage_prompt=passage_prompt, device="cpu")
    gap = probe_gap(reloaded, ours)
    if gap > EXACT_TOL and not explained:
        log.warning("export: sentence-transformers' Pooling %s differs from dewey_lab's %s head by up to %.2g on "
                    "probe texts; dewey_lab.json records exact_in_sentence_transformers: false", "+".join(modes), name, gap)
    _write_dewey_config(out_dir, ckpt, name, gap <= EXACT_TOL, query_prompt, passage_prompt, max_length)
    (out_dir / "README.md").write_text(model_card(ckpt, out_dir.name, name, query_prompt, passage_prompt,
                                                  max_length, eval_results))
    if push_to_hub:
        upload(out_dir, push_to_hub)
    return reloaded


def export_multi_vector(ckpt: str, out: str, *, chunk_size: int = 256, chunk_overlap: int = 64, query_prompt: str = "",
                        passage_prompt: str = "", max_length: int | None = None, eval_results: str | None = None,
                        push_to_hub: str | None = None):
    """Write ``out`` as a ``MultiVectorEncoder`` that scores as ``dewey-lab eval --mode multi`` (query_pooling
    ``chunk``) with the same ``chunk_size`` / ``chunk_overlap``, and return it reloaded (what a user gets)."""
    from sentence_transformers import MultiVectorEncoder
    from sentence_transformers.models import Normalize

    from dewey_lab.eval.embedder import Embedder
    from dewey_lab.eval.load import load_checkpoint
    from dewey_lab.model.student import load_tokenizer
    from dewey_lab.st_modules import LateChunkPooling, added_token_ids

    module = load_checkpoint(ckpt)
    student = module.student
    tokenizer = load_tokenizer(module.spec.tokenizer_name)
    max_length = max_length or student.config.max_position_embeddings
    hidden = student.config.hidden_size
    chunks = LateChunkPooling(chunk_size, chunk_overlap, special_token_ids=added_token_ids(tokenizer),
                              chunk_pooling=module.chunk_pooling.config(), hidden_size=hidden)
    chunks.chunk_head.load_state_dict(module.chunk_pooling.state_dict())  # a trained chunk head's weights, if any
    modules = [_backbone(student, tokenizer, max_length), chunks]
    dense = _dense(module.projection, hidden, input_name="token_embeddings")
    if dense is not None:
        modules.append(dense)
    modules.append(Normalize(module_input_name="token_embeddings"))
    model = MultiVectorEncoder(modules=modules, device="cpu", prompts={"query": query_prompt, "document": passage_prompt})
    out_dir = Path(out)
    model.save(str(out_dir))
    reloaded = MultiVectorEncoder(str(out_dir), device="cpu", trust_remote_code=True)  # imports dewey_lab.st_modules
    # what dewey-lab eval --mode multi builds for this checkpoint: its trained heads, late chunks, chunk-pooled queries
    ours = Embedder(student, tokenizer, head=module.projection, pooling=module.whole_pooling,
                    chunk_pooling=module.chunk_pooling, max_length=max_length, query_prompt=query_prompt,
                    passage_prompt=passage_prompt, chunk_size=chunk_size, chunk_overlap=chunk_overlap, device="cpu")
    gap = multi_probe_gap(reloaded, ours)
    if gap > EXACT_TOL:
        log.warning("export: the multi-vector export differs from dewey-lab eval --mode multi by up to %.2g on probe "
                    "texts; dewey_lab.json records exact_in_sentence_transformers: false", gap)
    pooling = f"late chunks {chunk_size}/{chunk_overlap} by {type(chunks.chunk_head).__name__}, queries: chunk"
    _write_dewey_config(out_dir, ckpt, pooling, gap <= EXACT_TOL, query_prompt, passage_prompt, max_length,
                        multi_vector={"chunk_size": chunk_size, "chunk_overlap": chunk_overlap,
                                      "query_pooling": "chunk", "chunk_pooling": chunks.chunk_head.describe(),
                                      "score": "max over chunks of q . chunk (MultiVectorEncoder.similarity)"})
    (out_dir / "README.md").write_text(model_card(ckpt, out_dir.name, pooling, query_prompt, passage_prompt,
                                                  max_length, eval_results, multi_vector=True))
    if push_to_hub:
        upload(out_dir, push_to_hub)
    return reloaded


def _backbone(student, tokenizer, max_length: int):
    """The student and its tokenizer as a stock sentence-transformers Transformer module."""
    from sentence_transformers.models import Transformer

    with tempfile.TemporaryDirectory() as tmp:  # the HF model dir the Transformer module loads from
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return Transformer(tmp, max_seq_length=max_length)


EXACT_TOL = 1e-5
PROBES = ("What is the pass key for Ana Lee?", "The grass is green. The sky is blue. " * 12 + "Ana Lee's pass key is 52817.")
LONG_PROBE = "The grass is green. The sky is blue. " * 60 + "Ana Lee's pass key is 52817. " + "Here we go. " * 40
"""A multi-vector probe of several chunks at the default 256 / 64 (about 600 tokens)."""


@torch.no_grad()
def probe_gap(st_model, embedder) -> float:
    """Largest difference between an export and dewey_lab on the probe texts, as queries and as documents."""
    st_q = torch.as_tensor(st_model.encode(list(PROBES), prompt_name="query"))
    st_d = torch.as_tensor(st_model.encode(list(PROBES), prompt_name="document"))
    ours_q = embedder.encode_queries(PROBES)
    ours_d = embedder.encode_passages(PROBES, chunks=False).single
    return max(float((st_q - ours_q).abs().max()), float((st_d - ours_d).abs().max()))


@torch.no_grad()
def multi_probe_gap(mve_model, embedder) -> float:
    """Largest difference between a multi-vector export and the Embedder ``dewey-lab eval --mode multi`` scores
    with: the probe texts as queries (chunk-pooled) and every late chunk of them as documents; inf when a text's
    chunk count differs."""
    texts = [*PROBES, LONG_PROBE]
    st_q = torch.cat([torch.as_tensor(q).cpu() for q in mve_model.encode_query(texts)])  # (Q, D): one vector each
    ours_q = embedder.embed_queries(texts, extra={"q": embedder.query_head()}).extra["q"]
    enc = embedder.encode_passages(texts, chunks=True)
    gap = float((st_q - ours_q).abs().max()) if st_q.shape == ours_q.shape else float("inf")
    for i, d in enumerate(mve_model.encode_document(texts)):
        mine = enc.chunks[enc.owner == i]
        gap = max(gap, float((torch.as_tensor(d).cpu() - mine).abs().max()) if d.shape == mine.shape else float("inf"))
    return gap


def upload(folder: Path, repo_id: str) -> None:
    """Upload the folder ``export`` wrote, as it is: the weights, every module's config, ``dewey_lab.json``
    and our model card (``SentenceTransformer.push_to_hub`` would re-save the model and drop the last two)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="dewey-lab export")
    log.info("export: uploaded %s to https://huggingface.co/%s", folder, repo_id)


def _dense(projection, hidden: int, parts: int = 1, input_name: str = "sentence_embedding"):
    """The projection as a stock Dense module (identity activation) over ``parts`` concatenated pooling
    modes, which it averages; None when there is neither a projection nor anything to average. ``input_name``:
    the features it maps (``token_embeddings``: every chunk vector of a multi-vector export)."""
    from sentence_transformers.models import Dense

    if not isinstance(projection, torch.nn.Linear):
        if parts == 1:
            return None
        eye = torch.eye(hidden)  # cls_mean without a projection still needs 0.5 (cls + mean)
        return Dense(parts * hidden, hidden, activation_function=torch.nn.Identity(),
                     init_weight=(1.0 / parts) * torch.cat([eye] * parts, 1), init_bias=torch.zeros(hidden))
    w, b = projection.weight.detach().float(), projection.bias.detach().float()
    if parts > 1:  # W (cls + mean) / 2 + b over the concatenation [cls, mean]
        w = (1.0 / parts) * torch.cat([w] * parts, 1)
    return Dense(w.shape[1], w.shape[0], activation_function=torch.nn.Identity(), init_weight=w.clone(),
                 init_bias=b.clone(), module_input_name=input_name)


def _write_dewey_config(out: Path, ckpt, pooling, exact, query_prompt, passage_prompt, max_length,
                        **extra) -> None:
    """What dewey_lab needs to reproduce the vectors (and what produced them), next to ST's configs."""
    record = {"pooling": pooling, "exact_in_sentence_transformers": exact,
              "query_prompt": query_prompt, "passage_prompt": passage_prompt, "max_length": max_length,
              "checkpoint": str(ckpt), **extra}
    (out / "dewey_lab.json").write_text(json.dumps(record, indent=2) + "\n")


def model_card(ckpt: str, name: str, pooling: str, query_prompt: str, passage_prompt: str, max_length: int,
               eval_results: str | None, multi_vector: bool = False) -> str:
    run_dir = Path(ckpt).resolve().parent.parent  # runs/<experiment>/<version>/checkpoints/x.ckpt
    config = run_dir / "config.yaml"
    cfg_text = yaml.safe_dump(yaml.safe_load(config.read_text()), sort_keys=False) if config.exists() else "(none)"
    if multi_vector:
        usage = ["from sentence_transformers import MultiVectorEncoder  # pip install dewey_lab as well", "",
                 f'model = MultiVectorEncoder("{name}", trust_remote_code=True)  # imports dewey_lab.st_modules',
                 'q = model.encode_query(["a question"])  # one vector: the mean of its text tokens',
                 'd = model.encode_document(["a long document ..."])  # one vector per late chunk',
                 "scores = model.similarity(q, d)  # max over chunks of q . chunk",
                 'spans = model.encode_document(["a long document ..."], output_value=None)[0]["chunk_spans"]']
        more = [("- late chunks: token windows over the whole text's states, each mean-pooled; spans index "
                 "`tokenizer(prompt + text)` (special tokens included)")]
    else:
        usage = ["from sentence_transformers import SentenceTransformer", "",
                 f'model = SentenceTransformer("{name}")  # stock modules only, no trust_remote_code',
                 'q = model.encode(["a question"], prompt_name="query")',
                 'd = model.encode(["a long document ..."], prompt_name="document")']
        more = [("- chunk (multi-vector) embeddings of one long text in one pass: "
                 "`dewey_lab.encode.load(<dir>).encode_chunks(text)`")]
    lines = [
        "---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
        "tags: [sentence-transformers, feature-extraction, long-context, dewey_lab]", "---", "",
        f"# {name}", "",
        ("A ModernBERT student trained with dewey_lab's chunk-alignment distillation (the Dewey recipe): its "
        "whole-text embedding learns a teacher's embedding of the text, its chunk means the teacher's "
        "embedding of each chunk."), "",
        "```python", *usage, "```", "",
        f"- pooling: `{pooling}`; max length: {max_length} tokens; vectors are L2-normalised",
        f"- query prompt: `{query_prompt!r}`; document prompt: `{passage_prompt!r}`",
        *more,
        f"- checkpoint: `{ckpt}`", "",
    ]
    if eval_results:
        lines += ["## Evaluation", "", Path(eval_results).read_text().strip(), ""]
    lines += ["## Training config", "", "```yaml", cfg_text.rstrip(), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="dewey-lab export", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a DistillModule checkpoint from dewey-lab fit")
    p.add_argument("--out", required=True, help="directory to write (SentenceTransformer(out) loads it)")
    p.add_argument("--pooling", default=None,
                   help=f"whole-text embedding: {', '.join(exportable())} (default: the head the checkpoint "
                        "trained; one sentence-transformers cannot express, such as attention, is refused)")
    p.add_argument("--query-prompt", "--query_prompt", default="", dest="query_prompt")
    p.add_argument("--passage-prompt", "--passage_prompt", default="", dest="passage_prompt")
    p.add_argument("--max-length", "--max_length", type=int, default=None, dest="max_length",
                   help="tokens per text (default: the student's position window)")
    p.add_argument("--eval-results", "--eval_results", default=None, dest="eval_results",
                   help="a results .md from dewey-lab eval, copied into the model card")
    p.add_argument("--push-to-hub", "--push_to_hub", default=None, dest="push_to_hub",
                   help="also upload to this hub repo (needs network and a token)")
    p.add_argument("--multi-vector", "--multi_vector", action="store_true", dest="multi_vector",
                   help="write a sentence-transformers MultiVectorEncoder scoring as dewey-lab eval --mode multi: one "
                        "vector per late chunk, with its token span (output_value=None: chunk_spans), queries as the "
                        "mean of their text tokens, similarity = max over chunks. Load it with "
                        "MultiVectorEncoder(out, trust_remote_code=True), dewey_lab installed (its module "
                        "dewey_lab.st_modules.LateChunkPooling pools the chunks; nothing to import)")
    p.add_argument("--chunk-size", "--chunk_size", type=int, default=256, dest="chunk_size",
                   help="--multi-vector: late chunk, tokens (dewey-lab eval's default)")
    p.add_argument("--chunk-overlap", "--chunk_overlap", type=int, default=64, dest="chunk_overlap",
                   help="--multi-vector: tokens shared by neighbouring chunks")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        export(a.ckpt, a.out, pooling=a.pooling, query_prompt=a.query_prompt, passage_prompt=a.passage_prompt,
               max_length=a.max_length, eval_results=a.eval_results, push_to_hub=a.push_to_hub,
               multi_vector=a.multi_vector, chunk_size=a.chunk_size, chunk_overlap=a.chunk_overlap)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(a.out)


if __name__ == "__main__":
    main()
