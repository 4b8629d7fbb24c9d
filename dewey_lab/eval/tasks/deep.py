"""Deep sentence retrieval: real long documents no student trained on, each query a sentence from
deep inside its document (like a needle, but natural text that stays where it was written).

Two sources, both offline:

- ``pydoc`` (task ``deep/pydoc``): the held-out documents of the pydoc corpus the students train
  on (``data/pydoc_corpus.jsonl``), i.e. those with ``Windower.is_val`` true: ``_unit_hash(id) <
  val_fraction``. Read through ``PydocCorpus``, so the text is byte for byte what training reads.
- ``langref`` (task ``deep/langref``): the Python Language Reference topics that ship with every
  CPython (``pydoc_data.topics.topics``: 79 topics, ~465k characters on 3.11). The pydoc corpus's
  page for ``pydoc_data`` only names the ``topics`` module, so this text is not in it.

Rules:

- Every document is a candidate, cut to at most ``max_tokens`` tokens of the evaluated tokenizer
  (no special tokens) at a whitespace boundary, from a fast tokenizer's offsets.
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
  document of the task and nowhere in the training text (the other pydoc pages for ``pydoc``,
  every pydoc page for ``langref``: the two share a few str / dict docstrings), and its first
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
from typing import TYPE_CHECKING

from dewey_lab.data.pydoc import PydocCorpus
from dewey_lab.data.windows import _unit_hash
from dewey_lab.eval.tasks.task import RetrievalTask

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SOURCES = ("pydoc", "langref")
MIN_WORDS, MAX_WORDS = 8, 40
MIN_ALPHA = 0.8  # share of alphabetic words a prose sentence needs

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
    val_fraction: float = 0.08,
    corpus_path: str = "data/pydoc_corpus.jsonl",
) -> RetrievalTask:
    """Deep sentence retrieval over real long documents (rules in the module docstring).

    Measured with the all-MiniLM-L6-v2 tokenizer at the defaults on CPython 3.11.7 (~0.5 s and
    ~1 s on 2 busy CPUs): ``pydoc`` (val_fraction 0.08) has 21 documents (2 cut), 217 candidate
    sentences in 10 of them, 54 of which also occur in training pages (inherited docstrings), so
    163 usable; 50 queries at depths 1032 / 1738 / 7707 tokens (min / median / max).
    ``langref`` has 79 topics (4 cut), 643 candidates in 18 topics, 27 of them also in the pydoc
    corpus (str / dict docstrings), so 616 usable; 50 queries at depths 1027 / 1864 / 8049.

    Args:
        source: ``pydoc`` (the held-out pydoc pages) or ``langref`` (the Language Reference topics).
        tokenizer: The evaluated model's fast tokenizer; lengths and depths are in its tokens.
        n_queries: Queries wanted (fewer, with a warning, when not enough sentences qualify).
        max_tokens: Every document is cut to at most this many tokens (no special tokens).
        min_depth: A query sentence starts at least this many tokens into its document.
        seed: Seed; with ``source`` it fixes which sentences become queries.
        val_fraction: The training config's ``data.windows.val_fraction``: ``pydoc`` keeps the
            documents it holds out (``_unit_hash(id) < val_fraction``), the rest is training text.
        corpus_path: The pydoc corpus jsonl (``PydocCorpus`` builds it there, ~5 s, if missing);
            ``langref`` reads it too, to drop sentences that occur in it.

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
    pages = {doc.doc_id: doc.text for doc in PydocCorpus(cache_path=corpus_path).documents()}
    if source == "pydoc":
        if not 0 < val_fraction < 1:
            raise ValueError(f"{name}: val_fraction must be in (0, 1), got {val_fraction}")
        texts = {i: t for i, t in pages.items() if _unit_hash(i) < val_fraction}
        training = [t for i, t in pages.items() if i not in texts]
        if not texts:
            raise ValueError(f"{name}: no document of {corpus_path} is held out at val_fraction "
                             f"{val_fraction}; raise val_fraction")
        meta["val_fraction"] = val_fraction
    else:
        texts = _langref_topics()
        training = list(pages.values())  # every page: whatever val_fraction a student trained with
        meta["python"] = sys.version.split()[0]

    corpus, starts = _cut_all(tokenizer, texts, max_tokens)
    normalised = {doc_id: normalise(text) for doc_id, text in corpus.items()}
    lowered = {doc_id: text.lower() for doc_id, text in normalised.items()}
    seen_in_training = "\n".join(normalise(text) for text in training).lower()

    # Candidates per document, deep enough and unique in the task; the check against the (larger)
    # training text is done as they are drawn.
    blob = "\n".join(lowered.values())  # unique: the first and the last hit lie in the same document
    pools: dict[str, list[_Sentence]] = {}
    begin = 0
    for doc_id, text in corpus.items():
        end = begin + len(lowered[doc_id])
        pool = []
        for sent in _sentences(text, normalised[doc_id], starts[doc_id]):
            needle = sent.text.lower()
            unique = blob.find(needle) >= begin and blob.rfind(needle) + len(needle) <= end
            if sent.depth >= min_depth and unique:
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
                         f"{max_tokens}; lower min_depth" + (" or raise val_fraction" if source == "pydoc" else ""))
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


def _langref_topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise ValueError("deep/langref: this Python has no pydoc_data.topics (a stripped install); "
                         "use a full CPython or source='pydoc'") from None
    return {name: text for name, text in topics.items() if text.strip()}


def _cut_all(
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
