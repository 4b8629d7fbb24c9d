"""Training text that quotes evaluation text is dropped before anyone trains on it.

A package's pydoc page can carry another package's words: a re-exported function keeps its
docstring, a module copies a paragraph. ``PydocCorpus(packages=...)`` therefore drops, at build
time, every page that shares a ``SPAN``-token run (all-MiniLM-L6-v2 tokens, no special tokens)
with the evaluation-only text of ``EVAL_PACKAGES`` (``dewey_lab.eval.tasks.heldout``: the needle
haystack, ``deep/heldout``, ``semantic/...``). 50 tokens (about 35 words) is the length
``tests/test_heldout.py`` checks with its own hash (looser than GPT-3's 13-word n-gram rule).

Spans are compared by a 64-bit hash: each window's token ids dotted with fixed random 64-bit
coefficients, wrapping (a collision needs two different windows to agree on 64 bits).
"""

from __future__ import annotations

import functools
import logging

import numpy as np

log = logging.getLogger(__name__)

SPAN = 50
"""Tokens: no training page may share a run this long with evaluation text."""


@functools.cache
def _coefficients(span: int) -> np.ndarray:
    """The hash's fixed odd 64-bit coefficients, one per window position (drawn once per span length)."""
    return np.random.default_rng(20261202).integers(1, 2**63, size=span, dtype=np.uint64) | np.uint64(1)


def span_hashes(ids: list[int], span: int = SPAN) -> np.ndarray:
    """(n - span + 1,) uint64 hashes of every ``span``-token window of ``ids`` (none when shorter)."""
    a = np.asarray(ids, dtype=np.uint64)
    if len(a) < span:
        return np.zeros(0, dtype=np.uint64)
    coef = _coefficients(span)
    windows = np.lib.stride_tricks.sliding_window_view(a, span)  # (n - span + 1, span), a view
    with np.errstate(over="ignore"):
        out = np.zeros(len(windows), dtype=np.uint64)
        for j in range(span):  # column by column: no (n, span) product held at once
            out += windows[:, j] * coef[j]
    return out


def sharing(texts: dict[str, str], reference: list[str], tokenizer, span: int = SPAN) -> dict[str, int]:
    """{id: how many of its ``span``-token windows occur in ``reference``} for the texts that share any."""
    def tokenize(xs: list[str]) -> list[list[int]]:
        return tokenizer(xs, add_special_tokens=False, verbose=False)["input_ids"]

    ref = np.unique(np.concatenate([span_hashes(x, span) for x in tokenize(reference)] or [np.zeros(0, np.uint64)]))
    ids = list(texts)
    out = {}
    for at in range(0, len(ids), 256):  # 256 pages per tokenizer call: bounded memory
        block = ids[at:at + 256]
        for doc_id, x in zip(block, tokenize([texts[i] for i in block]), strict=True):
            hits = _count_in(span_hashes(x, span), ref)
            if hits:
                out[doc_id] = hits
    return out


def _count_in(values: np.ndarray, sorted_ref: np.ndarray) -> int:
    """How many of ``values`` occur in the sorted ``sorted_ref``: a binary search each (``np.isin`` sorts the
    reference again for every page, 40 min for the package corpus instead of seconds)."""
    if not len(values) or not len(sorted_ref):
        return 0
    at = np.minimum(np.searchsorted(sorted_ref, values), len(sorted_ref) - 1)
    return int((sorted_ref[at] == values).sum())


def sharing_pages(pages: dict[str, str], packages: tuple[str, ...]) -> list[str]:
    """Ids of ``pages`` sharing a ``SPAN``-token run with the evaluation-only text of ``packages``, sorted."""
    from dewey_lab.eval.tasks.heldout import heldout_texts
    from dewey_lab.model.student import load_tokenizer
    from dewey_lab.resolve import OFFLINE_TEACHER

    found = sharing(pages, list(heldout_texts(packages).values()), load_tokenizer(OFFLINE_TEACHER))
    for doc_id, hits in sorted(found.items()):
        log.info("dropped %s: %d of its %d-token runs are in %s", doc_id, hits, SPAN, ", ".join(packages))
    return sorted(found)
