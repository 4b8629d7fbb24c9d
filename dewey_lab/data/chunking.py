"""Text -> chunk character spans, as in the Dewey report (pure Python, no torch).

Per document, a RNG seeded by (seed, text) draws:

* the splitter: langchain's ``RecursiveCharacterTextSplitter`` with probability ``recursive_prob``
  (0.7 in the paper), else a split by words (0.3);
* ``chunk_size ~ U[min_size, max_size]`` (paper: U[64, 500]);
* ``chunk_overlap ~ U[min_overlap, max_overlap] * chunk_size`` (paper: U[0.3, 0.6]).

The paper does not state the unit of the size. We default to characters, langchain's own
``length_function`` (``unit: chars``); ``unit: words`` measures both splitters in words. Because
the RNG is seeded by the text itself, the same document and seed give the same chunks on every
rank, every resume and every ablation, and the teacher cache sees exactly what training sees.

Spans are half-open ``(start, end)`` character offsets into the text; ``text[start:end]`` is the
chunk, never starting or ending with whitespace.
"""

from __future__ import annotations

import hashlib
import random
import re
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from typing import Literal

Span = tuple[int, int]
_WORD = re.compile(r"\S+")


class Chunker:
    """Random-size chunking of one document into overlapping character spans."""

    def __init__(
        self,
        min_size: int = 64,
        max_size: int = 500,
        min_overlap: float = 0.3,
        max_overlap: float = 0.6,
        recursive_prob: float = 0.7,
        unit: Literal["chars", "words"] = "chars",
        seed: int = 0,
    ) -> None:
        """
        Args:
            min_size: smallest chunk size (in ``unit``); set ``min_size == max_size`` for fixed chunks.
            max_size: largest chunk size (in ``unit``).
            min_overlap: smallest overlap as a fraction of the drawn chunk size.
            max_overlap: largest overlap as a fraction of the drawn chunk size (must be < 1).
            recursive_prob: probability of the recursive character splitter; else split by words.
            unit: what a size counts: ``chars`` (langchain's default) or ``words``.
            seed: mixed with the text to seed the per-document RNG.
        """
        if not 0 < min_size <= max_size:
            raise ValueError(f"chunker sizes must satisfy 0 < min_size <= max_size, got {min_size}, {max_size}")
        if not 0 <= min_overlap <= max_overlap < 1:
            raise ValueError(
                f"chunker overlaps must satisfy 0 <= min_overlap <= max_overlap < 1, got {min_overlap}, {max_overlap}"
            )
        if not 0 <= recursive_prob <= 1:
            raise ValueError(f"chunker recursive_prob must be in [0, 1], got {recursive_prob}")
        if unit not in ("chars", "words"):
            raise ValueError(f"chunker unit must be 'chars' or 'words', got {unit!r}")
        self.min_size, self.max_size = min_size, max_size
        self.min_overlap, self.max_overlap = min_overlap, max_overlap
        self.recursive_prob, self.unit, self.seed = recursive_prob, unit, seed

    def draw(self, text: str) -> tuple[str, int, int]:
        """The (splitter, size, overlap) this document gets; a pure function of (seed, text)."""
        digest = hashlib.sha256(f"{self.seed}\x00{text}".encode("utf-8", "surrogatepass")).digest()
        rng = random.Random(int.from_bytes(digest[:8], "little"))
        splitter = "recursive" if rng.random() < self.recursive_prob else "words"
        size = rng.randint(self.min_size, self.max_size)
        overlap = min(size - 1, int(rng.uniform(self.min_overlap, self.max_overlap) * size))
        return splitter, size, overlap

    def __call__(self, text: str) -> list[Span]:
        """Chunk character spans of ``text``; one span for a text shorter than a chunk, none if blank."""
        if not text.strip():
            return []
        splitter, size, overlap = self.draw(text)
        if splitter == "recursive":
            return recursive_spans(text, size, overlap, self.unit)
        return word_spans(text, size, overlap, self.unit)


def _length_function(unit: str):
    return len if unit == "chars" else (lambda s: len(s.split()))


def recursive_spans(text: str, size: int, overlap: int, unit: str = "chars") -> list[Span]:
    """Spans of langchain's RecursiveCharacterTextSplitter chunks.

    We locate each chunk ourselves: langchain's own ``start_index`` subtracts the overlap from a
    character offset, wrong whenever ``length_function`` is not ``len``. Chunks come in text
    order, so each is searched after the previous one's start; a repeated fragment that langchain
    re-emits out of order (e.g. a lone "|" of a table border) falls back to its first occurrence,
    which has the same text and so the same teacher target.
    """
    from langchain_text_splitters import RecursiveCharacterTextSplitter  # lazy: bench-gpu runs without it

    splitter = RecursiveCharacterTextSplitter(chunk_size=size, chunk_overlap=overlap,
                                              length_function=_length_function(unit))
    spans, prev = [], -1
    for chunk in splitter.split_text(text):
        start = text.find(chunk, prev + 1)
        if start < 0:
            start = text.find(chunk)
            if start < 0:
                raise RuntimeError("langchain returned a chunk that is not a substring of its text")
        else:
            prev = start
        spans.append((start, start + len(chunk)))
    return spans


def word_spans(text: str, size: int, overlap: int, unit: str = "chars") -> list[Span]:
    """Greedy split by words: whole words packed up to ``size``, the next chunk re-using up to
    ``overlap`` of the previous chunk's tail (always advancing by at least one word)."""
    words = [m.span() for m in _WORD.finditer(text)]
    if not words:
        return []

    def length(i: int, j: int) -> int:  # length of words[i..j] inclusive, in the chunker's unit
        return words[j][1] - words[i][0] if unit == "chars" else j - i + 1

    spans, i, n = [], 0, len(words)
    while i < n:
        j = i
        while j + 1 < n and length(i, j + 1) <= size:
            j += 1
        spans.append((words[i][0], words[j][1]))
        if j == n - 1:
            break
        k = j + 1  # next start: step back from j+1 while the shared tail stays within the overlap
        while k - 1 > i and length(k - 1, j) <= overlap:
            k -= 1
        i = k
    return spans


def char_spans_to_token_spans(
    offsets: Sequence[tuple[int, int]], content_mask: Sequence[bool], spans: Sequence[Span]
) -> list[Span | None]:
    """Map character spans to half-open token spans through a tokenizer's offset mapping.

    A token belongs to a chunk when its characters overlap the chunk's characters. Tokens with
    ``content_mask`` False (CLS, SEP, prompt, padding) never belong to a chunk. Offsets of content
    tokens must be non-decreasing (true for fast tokenizers on one text). A span whose characters
    were all truncated away maps to ``None``.
    """
    content = [t for t, keep in enumerate(content_mask) if keep]
    starts = [offsets[t][0] for t in content]
    ends = [offsets[t][1] for t in content]
    out: list[Span | None] = []
    for cs, ce in spans:
        # first content token ending after cs, last content token starting before ce
        lo = bisect_right(ends, cs)
        hi = bisect_left(starts, ce) - 1
        out.append((content[lo], content[hi] + 1) if lo <= hi else None)
    return out
