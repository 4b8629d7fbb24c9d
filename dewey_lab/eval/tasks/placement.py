"""Documents of an exact token length: a source text with one sentence inserted at a chosen depth.

The machinery behind the synthetic tasks (``synthetic.py``: passkey and needle say what is inserted where;
this module makes each document exactly as long as asked). Lengths are counted in the evaluated model's
tokens, special tokens included: every document tokenizes to between ``length - 8`` and ``length`` tokens
(exactly ``length`` for WordPiece). The source text is tokenized once, with character offsets; insertions go
at word junctions (one space between two words, preferably after a sentence end) and documents end at a token
boundary. Counts are then checked by re-tokenizing a short window around the insertion and one at the end,
each measured against the same span of unchanged source. That is exact for tokenizers that treat the two
sides of a single space independently (checked for WordPiece, byte-level BPE with and without trimmed offsets,
and SentencePiece-style Unigram). Whole documents are also tokenized, as many as ~1M characters allow (all of
them up to ~4k tokens), and if any disagrees every document is re-counted in full. Tokenizing all 100 whole
documents at 131072 tokens would take ~30 s on 2 CPUs (all-MiniLM-L6-v2); this way it takes ~1-2 s.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SLACK = 8  # a document may come out this many tokens short of its length, never longer
_SNAP_WINDOW = 32  # at most this many tokens an insertion moves to reach a sentence boundary
_CONTEXT = 16  # tokens of unchanged source kept on each side of a join when counting locally
_MAX_ROUNDS = 8
_FULL_CHECK_CHARS = 1_000_000  # characters of whole documents tokenized per length as a check (~0.6 s)
_WS_CODES = np.array([c for c in range(0x3001) if chr(c).isspace()], dtype=np.uint32)
_SENTENCE_ENDS = np.array([ord(c) for c in ".!?"], dtype=np.uint32)


def token_counts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], special: bool = False) -> list[int]:
    """Tokens of each text (special tokens counted when ``special``), one batched call."""
    if not texts:
        return []
    enc = tokenizer(list(texts), add_special_tokens=special, return_attention_mask=False,
                    return_token_type_ids=False, verbose=False)
    return [len(ids) for ids in enc["input_ids"]]


# ---------------------------------------------------------------------------------------------
# the tokenized source text


@dataclass(frozen=True, eq=False)
class Source:
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
def tokenize_source(tokenizer: PreTrainedTokenizerBase, text: str) -> Source:
    """``text`` tokenized once (cached: nearby lengths share a source), with its word and sentence junctions."""
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
    return Source(text, starts, ends, np.flatnonzero(words), np.flatnonzero(sentences))


def whitespace_cut(text: str, n_chars: int) -> int:
    """A prefix length of at most ``n_chars`` that ends at whitespace (``n_chars`` when there is none)."""
    # a prefix cut inside a word would tokenize its last word differently from the full text
    if n_chars >= len(text):
        return len(text)
    cut = max(text.rfind(" ", 0, n_chars), text.rfind("\n", 0, n_chars))
    return cut if cut > 0 else n_chars


# ---------------------------------------------------------------------------------------------
# placing insertions and fitting lengths


def place(
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    inserts: list[str],
    depths: list[float],
    source_for: Callable[[int], Source],
) -> list[str]:
    """Documents of ``length`` tokens: source tokens [0, p) + insert + source tokens [p, q)."""
    specials = tokenizer.num_special_tokens_to_add()
    budgets = [length - specials - n for n in token_counts(tokenizer, inserts)]
    src = source_for(max(budgets))
    ps = [_snap(src, round(depth * budget), budget) for depth, budget in zip(depths, budgets, strict=True)]
    qs = list(budgets)

    def local(idx: list[int]) -> list[int]:
        return _count_local(tokenizer, src, specials, idx, inserts, ps, qs)

    def full(idx: list[int]) -> list[int]:
        return token_counts(tokenizer, [_render(src, inserts[i], ps[i], qs[i]) for i in idx], special=True)

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


def _snap(src: Source, target: int, budget: int) -> int:
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


def _render(src: Source, insert: str, p: int, q: int, start: int = 0) -> str:
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
    src: Source,
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
    counts = iter(token_counts(tokenizer, windows))
    out = []
    for a, b, c, f in plans:
        # tokens of a changed window = its count - the unchanged span's count + the span's true length
        total = specials + a + next(counts) - next(counts) + (b - a)
        if c is not None:
            total += (c - b) + next(counts) - next(counts) + (f - c)
        out.append(total)
    return out


def _fit(src: Source, ps: list[int], qs: list[int], length: int, count: Callable[[list[int]], list[int]]) -> None:
    """Move each document's end q (in place) until it counts ``length - SLACK`` .. ``length`` tokens."""
    todo = list(range(len(ps)))
    for _ in range(_MAX_ROUNDS):
        if not todo:
            return
        retry = []
        for i, n in zip(todo, count(todo), strict=True):
            delta = length - n
            if 0 <= delta <= SLACK:
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
        raise RuntimeError(f"could not fit {len(todo)} documents to {length - SLACK}..{length} tokens in "
                           f"{_MAX_ROUNDS} rounds; this tokenizer's counts do not settle")
