"""LongEmbed's synthetic tasks, passkey and needle, generated locally at any length.

The format follows LongEmbed (arXiv 2404.12096). Each length gets 100 candidate documents
shared by 50 queries, each query with exactly one relevant document; the score is Acc@1 (nDCG@1).

- passkey: the filler "The grass is green. ..." repeated, with the sentence "<Name>'s pass key
  is <N>. Remember it. <N> is the pass key for <Name>." at a random depth; the query is
  "What is the pass key for <Name>?".
- needle: one of the 100 facts in :mod:`dewey_lab.eval.tasks.needles` at a random depth of a long text
  (by default the evaluation-only text of :mod:`dewey_lab.eval.tasks.heldout`, which no training
  corpus holds, instead of the paper's Paul Graham essays); the query is the fact's question.

Lengths are counted in the evaluated model's tokens, special tokens included: every document
tokenizes to between ``length - 8`` and ``length`` tokens (exactly ``length`` for WordPiece).
The source text is tokenized once, with character offsets; insertions go at word junctions
(one space between two words, preferably after a sentence end) and documents end at a token
boundary. Counts are then checked by re-tokenizing a short window around the insertion and one
at the end, each measured against the same span of unchanged source. That is exact for
tokenizers that treat the two sides of a single space independently (checked for WordPiece,
byte-level BPE with and without trimmed offsets, and SentencePiece-style Unigram). Whole
documents are also tokenized, as many as ~1M characters allow (all of them up to ~4k tokens),
and if any disagrees every document is re-counted in full. Tokenizing all 100 whole documents
at 131072 tokens would take ~30 s on 2 CPUs (all-MiniLM-L6-v2); this way it takes ~1-2 s.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import operator
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dewey_lab.eval.tasks.heldout import default_haystack, is_default_haystack, package_versions
from dewey_lab.eval.tasks.needles import NEEDLES
from dewey_lab.eval.tasks.task import RetrievalTask

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KINDS = ("passkey", "needle")

# No first name ends another and no last name starts another, so no "First Last" is a substring
# of a different one: a name in a query matches exactly one document.
FIRST_NAMES = (
    "Alice", "Bruno", "Camila", "Dmitri", "Elena", "Farid", "Greta", "Hiroshi", "Ingrid", "Jamal",
    "Keiko", "Luca", "Mariana", "Nikolai", "Olivia", "Pedro", "Quentin", "Rosalind", "Sanjay", "Tamsin",
    "Umar", "Valentina", "Wendell", "Ximena", "Yusuf", "Zora", "Beatrix", "Cedric", "Delphine", "Emeka",
)
LAST_NAMES = (
    "Abernathy", "Brennan", "Castellanos", "Dubois", "Eriksen", "Fitzgerald", "Gallagher", "Haddad",
    "Iwasaki", "Jovanovic", "Kowalski", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Petrov", "Quiroga",
    "Rasmussen", "Silva", "Takahashi", "Underwood", "Villanueva", "Whitaker", "Xiang", "Yamamoto",
    "Zimmermann", "Achterberg", "Beaumont", "Carvalho", "Delacroix",
)
PASSKEY_NAMES = tuple(f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES)

MIN_FILLER_TOKENS = 16  # a document must keep at least this much filler around its insertion
_SLACK = 8  # a document may come out this many tokens short of its length, never longer
_SNAP_WINDOW = 32  # at most this many tokens an insertion moves to reach a sentence boundary
_CONTEXT = 16  # tokens of unchanged source kept on each side of a join when counting locally
_MAX_ROUNDS = 8
_FULL_CHECK_CHARS = 1_000_000  # characters of whole documents tokenized per length as a check (~0.6 s)
_WS_CODES = np.array([c for c in range(0x3001) if chr(c).isspace()], dtype=np.uint32)
_SENTENCE_ENDS = np.array([ord(c) for c in ".!?"], dtype=np.uint32)


def passkey_sentence(name: str, key: int) -> str:
    """The passkey sentence inserted into a document, in LongEmbed's wording."""
    return f"{name}'s pass key is {key}. Remember it. {key} is the pass key for {name}."


def passkey_query(name: str) -> str:
    """The passkey query for ``name``, in LongEmbed's wording."""
    return f"What is the pass key for {name}?"


# ---------------------------------------------------------------------------------------------
# public API


def make_passkey(
    tokenizer: PreTrainedTokenizerBase, length: int, n_queries: int = 50, n_docs: int = 100, seed: int = 0
) -> RetrievalTask:
    """Personalized passkey retrieval at one length.

    Args:
        tokenizer: The evaluated model's (fast) tokenizer; lengths are counted in its tokens.
        length: Target document length in tokens, special tokens included.
        n_queries: Queries, each about a different document (a seeded sample of the documents).
        n_docs: Candidate documents, each with its own person name and 5-digit key.
        seed: Seed; with ``length`` it fixes names, keys, depths and which documents get queries.

    Returns:
        A validated ``RetrievalTask`` named ``passkey`` with metric ``ndcg@1``.
    """
    length = _check_args("passkey", length, n_queries, n_docs, len(PASSKEY_NAMES), "passkey names")
    _check_min_length("passkey", tokenizer, length)
    rng = _rng("passkey", length, seed)
    names = rng.sample(PASSKEY_NAMES, n_docs)
    keys = rng.sample(range(10000, 100000), n_docs)  # distinct within a length
    inserts = [passkey_sentence(name, key) for name, key in zip(names, keys, strict=True)]
    questions = [passkey_query(name) for name in names]
    return _assemble(
        "passkey", tokenizer, length, inserts, questions, n_queries, rng, seed, "filler",
        lambda n_tokens: _passkey_source(tokenizer, n_tokens),
    )


def make_needle(
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    haystack: str | None = None,
    n_queries: int = 50,
    n_docs: int = 100,
    seed: int = 0,
) -> RetrievalTask:
    """Needle retrieval at one length: a fact hidden at a random depth of a long text.

    Every document is a prefix of ``haystack`` (from its first character) with one of the
    facts of ``NEEDLES`` inserted, so documents differ only by their needle and where it sits.

    Args:
        tokenizer: The evaluated model's (fast) tokenizer; lengths are counted in its tokens.
        length: Target document length in tokens, special tokens included.
        haystack: The text to hide facts in; ``None`` means ``heldout.default_haystack()`` (the
            evaluation-only text; ``meta["packages"]`` records their versions).
        n_queries: Queries, each the question of a different document's fact.
        n_docs: Candidate documents, each with a different fact (at most ``len(NEEDLES)``).
        seed: Seed; with ``length`` it fixes facts, depths and which documents get queries.

    Returns:
        A validated ``RetrievalTask`` named ``needle`` with metric ``ndcg@1``.
    """
    length = _check_args("needle", length, n_queries, n_docs, len(NEEDLES), "needles in NEEDLES")
    _check_min_length("needle", tokenizer, length)
    text = default_haystack() if haystack is None else haystack
    if not text.strip():
        raise ValueError("needle: the haystack is empty; pass a long text as haystack= or use the default")
    rng = _rng("needle", length, seed)
    picked = rng.sample(NEEDLES, n_docs)
    default = is_default_haystack(haystack)
    return _assemble(
        "needle", tokenizer, length, [fact for fact, _ in picked], [question for _, question in picked],
        n_queries, rng, seed, "heldout" if default else "custom",
        lambda n_tokens: _haystack_source(tokenizer, text, n_tokens, length),
        {"packages": package_versions()} if default else {},
    )


def make_synthetic(
    kind: str,
    tokenizer: PreTrainedTokenizerBase,
    lengths: int | Iterable[int],
    n_queries: int = 50,
    n_docs: int = 100,
    seed: int = 0,
    haystack: str | None = None,
) -> list[RetrievalTask]:
    """One passkey or needle task per length.

    Args:
        kind: ``passkey`` or ``needle``.
        tokenizer: The evaluated model's (fast) tokenizer.
        lengths: Target lengths in tokens (LongEmbed: 256, 512, ..., 32768); one int is allowed.
        n_queries: Queries per length.
        n_docs: Candidate documents per length.
        seed: Seed shared by all lengths (each length still draws differently).
        haystack: Needle haystack (``None``: the evaluation-only default); ignored for passkey.

    Returns:
        The tasks, in the order of ``lengths``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic task {kind!r}; use one of {', '.join(KINDS)}")
    lengths = list(lengths) if isinstance(lengths, Iterable) else [lengths]
    if kind == "passkey":
        return [make_passkey(tokenizer, n, n_queries, n_docs, seed) for n in lengths]
    return [make_needle(tokenizer, n, haystack, n_queries, n_docs, seed) for n in lengths]


# ---------------------------------------------------------------------------------------------
# checks and seeding


def _check_args(kind: str, length: int, n_queries: int, n_docs: int, available: int, what: str) -> int:
    # operator.index accepts numpy ints (lengths often come from arrays) but not floats like 4e3
    try:
        length = operator.index(length)
    except TypeError:
        raise ValueError(f"{kind}: length must be an int number of tokens, got {length!r}") from None
    if n_docs < 1 or n_queries < 1:
        raise ValueError(f"{kind}: n_docs and n_queries must be >= 1, got {n_docs} and {n_queries}")
    if n_queries > n_docs:
        raise ValueError(f"{kind}: n_queries={n_queries} > n_docs={n_docs}; each query needs its own "
                         "document, so lower n_queries or raise n_docs")
    if n_docs > available:
        raise ValueError(f"{kind}: n_docs={n_docs} but there are only {available} {what}; "
                         f"use n_docs <= {available}")
    return length


def _check_min_length(kind: str, tokenizer: PreTrainedTokenizerBase, length: int) -> None:
    smallest = _min_length(tokenizer, kind)
    if length < smallest:
        raise ValueError(f"{kind}: length {length} cannot hold the inserted sentence, the special tokens "
                         f"and {MIN_FILLER_TOKENS} filler tokens for this tokenizer; use length >= {smallest}")


@functools.lru_cache(maxsize=16)
def _min_length(tokenizer: PreTrainedTokenizerBase, kind: str) -> int:
    # Bound over every sentence a draw could insert, so the answer does not depend on seed or length.
    if kind == "passkey":
        probe = 10000
        longest = max(_token_counts(tokenizer, [passkey_sentence(n, probe) for n in PASSKEY_NAMES]))
        # a 5-digit key is at most 5 tokens (one per digit), and it appears twice
        longest += 2 * (5 - _token_counts(tokenizer, [str(probe)])[0])
    else:
        longest = max(_token_counts(tokenizer, [fact for fact, _ in NEEDLES]))
    return tokenizer.num_special_tokens_to_add() + longest + MIN_FILLER_TOKENS


def _rng(kind: str, length: int, seed: int) -> random.Random:
    # sha256, not hash(): str hashes are salted per process, and the tasks must be reproducible
    digest = hashlib.sha256(f"{kind}:{length}:{seed}".encode()).digest()
    return random.Random(int.from_bytes(digest, "big"))


def _token_counts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], special: bool = False) -> list[int]:
    if not texts:
        return []
    enc = tokenizer(list(texts), add_special_tokens=special, return_attention_mask=False,
                    return_token_type_ids=False, verbose=False)
    return [len(ids) for ids in enc["input_ids"]]


# ---------------------------------------------------------------------------------------------
# the tokenized source text


@dataclass(frozen=True, eq=False)
class _Source:
    """A text tokenized once, with each token's character span and where cuts are safe."""

    text: str
    starts: np.ndarray  # token k covers text[starts[k]:ends[k]]
    ends: np.ndarray
    words: np.ndarray  # sorted k in [0, n] where a cut before token k falls on a word junction
    sentences: np.ndarray  # the subset of `words` right after a sentence end

    @property
    def n(self) -> int:
        return len(self.starts)

    def cut(self, k: int) -> int:
        """Character offset where token k starts (the text's end for k == n)."""
        return int(self.starts[k]) if k < self.n else len(self.text)

    def after(self, k: int) -> int:
        """Character offset just after token k - 1 (0 for k == 0)."""
        return int(self.ends[k - 1]) if k > 0 else 0

    def span(self, a: int, e: int) -> str:
        """Text of source tokens [a, e) with the whitespace before token a."""
        return self.text[self.after(a):int(self.ends[e - 1])] if e > a else ""

    def floor_word(self, k: int) -> int:
        return int(self.words[np.searchsorted(self.words, max(k, 0), side="right") - 1])

    def ceil_word(self, k: int) -> int:
        i = int(np.searchsorted(self.words, k, side="left"))
        return int(self.words[i]) if i < len(self.words) else self.n


@functools.lru_cache(maxsize=8)
def _tokenize_source(tokenizer: PreTrainedTokenizerBase, text: str) -> _Source:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                    return_attention_mask=False, return_token_type_ids=False, verbose=False)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    starts, ends = offsets[:, 0].copy(), offsets[:, 1].copy()
    n = len(starts)
    words, sentences = np.ones(n + 1, dtype=bool), np.ones(n + 1, dtype=bool)
    if n > 1:
        # utf-32 gives one code point per str index, the unit the fast tokenizer's offsets count in
        cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        last = len(cp) - 1
        x = ends[:-1]  # where token k - 1 ends, for k = 1 .. n - 1
        # Only a single space between two non-space characters counts as a word junction: there
        # WordPiece, byte-level BPE (space inside the next token or trimmed off it) and
        # SentencePiece all tokenize the two sides independently, which the length fitting
        # relies on. Whitespace runs and line breaks tokenize differently from tokenizer to tokenizer.
        junction = (
            (x >= 1)
            & (cp[np.clip(x, 0, last)] == ord(" "))
            & ~np.isin(cp[np.clip(x - 1, 0, last)], _WS_CODES)
            & ~np.isin(cp[np.clip(x + 1, 0, last)], _WS_CODES)
            & ((starts[1:] == x) | (starts[1:] == x + 1))
        )
        words[1:n] = junction
        sentences[1:n] = junction & np.isin(cp[np.clip(x - 1, 0, last)], _SENTENCE_ENDS)
    return _Source(text, starts, ends, np.flatnonzero(words), np.flatnonzero(sentences))


def _passkey_source(tokenizer: PreTrainedTokenizerBase, n_tokens: int) -> _Source:
    per_copy = max(1, _token_counts(tokenizer, [PASSKEY_FILLER])[0])
    # powers of two (at least ~24k tokens) so that nearby lengths share one cached tokenization
    copies = max(1024, 1 << math.ceil(math.log2(n_tokens / per_copy + 2)))
    while True:
        src = _tokenize_source(tokenizer, " ".join([PASSKEY_FILLER] * copies))
        if src.n >= n_tokens:
            return src
        copies *= 2


def _haystack_source(tokenizer: PreTrainedTokenizerBase, haystack: str, n_tokens: int, length: int) -> _Source:
    # Tokenize only a prefix (cut at whitespace) big enough for the budget, not a 4 MB haystack
    # for 256-token documents; ~4.5 characters per token, rounded up to a power of two.
    n_chars = max(1 << 16, 1 << math.ceil(math.log2(n_tokens * 4.5)))
    while True:
        cut = _whitespace_cut(haystack, n_chars)
        src = _tokenize_source(tokenizer, haystack[:cut])
        if src.n >= n_tokens:
            return src
        if cut >= len(haystack):
            raise ValueError(f"needle: length {length} needs {n_tokens} haystack tokens but the haystack has "
                             f"only {src.n}; pass a longer haystack= (or lower the length)")
        n_chars *= 2


def _whitespace_cut(text: str, n_chars: int) -> int:
    # a prefix cut inside a word would tokenize its last word differently from the full text
    if n_chars >= len(text):
        return len(text)
    cut = max(text.rfind(" ", 0, n_chars), text.rfind("\n", 0, n_chars))
    return cut if cut > 0 else n_chars


# ---------------------------------------------------------------------------------------------
# placing insertions and fitting lengths


def _assemble(
    kind: str,
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    inserts: list[str],
    questions: list[str],
    n_queries: int,
    rng: random.Random,
    seed: int,
    haystack_label: str,
    source_for: Callable[[int], _Source],
    extra_meta: dict | None = None,
) -> RetrievalTask:
    # drawn after the names/keys/facts from the same stream, so one seed string fixes the whole task
    depths = [rng.random() for _ in inserts]
    targets = sorted(rng.sample(range(len(inserts)), n_queries))
    docs = _place(tokenizer, length, inserts, depths, source_for)
    prefix = f"{kind}-{length}"
    return RetrievalTask(
        name=kind,
        corpus={f"{prefix}-d{i:03d}": doc for i, doc in enumerate(docs)},
        queries={f"{prefix}-q{i:03d}": questions[i] for i in targets},
        qrels={f"{prefix}-q{i:03d}": {f"{prefix}-d{i:03d}": 1} for i in targets},
        metric="ndcg@1",
        length=length,
        meta={"source": "generated", "seed": seed, "haystack": haystack_label, **(extra_meta or {})},
    ).validate()


def _place(
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    inserts: list[str],
    depths: list[float],
    source_for: Callable[[int], _Source],
) -> list[str]:
    """Documents of ``length`` tokens: source tokens [0, p) + insert + source tokens [p, q)."""
    specials = tokenizer.num_special_tokens_to_add()
    budgets = [length - specials - n for n in _token_counts(tokenizer, inserts)]
    src = source_for(max(budgets))
    ps = [_snap(src, round(depth * budget), budget) for depth, budget in zip(depths, budgets, strict=True)]
    qs = list(budgets)

    def local(idx: list[int]) -> list[int]:
        return _count_local(tokenizer, src, specials, idx, inserts, ps, qs)

    def full(idx: list[int]) -> list[int]:
        return _token_counts(tokenizer, [_render(src, inserts[i], ps[i], qs[i]) for i in idx], special=True)

    _fit(src, ps, qs, length, local)
    # The local count assumes tokenization does not reach across word junctions. Check it on as
    # many whole documents as ~1M characters allow (all of them up to ~4k tokens, always the
    # shallowest and the deepest insertion), and count everything in full if it fails.
    doc_chars = src.after(max(qs)) + max(map(len, inserts))
    n_probe = min(len(ps), max(2, _FULL_CHECK_CHARS // doc_chars))
    by_depth = np.argsort(ps, kind="stable")
    probe = sorted({int(by_depth[j]) for j in np.linspace(0, len(ps) - 1, n_probe).round().astype(int)})
    if full(probe) != local(probe):
        log.warning("%d-token documents: local token counts disagree with full ones for this tokenizer; "
                    "re-counting every document in full (slower)", length)
        _fit(src, ps, qs, length, full)
    return [_render(src, insert, p, q) for insert, p, q in zip(inserts, ps, qs, strict=True)]


def _snap(src: _Source, target: int, budget: int) -> int:
    """The sentence end nearest ``target`` within a small window, else the nearest word junction.

    Text without spaces between words (Chinese, long symbol runs) may have no junction near:
    then the insertion goes between two tokens at ``target`` itself.
    """
    window = min(_SNAP_WINDOW, max(2, budget // 16))
    k = _nearest(src.sentences, target, max(0, target - window), min(budget, target + window))
    if k is None:
        k = _nearest(src.words, target, max(0, target - 4 * window), min(budget, target + 4 * window))
    return target if k is None else k


def _nearest(index: np.ndarray, x: int, lo: int, hi: int) -> int | None:
    # index is sorted: the nearest entry is one of the two around x's insertion point
    i = int(np.searchsorted(index, x))
    best = None
    for j in (i - 1, i):
        if 0 <= j < len(index) and lo <= index[j] <= hi and (best is None or abs(index[j] - x) < abs(best - x)):
            best = int(index[j])
    return best


def _render(src: _Source, insert: str, p: int, q: int, start: int = 0) -> str:
    """Source tokens [start, p) + ``insert`` + source tokens [p, q), as text."""
    text = src.text
    head = text[src.after(start):src.after(p)] if p > start else ""
    tail = text[src.after(p) if p > 0 else src.cut(0):src.ends[q - 1]] if q > p else ""
    # at a word junction the tail already starts with the source's space; elsewhere add one
    if tail and not tail[0].isspace():
        tail = " " + tail
    return f"{head} {insert}{tail}" if head else insert + tail


def _count_local(
    tokenizer: PreTrainedTokenizerBase,
    src: _Source,
    specials: int,
    idx: list[int],
    inserts: list[str],
    ps: list[int],
    qs: list[int],
) -> list[int]:
    """Token counts of documents ``idx``, re-tokenizing only the join and the cut end.

    Tokens [0, a) and [b, c) of a document are the source's own (a, b and c are word boundaries
    away from any change); only a window around the insertion and one around the end are
    tokenized again. Each window is measured against the same span of unchanged source, so
    what a tokenizer does at a window's first characters (a prefix space, a whitespace run cut
    in two) cancels out instead of being counted.
    """
    windows, plans = [], []
    for i in idx:
        p, q = ps[i], qs[i]
        a, b = src.floor_word(p - _CONTEXT), src.ceil_word(p + _CONTEXT)
        f = src.ceil_word(q + _CONTEXT)  # where the unchanged span compared with the end stops
        if b >= q:  # the insertion is near the end: one window holds both changes
            windows += [_render(src, inserts[i], p, q, start=a), src.span(a, f)]
            plans.append((a, f, None, None))
        else:
            c = max(b, src.floor_word(q - _CONTEXT))
            windows += [_render(src, inserts[i], p, b, start=a), src.span(a, b), src.span(c, q), src.span(c, f)]
            plans.append((a, b, c, f))
    counts = iter(_token_counts(tokenizer, windows))
    out = []
    for a, b, c, f in plans:
        # tokens of a changed window = its count - the unchanged span's count + the span's true length
        total = specials + a + next(counts) - next(counts) + (b - a)
        if c is not None:
            total += (c - b) + next(counts) - next(counts) + (f - c)
        out.append(total)
    return out


def _fit(src: _Source, ps: list[int], qs: list[int], length: int, count: Callable[[list[int]], list[int]]) -> None:
    """Move each document's end q (in place) until it counts ``length - _SLACK`` .. ``length`` tokens."""
    todo = list(range(len(ps)))
    for _ in range(_MAX_ROUNDS):
        if not todo:
            return
        retry = []
        for i, n in zip(todo, count(todo), strict=True):
            delta = length - n
            if 0 <= delta <= _SLACK:
                continue
            # a join that tokenized longer (or shorter) than its parts: take tokens off (or add
            # them to) the end; if that would eat into the prefix, move the insertion earlier
            q = min(max(qs[i] + delta, 0), src.n)
            if q == qs[i]:
                raise ValueError(f"{length}-token documents need more source text than there is; "
                                 "pass a longer haystack=")
            if q < ps[i]:
                ps[i] = src.floor_word(q)
            qs[i] = q
            retry.append(i)
        todo = retry
    if todo:
        raise RuntimeError(f"could not fit {len(todo)} documents to {length - _SLACK}..{length} tokens in "
                           f"{_MAX_ROUNDS} rounds; this tokenizer's counts do not settle")
