"""Documents -> the student's windows, each tokenised once.

A document is tokenised once (no special tokens, with offsets) and cut into windows of at most
``max_length`` student tokens, special and prompt tokens included: ``overflow: truncate`` keeps the
first window (the paper's max length 2048), ``split`` every window. The chunker draws chunk
character spans on each window's text, seeded by that text, and each chunk becomes the window's
tokens that overlap it.

An ``Example`` keeps what the student reads (its token ids, exactly as they enter the model) and
what the teacher embeds, and the two are the same text: the whole-text teacher text is the
characters the window's content tokens cover, and each chunk's teacher text is the characters
its own tokens cover. Nothing is re-tokenised later, so nothing is truncated later either: a
chunk is never cut after the teacher embedded it whole.

Held-out texts are whole documents (by a hash of the document id), so validation measures
generalisation to unseen text, not to unseen windows of seen text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

from dewey_lab.data.chunking import Chunker, Span, char_spans_to_token_spans
from dewey_lab.data.corpus import CorpusSource, Document
from dewey_lab.data.store.vectors import cache_key
from dewey_lab.model.student import load_tokenizer
from dewey_lab.resolve import OFFLINE_TEACHER


@dataclass
class WindowConfig:
    """How documents become the student's windows; every field is a YAML key under ``data.windows``."""

    tokenizer: str = OFFLINE_TEACHER
    """The student's tokenizer; the CLI links it from ``model.student`` (one setting, two readers)."""
    max_length: int = 2048
    """Student window in tokens, special and prompt tokens included (paper: 2048)."""
    overflow: Literal["truncate", "split"] = "truncate"
    """``truncate`` keeps each document's first window; ``split`` keeps every window."""
    min_window_tokens: int = 16
    """In split mode, drop trailing windows shorter than this many tokens."""
    max_windows_per_doc: int | None = None
    """In split mode, keep at most this many windows of one document (None: all)."""
    prompt: str | None = None
    """Text the student reads before each training text; its tokens are never pooled."""
    val_fraction: float = 0.02
    """Share of documents held out for validation (by a hash of the document id, or of its package)."""
    val_by: Literal["document", "package"] = "document"
    """What a validation hold-out keeps together: each ``document`` on its own, or every document of one
    ``package``, the id's first dotted part (``numpy.linalg`` -> ``numpy``: pydoc pages), so no page of a
    held-out package is trained on."""
    max_val_examples: int = 1024
    """Cap on validation windows."""


@dataclass
class Example:
    """One window, tokenised once: the student's input and the teacher's texts, keyed for the cache.

    ``input_ids`` is what the student reads, special and prompt tokens included; ``content_mask``
    marks the window's own tokens (pooled), False on CLS, SEP, the prompt and zero-width tokens.
    Chunk i is tokens ``spans[i]`` of ``input_ids`` and characters ``chunks[i]`` of ``text``: the
    characters exactly those tokens cover. ``keys`` are the cache keys of the whole text and then
    of each chunk (one teacher), in that order.
    """

    doc_id: str
    text: str  # the whole-text teacher text: the characters the window's content tokens cover
    input_ids: np.ndarray  # (T,) int32
    content_mask: np.ndarray  # (T,) bool
    chunks: list[Span]  # character spans into ``text``
    spans: list[Span]  # token spans into ``input_ids``, half-open, same order as ``chunks``
    keys: list[bytes]  # 1 + len(chunks) cache keys

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    def teacher_texts(self) -> list[str]:
        """The texts behind ``keys``: the window's, then each chunk's."""
        return [self.text] + [self.text[s:e] for s, e in self.chunks]

    def to_plain(self) -> list:
        """Plain types (a stream's checkpoint keeps carried windows; ``weights_only`` loads them)."""
        return [self.doc_id, self.text, self.input_ids.tolist(), np.flatnonzero(self.content_mask).tolist(),
                [list(c) for c in self.chunks], [list(s) for s in self.spans], [k.hex() for k in self.keys]]

    @classmethod
    def from_plain(cls, plain: list) -> Example:
        if len(plain) != 7:
            raise ValueError("this checkpoint's stream position holds windows of an older dewey_lab (text only); "
                             "resume it with that version, or start the run afresh")
        doc_id, text, ids, content, chunks, spans, keys = plain
        mask = np.zeros(len(ids), dtype=bool)
        mask[content] = True
        return cls(doc_id, text, np.asarray(ids, dtype=np.int32), mask, [tuple(c) for c in chunks],
                   [tuple(s) for s in spans], [bytes.fromhex(k) for k in keys])


class Windower:
    """Cuts documents into the student's windows (``WindowConfig``) and draws each window's chunks.

    Deterministic: the same document always gives the same windows, chunks and keys, whatever came
    before it. Picklable: a streaming loader's workers each get a copy (and load their own tokenizer).
    ``fingerprint`` is the teacher's: it keys the cache.
    """

    def __init__(self, config: WindowConfig, chunker: Chunker, fingerprint: str) -> None:
        self.config, self.chunker, self.fingerprint = config, chunker, fingerprint
        self._tok = None
        self._frame: tuple[list[int], list[int], list[int]] | None = None

    def __getstate__(self):
        return {**self.__dict__, "_tok": None}  # each process loads its own tokenizer

    @property
    def tokenizer(self):
        if self._tok is None:
            self._tok = load_tokenizer(self.config.tokenizer)
            self._tok.model_max_length = 1 << 30
        return self._tok

    @property
    def frame(self) -> tuple[list[int], list[int], list[int]]:
        """(special ids before the text, prompt ids, special ids after it): what surrounds every window."""
        if self._frame is None:
            tok = self.tokenizer
            probe = tok("a", return_special_tokens_mask=True)
            special, ids = probe["special_tokens_mask"], probe["input_ids"]
            first = special.index(0)
            last = len(special) - 1 - special[::-1].index(0)
            before, after = ids[:first], ids[last + 1:]
            if len(before) + len(after) != tok.num_special_tokens_to_add(pair=False):
                raise ValueError(f"tokenizer {self.config.tokenizer} does not put its special tokens around a text; "
                                 "use a BERT-style tokenizer for data.windows.tokenizer")
            prompt = self.config.prompt or ""
            self._frame = (before, tok(prompt, add_special_tokens=False)["input_ids"] if prompt else [], after)
        return self._frame

    def is_val(self, doc: Document) -> bool:
        group = doc.doc_id.split(".")[0] if self.config.val_by == "package" else doc.doc_id
        return _unit_hash(group) < self.config.val_fraction

    def windows_of(self, docs: Iterable[Document], group: int = 256) -> Iterator[tuple[str, Example]]:
        """``windows`` of a stream of documents, ``group`` documents per tokenizer call, as they come."""
        block = []
        for doc in docs:
            block.append(doc)
            if len(block) == group:
                yield from self.windows(block)
                block = []
        yield from self.windows(block)

    def windows(self, docs: list[Document]) -> list[tuple[str, Example]]:
        """``("train" | "val", window)`` for each window of ``docs``, in order (one tokenizer call)."""
        cfg, tok = self.config, self.tokenizer
        before, prompt, after = self.frame
        budget = cfg.max_length - len(before) - len(prompt) - len(after)
        if budget < cfg.min_window_tokens:
            raise ValueError(f"data.windows.max_length {cfg.max_length} leaves {budget} tokens after special and "
                             "prompt tokens; raise data.windows.max_length or shorten data.windows.prompt")
        windows = 1 if cfg.overflow == "truncate" else cfg.max_windows_per_doc
        need = None if windows is None else budget * windows + 1  # tokens a document can use at most
        heads = [_head(d.text, need) for d in docs]  # a 10M-character document: tokenise what is used
        enc = (tok(heads, add_special_tokens=False, return_offsets_mapping=True) if docs
               else {"input_ids": [], "offset_mapping": []})
        out = []
        for doc, head, ids, offsets in zip(docs, heads, enc["input_ids"], enc["offset_mapping"]):
            while need is not None and len(offsets) < need and len(head) < len(doc.text):
                head = _head(doc.text, need, len(head) * 4)  # a head with too few tokens: read further
                more = tok(head, add_special_tokens=False, return_offsets_mapping=True)
                ids, offsets = more["input_ids"], more["offset_mapping"]
            if len(head) < len(doc.text):
                ids, offsets = ids[:-1], offsets[:-1]  # the last token may be a word cut by the head
            if not offsets:  # e.g. only control characters: nothing the student could read
                continue
            split = "val" if self.is_val(doc) else "train"
            starts = range(0, len(offsets), budget) if cfg.overflow == "split" else range(1)
            for a in starts[: cfg.max_windows_per_doc]:
                b = min(a + budget, len(offsets))
                if a > 0 and b - a < cfg.min_window_tokens:
                    continue
                out.append((split, self.example(doc, ids[a:b], offsets[a:b])))
        return out

    def example(self, doc: Document, ids: list[int], offsets: list[tuple[int, int]]) -> Example:
        """The window of ``doc`` made of these tokens (ids and character offsets into ``doc.text``)."""
        before, prompt, after = self.frame
        start = offsets[0][0]
        text = doc.text[start:offsets[-1][1]]
        local = [(s - start, e - start) for s, e in offsets]  # offsets into the window's text
        own = [e > s for s, e in local]  # zero-width tokens cover no text: never pooled, never a chunk's
        chunks, spans, at = [], [], len(before) + len(prompt)
        for span in char_spans_to_token_spans(local, own, self.chunker(text)):
            if span is None:  # a chunk of characters no token covers (e.g. control characters only)
                continue
            s, e = span
            chunks.append((local[s][0], local[e - 1][1]))  # exactly what the chunk's tokens cover
            spans.append((at + s, at + e))
        input_ids = np.asarray(before + prompt + list(ids) + after, dtype=np.int32)  # (T,)
        content = np.zeros(len(input_ids), dtype=bool)  # (T,)
        content[at:at + len(ids)] = own
        keys = [cache_key(self.fingerprint, t) for t in [text] + [text[s:e] for s, e in chunks]]
        return Example(doc.doc_id, text, input_ids, content, chunks, spans, keys)


def unique_documents(corpus: CorpusSource, keep: Callable[[bytes], bool] | None = None,
                     on_duplicate: Callable[[], None] | None = None) -> Iterator[tuple[int, Document]]:
    """(position in the corpus, document), exact duplicates dropped (``on_duplicate`` is told of each):
    one duplicate would only weigh its text twice. Documents whose text digest ``keep`` rejects are
    skipped first, so only the kept ones' digests are remembered (a shard's, not the corpus')."""
    seen: set[bytes] = set()
    for pos, doc in enumerate(corpus.documents()):
        digest = text_digest(doc.text)
        if keep is not None and not keep(digest):
            continue
        if digest in seen:
            if on_duplicate is not None:
                on_duplicate()
            continue
        seen.add(digest)
        yield pos, doc


def text_digest(text: str) -> bytes:
    """SHA-256 of a document's text: exact duplicates share it (and a stream shard, see ``streaming``)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def _head(text: str, tokens: int | None, chars: int | None = None) -> str:
    """The start of ``text`` likely to hold ``tokens`` tokens (16 characters a token), or all of it."""
    if tokens is None:
        return text
    return text[: chars or tokens * 16]


def _unit_hash(s: str) -> float:
    """A stable number in [0, 1) for a string (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little") / 2**64
