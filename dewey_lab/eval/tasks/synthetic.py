"""LongEmbed's synthetic tasks, passkey and needle, generated locally at any length.

The format follows LongEmbed (arXiv 2404.12096). Each length gets 100 candidate documents
shared by 50 queries, each query with exactly one relevant document; the score is Acc@1 (nDCG@1).

- passkey: the filler "The grass is green. ..." repeated, with the sentence "<Name>'s pass key
  is <N>. Remember it. <N> is the pass key for <Name>." at a random depth; the query is
  "What is the pass key for <Name>?".
- needle: one of the 100 facts in :mod:`dewey_lab.eval.tasks.needles` at a random depth of a long text
  (by default the evaluation-only text of :mod:`dewey_lab.eval.tasks.heldout`, which no training
  corpus holds, instead of the paper's Paul Graham essays); the query is the fact's question.

Documents are exactly as long as asked, in the evaluated model's tokens (between ``length - 8`` and
``length``, special tokens included): ``placement.py`` places the sentence and fits the length; this module
says what is inserted, into which text, and builds the task.
"""

from __future__ import annotations

import functools
import hashlib
import math
import operator
import random
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from dewey_lab.eval.tasks.heldout import default_haystack, is_default_haystack, package_versions
from dewey_lab.eval.tasks.needles import NEEDLES
from dewey_lab.eval.tasks.placement import Source, place, token_counts, tokenize_source, whitespace_cut
from dewey_lab.eval.tasks.task import RetrievalTask

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

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
        longest = max(token_counts(tokenizer, [passkey_sentence(n, probe) for n in PASSKEY_NAMES]))
        # a 5-digit key is at most 5 tokens (one per digit), and it appears twice
        longest += 2 * (5 - token_counts(tokenizer, [str(probe)])[0])
    else:
        longest = max(token_counts(tokenizer, [fact for fact, _ in NEEDLES]))
    return tokenizer.num_special_tokens_to_add() + longest + MIN_FILLER_TOKENS


def _rng(kind: str, length: int, seed: int) -> random.Random:
    # sha256, not hash(): str hashes are salted per process, and the tasks must be reproducible
    digest = hashlib.sha256(f"{kind}:{length}:{seed}".encode()).digest()
    return random.Random(int.from_bytes(digest, "big"))


# ---------------------------------------------------------------------------------------------
# source texts and assembly


def _passkey_source(tokenizer: PreTrainedTokenizerBase, n_tokens: int) -> Source:
    per_copy = max(1, token_counts(tokenizer, [PASSKEY_FILLER])[0])
    # powers of two (at least ~24k tokens) so that nearby lengths share one cached tokenization
    copies = max(1024, 1 << math.ceil(math.log2(n_tokens / per_copy + 2)))
    while True:
        src = tokenize_source(tokenizer, " ".join([PASSKEY_FILLER] * copies))
        if src.n >= n_tokens:
            return src
        copies *= 2


def _haystack_source(tokenizer: PreTrainedTokenizerBase, haystack: str, n_tokens: int, length: int) -> Source:
    # Tokenize only a prefix (cut at whitespace) big enough for the budget, not a 4 MB haystack
    # for 256-token documents; ~4.5 characters per token, rounded up to a power of two.
    n_chars = max(1 << 16, 1 << math.ceil(math.log2(n_tokens * 4.5)))
    while True:
        cut = whitespace_cut(haystack, n_chars)
        src = tokenize_source(tokenizer, haystack[:cut])
        if src.n >= n_tokens:
            return src
        if cut >= len(haystack):
            raise ValueError(f"needle: length {length} needs {n_tokens} haystack tokens but the haystack has "
                             f"only {src.n}; pass a longer haystack= (or lower the length)")
        n_chars *= 2


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
    source_for: Callable[[int], Source],
    extra_meta: dict | None = None,
) -> RetrievalTask:
    # drawn after the names/keys/facts from the same stream, so one seed string fixes the whole task
    depths = [rng.random() for _ in inserts]
    targets = sorted(rng.sample(range(len(inserts)), n_queries))
    docs = place(tokenizer, length, inserts, depths, source_for)
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


