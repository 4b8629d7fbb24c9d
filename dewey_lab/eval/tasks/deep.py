"""Deep sentence retrieval: real long documents no student trained on, each query a sentence from
deep inside its document (like a needle, but natural text that stays where it was written).

Two sources, both offline and split by source, never by page:

- ``heldout`` (task ``deep/heldout``): the evaluation-only documents, one per module of the
  packages in ``EVAL_PACKAGES`` (``dewey_lab.eval.tasks.heldout``: networkx's docstrings, read
  with ``ast``), which no training corpus holds whatever its ``val_fraction``. It replaces
  ``deep/pydoc``, which drew from the held-out *pages* of the training corpus (21 pages, queries
  in 10 of them: ranking by length alone scored nDCG@10 ~45 there).
- ``langref`` (task ``deep/langref``): the Python Language Reference topics that ship with every
  CPython (``pydoc_data.topics.topics``: 79 topics, ~465k characters on 3.11). The pydoc corpus's
  page for ``pydoc_data`` only names the ``topics`` module, so this text is not in it.

Rules:

- Every document is a candidate, cut to at most ``max_tokens`` tokens of the evaluated tokenizer
  (no special tokens) at a whitespace boundary, from a fast tokenizer's offsets, except one that
  shares a run of ``SHARED_WORDS`` words with the training text (every page of the pydoc corpus,
  both normalised as below, words split at whitespace): it is left out (``meta["shared_dropped"]``).
  On CPython 3.11 that is langref's ``debugger`` topic, whose command list is also ``pdb``'s
  docstring; no heldout document shares such a run.
- Text is compared *normalised*: each line loses its leading spaces and pydoc's ``|`` class
  gutter (the regex ``^[ \\t|]+`` per line), then whitespace runs become one space; matching is
  case-insensitive. A query is such a normalised sentence and occurs verbatim in its document's
  normalised text.
- Paragraphs are runs of lines between blank lines (a line with only spaces and ``|`` is blank);
  a line that is not prose is a paragraph of its own: a pydoc signature ``name(...)``, ``class
  X(...)``, ``name = ...`` or a section heading (``FUNCTIONS``). Inside a paragraph a sentence
  ends at a word ending in ``.``, ``!`` or ``?``.
- A query sentence has 8-40 words, starts with a capital letter and ends with ``.!?`` (not
  ``e.g.`` / ``i.e.``), and is prose: at least 80% of its words alphabetic once quotes and
  punctuation around them are stripped; no ``=``, ``>>>``, ``::``, ``|``, ``{}``, ``[]``, ``#``
  or call with arguments ``f(x``; at most one balanced ``(...)``. It occurs in exactly one
  document of the task and nowhere in the training text (every page of the pydoc corpus, a
  superset of any training split; langref shares a few str / dict docstrings with it), and its first
  occurrence in its document starts at least ``min_depth`` tokens in (``meta["depths"]``: the
  number of tokens of the cut document that start before it).
- Queries are spread over documents round-robin: the documents with candidates are shuffled,
  then each round takes one random candidate per document, until ``n_queries`` or none are left
  (a warning says when fewer than ``n_queries`` could be made). ``random.Random(f"deep/{source}/
  {seed}")`` fixes every choice.

What the defaults give (50 queries of both sources) is measured in ``make_deep``'s docstring.
"""

from __future__ import annotations

import bisect
import logging
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dewey_lab.data.corpus import JsonlCorpus
from dewey_lab.data.pydoc import PydocCorpus
from dewey_lab.eval.tasks.heldout import heldout_texts, package_versions
from dewey_lab.eval.tasks.task import RetrievalTask

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SOURCES = ("heldout", "langref")
MIN_WORDS, MAX_WORDS = 8, 40
MIN_ALPHA = 0.8  # share of alphabetic words a prose sentence needs
SHARED_WORDS = 32  # a document sharing a run of this many words with the training text is left out

_GUTTER = re.compile(r"[ \t|]*")  # a line's leading spaces and pydoc's class gutter "|"
_LINE_GUTTER = re.compile(r"^[ \t|]+", re.MULTILINE)
_WORDS = re.compile(r"\S+")
# A line that is not prose, a paragraph of its own: a pydoc signature `name(...)` (optionally
# `-> ...`), a class header, an assignment `name = ...`, or a pydoc section heading (`FUNCTIONS`).
_OWN_LINE = re.compile(
    r"[A-Za-z_][\w.]*\(.*\)(\s*->.*)?\s*$|class \w+(\(.*\))?:?\s*$|[\w.]+\s*=\s|[A-Z][A-Z ]*$"
)
_ALPHA_WORD = re.compile(r"[A-Za-z]+(?:['\u2019-][A-Za-z]+)*")
_PUNCT = "\"'()*,.;:!?\u201c\u201d\u2018\u2019"
_NOT_PROSE = ("=", ">>>", "::", "|", "{", "}", "[", "]", "#")
_ABBREVIATIONS = ("e.g.", "i.e.", "cf.", "vs.")  # a sentence "ending" in one is cut short
_CALL_WITH_ARGS = re.compile(r"\w\([^)]")  # `f(x, y)` reads as code; `f()` is a name in prose


@dataclass(frozen=True)
class _Sentence:
    text: str  # normalised (single spaces), as the query reads
    depth: int  # tokens of the cut document that start before its first occurrence


def make_deep(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    n_queries: int = 50,
    max_tokens: int = 8192,
    min_depth: int = 1024,
    seed: int = 0,
    corpus_path: str = "data/pydoc_corpus.jsonl",
) -> RetrievalTask:
    """Deep sentence retrieval over real long documents (rules in the module docstring).

    Measured with the all-MiniLM-L6-v2 tokenizer, 50 queries, ``max_tokens`` 8190 (``--lengths 8k``),
    on CPython 3.11.7 (~3 s and ~1 s on 2 busy CPUs): ``heldout`` (networkx 3.6.1) has 269 documents
    (6 cut), 2,266 candidate sentences in 128 of them, none in the pydoc corpus; 50 queries in 50
    documents at depths 1032 / 1579 / 7853 tokens (min / median / max). BM25 nDCG@10 93.1 (the
    sentence is verbatim in its document); ranking by length alone 4.6. ``langref`` has 77 topics (4
    cut; ``debugger`` and ``string-methods`` left out: they share word runs with the pdb and
    builtins pages), 453 candidates in 16 topics, 1 also in the pydoc corpus; 50 queries at depths
    1060 / 1726 / 8082. Only 26 of the 79 topics are longer than 1,024 tokens, so langref cannot hold
    queries in 50 documents at this depth (35 at ``min_depth`` 256); BM25 95.8, length alone 24.1.

    Args:
        source: ``heldout`` (the evaluation-only documents) or ``langref`` (the Language Reference topics).
        tokenizer: The evaluated model's fast tokenizer; lengths and depths are in its tokens.
        n_queries: Queries wanted (fewer, with a warning, when not enough sentences qualify).
        max_tokens: Every document is cut to at most this many tokens (no special tokens).
        min_depth: A query sentence starts at least this many tokens into its document.
        seed: Seed; with ``source`` it fixes which sentences become queries.
        corpus_path: The pydoc corpus jsonl, the training text (``PydocCorpus`` builds it there, ~5 s,
            if missing): sentences that occur in it are dropped.

    Returns:
        A validated ``RetrievalTask`` named ``deep/<source>`` with metric ``ndcg@10``.
    """
    if source not in SOURCES:
        raise ValueError(f"deep: unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    name = f"deep/{source}"
    if n_queries < 1:
        raise ValueError(f"{name}: n_queries must be >= 1, got {n_queries}")
    if not 0 <= min_depth < max_tokens:
        raise ValueError(f"{name}: need 0 <= min_depth < max_tokens, got min_depth {min_depth}, "
                         f"max_tokens {max_tokens}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{name}: needs a fast tokenizer (character offsets); load it with use_fast=True")

    meta: dict = {"source": source, "seed": seed, "min_depth": min_depth, "max_tokens": max_tokens,
                  "tokenizer": getattr(tokenizer, "name_or_path", None)}
    # a built corpus is read as it is (the package corpus too); a missing one is the stdlib corpus, built here
    source_pages = JsonlCorpus(corpus_path) if Path(corpus_path).exists() else PydocCorpus(cache_path=corpus_path)
    pages = {doc.doc_id: doc.text for doc in source_pages.documents()}
    training = list(pages.values())  # every page: whatever val_fraction a student trained with
    if source == "heldout":
        texts = heldout_texts()
        meta["packages"] = package_versions()
    else:
        texts = _langref_topics()
        meta["python"] = sys.version.split()[0]

    seen_in_training = "\n".join(normalise(text) for text in training).lower()
    shared = _sharing_runs(texts, seen_in_training)
    texts = {doc_id: text for doc_id, text in texts.items() if doc_id not in shared}
    meta["shared_dropped"] = shared
    corpus, starts = cut_to_tokens(tokenizer, texts, max_tokens)
    normalised = {doc_id: normalise(text) for doc_id, text in corpus.items()}
    lowered = {doc_id: text.lower() for doc_id, text in normalised.items()}

    # Candidates per document, deep enough and unique in the task; the check against the (larger)
    # training text is done as they are drawn.
    blob = "\n".join(lowered.values())  # unique: the first and the last hit lie in the same document
    pools: dict[str, list[_Sentence]] = {}
    begin = 0
    for doc_id, text in corpus.items():
        end = begin + len(lowered[doc_id])
        pool = []
        for sent in _sentences(text, normalised[doc_id], starts[doc_id]):
            if sent.depth < min_depth:  # cheap test first: the search below scans the whole blob
                continue
            needle = sent.text.lower()
            if blob.find(needle) >= begin and blob.rfind(needle) + len(needle) <= end:
                pool.append(sent)
        if pool:
            pools[doc_id] = pool
        begin = end + 1
    meta["n_candidates"] = sum(len(p) for p in pools.values())

    rng = random.Random(f"deep/{source}/{seed}")
    order = list(pools)  # corpus order, then shuffled
    rng.shuffle(order)
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    depths: dict[str, int] = {}
    dropped = 0
    while order and len(queries) < n_queries:
        for doc_id in list(order):
            if len(queries) == n_queries:
                break
            pool = pools[doc_id]
            sent = pool.pop(rng.randrange(len(pool)))
            if not pool:
                order.remove(doc_id)
            if sent.text.lower() in seen_in_training:
                dropped += 1
                continue
            qid = f"q{len(queries)}"
            queries[qid], qrels[qid], depths[qid] = sent.text, {doc_id: 1}, sent.depth
    if not queries:
        raise ValueError(f"{name}: no sentence qualifies at min_depth {min_depth} and max_tokens "
                         f"{max_tokens}; lower min_depth or raise max_tokens (the longest --lengths)")
    if len(queries) < n_queries:
        log.warning("%s: only %d of %d queries could be made (min_depth %d, max_tokens %d)",
                    name, len(queries), n_queries, min_depth, max_tokens)
    meta.update(n_docs=len(corpus), n_queries=len(queries), in_training_dropped=dropped, depths=depths,
                n_cut=sum(corpus[d] != texts[d] for d in corpus))
    return RetrievalTask(name=name, corpus=corpus, queries=queries, qrels=qrels, metric="ndcg@10",
                         length=None, meta=meta).validate()


def normalise(text: str) -> str:
    """The text as queries are compared with it: each line without its leading spaces and pydoc
    ``|`` gutter, whitespace runs made one space (``re.sub(r"(?m)^[ \\t|]+", "", text)``, split,
    joined)."""
    return " ".join(_LINE_GUTTER.sub("", text).split())


def _sharing_runs(texts: dict[str, str], training: str, n: int = SHARED_WORDS) -> list[str]:
    """The documents (in order) whose normalised, lower-cased text shares a run of ``n`` words with
    ``training`` (already normalised and lower-cased): every n-word window hashed, as numpy rows."""
    vocab: dict[str, int] = {}

    def windows(words: list[str]) -> np.ndarray:
        ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in words), dtype=np.uint64, count=len(words))
        if len(ids) < n:
            return np.zeros(0, dtype=np.uint64)
        h = np.zeros(len(ids) - n + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):  # a polynomial hash modulo 2**64
            for j in range(n):
                h = h * np.uint64(1_000_003) + ids[j:len(ids) - n + 1 + j]
        return h

    seen = windows(training.split())
    ids = list(texts)
    per_doc = [windows(normalise(texts[d]).lower().split()) for d in ids]
    owner = np.repeat(np.arange(len(ids)), [len(w) for w in per_doc])
    hit = np.isin(np.concatenate([np.zeros(0, dtype=np.uint64), *per_doc]), seen)  # one sort, not one per document
    return [ids[i] for i in np.unique(owner[hit])]


def _langref_topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise ValueError("deep/langref: this Python has no pydoc_data.topics (a stripped install); "
                         "use a full CPython or source='heldout'") from None
    return {name: text for name, text in topics.items() if text.strip()}


def cut_to_tokens(
    tokenizer: PreTrainedTokenizerBase, texts: dict[str, str], max_tokens: int
) -> tuple[dict[str, str], dict[str, list[int]]]:
    """Each text cut to at most ``max_tokens`` tokens at a whitespace boundary, and the start
    offsets of the cut text's tokens (re-tokenized, so they are what the model sees)."""
    corpus = dict(texts)
    starts: dict[str, list[int]] = {}
    todo = list(texts)
    for _ in range(8):  # a cut at whitespace keeps the prefix's tokens for common tokenizers: one round
        enc = tokenizer([corpus[d] for d in todo], add_special_tokens=False, return_offsets_mapping=True,
                        verbose=False)  # verbose: no "longer than the model maximum" warning
        again = []
        for doc_id, offsets in zip(todo, enc["offset_mapping"], strict=True):
            if len(offsets) <= max_tokens:
                starts[doc_id] = [start for start, _ in offsets]
                continue
            text = corpus[doc_id]
            first_out = offsets[max_tokens][0]  # the first token left out starts here
            cut = max(text.rfind(c, 0, first_out) for c in " \n\t")  # back to the whitespace before it
            corpus[doc_id] = text[:cut if cut > 0 else first_out].rstrip()  # one giant word: cut inside it
            again.append(doc_id)
        todo = again
        if not todo:
            return corpus, starts
    raise ValueError(f"could not cut {todo[0]!r} to {max_tokens} tokens at whitespace; "
                     "is the tokenizer's offset mapping broken?")


def _sentences(text: str, norm: str, token_starts: list[int]) -> list[_Sentence]:
    """The prose sentences of one document (rules in the module docstring), each once."""
    # Words of the normalised text with their offsets in ``text``: word k starts at norm_at[k] there.
    words: list[tuple[int, int]] = []  # (start, end) in text
    breaks: set[int] = set()  # word indices that start a paragraph
    pos = 0
    for line in text.split("\n"):
        body = _GUTTER.match(line).end()
        own = _OWN_LINE.match(line, body) is not None
        if own or not line[body:].strip():
            breaks.add(len(words))
        words.extend((pos + m.start(), pos + m.end()) for m in _WORDS.finditer(line, body))
        if own:
            breaks.add(len(words))
        pos += len(line) + 1
    norm_at = []
    at = 0
    for start, end in words:
        norm_at.append(at)
        at += end - start + 1
    if at - 1 != len(norm):  # the words here must be those normalise() joins, or depths would be off
        raise RuntimeError("deep: words and normalise() disagree; a whitespace rule changed in one only")
    lowered = norm.lower()
    found: dict[str, _Sentence] = {}
    first = 0
    for k, (_, end) in enumerate(words):
        if k in breaks:
            first = k
        if text[end - 1] not in ".!?":
            continue  # a paragraph break before the sentence ends drops it (first moves on)
        sentence = " ".join(text[s:e] for s, e in words[first:k + 1])
        n_words, first = k + 1 - first, k + 1
        if not MIN_WORDS <= n_words <= MAX_WORDS or not _is_prose(sentence) or sentence.lower() in found:
            continue
        # depth of the first occurrence (possibly inside an earlier, longer sentence)
        p = lowered.find(sentence.lower())
        w = bisect.bisect_right(norm_at, p) - 1
        origin = words[w][0] + (p - norm_at[w])
        found[sentence.lower()] = _Sentence(sentence, bisect.bisect_left(token_starts, origin))
    return list(found.values())


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    if not words[0][0].isupper() or words[-1].lower().endswith(_ABBREVIATIONS):
        return False
    if any(bad in sentence for bad in _NOT_PROSE) or _CALL_WITH_ARGS.search(sentence):
        return False
    if sentence.count("(") > 1 or sentence.count("(") != sentence.count(")"):
        return False
    alpha = sum(bool(_ALPHA_WORD.fullmatch(w.strip(_PUNCT))) for w in words)
    return alpha >= MIN_ALPHA * len(words)
