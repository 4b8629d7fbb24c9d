"""``dewey_lab.encode``: single vectors, and chunk vectors of a text of any length in one pass.

    from dewey_lab.encode import load

    enc = load("runs/tiny/version_0/checkpoints/last.ckpt")   # or an exported dir, a hub id, pkg://...
    vecs = enc.encode(["a question", "a passage"])                    # (2, D), unit vectors, the trained head
    vecs = enc.encode(["a question", "a passage"], mode="mean")       # or another PoolingHead by name
    out = enc.encode_chunks(long_text, chunker=Chunker(256, 256))     # or spans=[(0, 900), ...]
    out.vectors, out.char_spans, out.token_spans                      # (M, D), [(c0, c1)], [(t0, t1)]

Chunk vectors are late chunks: every chunk is the mean of its tokens' states from a forward pass
over the text around it, not over the chunk alone. A text that fits the model's window takes one
pass. A longer one is read in overlapping *macro-windows* of the window's size (each with the
text's CLS / prompt before and SEP after); a chunk is pooled from the window that holds it with
the most context on both sides, so the chunk geometry (which characters and tokens each chunk
covers) never depends on the windowing, and memory is bounded by one window at any length.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dewey_lab.data.chunking import char_spans_to_token_spans
from dewey_lab.data.items import text_token_mask
from dewey_lab.eval.embedder import Embedder

log = logging.getLogger(__name__)

Span = tuple[int, int]


@dataclass
class Chunks:
    """Chunk vectors of one text and where each chunk lies."""

    vectors: Tensor  # (M, D)
    char_spans: list[Span]  # [start, end) characters of the text (the prompt not counted)
    token_spans: list[Span]  # [start, end) indices into tokenizer(prompt + text) with special tokens
    windows: int  # forward passes (macro-windows) it took


class Encoder:
    """Encode with an :class:`~dewey_lab.eval.embedder.Embedder` (see :func:`load`).

    Args:
        embedder: the model, tokenizer, head, pooling, prompts and window.
        window: macro-window in tokens for :meth:`encode_chunks` (default: the embedder's max length,
            i.e. the model's window).
        window_overlap: tokens shared by neighbouring macro-windows (default: a quarter of the window,
            at least the longest chunk, so every chunk fits whole inside some window).
    """

    def __init__(self, embedder: Embedder, window: int | None = None, window_overlap: int | None = None) -> None:
        self.embedder, self.window, self.window_overlap = embedder, window or embedder.max_length, window_overlap
        if self.window < 16:
            raise ValueError(f"window {self.window} is too small; use at least 16 tokens")

    @property
    def tokenizer(self):
        return self.embedder.tokenizer

    def _prompt(self, prompt: str | None) -> str:
        return {"query": self.embedder.query_prompt, "passage": self.embedder.passage_prompt,
                None: ""}.get(prompt, prompt)

    def encode(self, texts: str | Sequence[str], mode: str | None = None, prompt: str | None = "passage") -> Tensor:
        """(N, D) vectors; ``mode`` is a pooling head's name, e.g. cls, mean or cls_mean (default: the model's
        own, a checkpoint's trained head); ``prompt`` is
        ``query``, ``passage`` (the model's prompts), ``None`` or a literal string. Texts longer than
        the window are truncated to it, as every single-vector encoder does, with a warning that counts them."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        e = self.embedder.with_pooling(mode)  # one-line error for an unknown name
        items = e.tokenize(texts, self._prompt(prompt))
        cut = sum(it.truncated for it in items)
        if cut:
            log.warning("encode: %d of %d texts exceed the %d-token window and were truncated to it; use "
                        "encode_chunks for their whole text", cut, len(items), e.max_length)
        return e.embed(items, chunks=False).single

    @torch.inference_mode()
    def encode_chunks(self, text: str, chunker: Callable[[str], Sequence[Span]] | object | None = None,
                      spans: Sequence[Span] | None = None, prompt: str | None = "passage") -> Chunks:
        """One vector per chunk of ``text``, from one pass (or one pass per macro-window).

        Chunks come from ``spans`` (character spans of ``text``), or ``chunker`` (a callable returning
        character spans, like :class:`dewey_lab.data.chunking.Chunker`, or a langchain ``TextSplitter``),
        or by default the embedder's token windows (``chunk_size`` / ``chunk_overlap``).
        """
        if spans is not None and chunker is not None:
            raise ValueError("give either spans= or chunker=, not both")
        e, p = self.embedder, self._prompt(prompt)
        enc = self.tokenizer(p + text, truncation=False, return_offsets_mapping=True,
                             return_special_tokens_mask=True, verbose=False)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        content = text_token_mask(enc["special_tokens_mask"], offsets, len(p))
        text_tokens = [i for i, c in enumerate(content) if c]
        if not text_tokens:
            return Chunks(torch.zeros(0, self.dim), [], [], 0)
        first, end = text_tokens[0], text_tokens[-1] + 1
        if spans is None and chunker is None:  # the embedder's token windows, as character spans
            spans = [(offsets[a][0] - len(p), offsets[b - 1][1] - len(p)) for a, b in e.windows(content)]
        elif spans is None:
            spans = _spans_of(chunker, text)
        mapped = char_spans_to_token_spans(offsets, content, [(a + len(p), b + len(p)) for a, b in spans])
        keep = [k for k, t in enumerate(mapped) if t is not None]  # blank spans hold no token
        char_spans = [tuple(spans[k]) for k in keep]
        token_spans = [mapped[k] for k in keep]
        head, tail = ids[:first], ids[end:]
        starts, room = self._layout(end - first, len(head) + len(tail), token_spans)
        owner = [_best_window(a - first, b - first, starts, room) for a, b in token_spans]
        vectors = torch.zeros(len(token_spans), self.dim)
        todo = sorted(set(owner))  # windows that hold at least one chunk
        for batch in _budget(todo, len(head) + room + len(tail), e.token_budget):
            rows = [head + ids[first + starts[w]:first + min(starts[w] + room, end - first)] + tail for w in batch]
            T = max(map(len, rows))
            x = torch.full((len(rows), T), self.tokenizer.pad_token_id or 0, dtype=torch.long)
            attn = torch.zeros(len(rows), T, dtype=torch.long)
            for r, row in enumerate(rows):
                x[r, :len(row)], attn[r, :len(row)] = torch.tensor(row), 1
            hidden = e._hidden(x.to(e.device), attn.to(e.device))  # (B, T, H)
            mine = [(k, batch.index(w)) for k, w in enumerate(owner) if w in batch]
            shift = [len(head) - first - starts[owner[k]] for k, _ in mine]  # text index -> window row index
            row = torch.tensor([r for _, r in mine], device=e.device)
            lo = torch.tensor([token_spans[k][0] + s for (k, _), s in zip(mine, shift)], device=e.device)
            hi = torch.tensor([token_spans[k][1] + s for (k, _), s in zip(mine, shift)], device=e.device)
            chunks = e.chunk_head(hidden, {"chunk_row": row, "chunk_start": lo, "chunk_end": hi})  # (n, H)
            vectors[[k for k, _ in mine]] = e._finish(chunks).cpu()
        return Chunks(vectors, char_spans, token_spans, len(todo))

    def _layout(self, n: int, specials: int, token_spans: list[Span]) -> tuple[list[int], int]:
        """Macro-window starts (in text tokens) and the text tokens each window holds."""
        room = self.window - specials
        if n <= room:
            return [0], n
        longest = max((b - a for a, b in token_spans), default=1)
        overlap = max(self.window_overlap if self.window_overlap is not None else room // 4, longest)
        if overlap > room // 2:
            raise ValueError(f"a chunk of {longest} tokens needs windows of at least {2 * longest + specials} "
                             f"tokens (window is {self.window}); use smaller chunks or a larger window=")
        stride, starts = room - overlap, [0]
        while starts[-1] + room < n:
            starts.append(min(starts[-1] + stride, n - room))  # the last window ends at the text's end
        return starts, room

    @property
    def dim(self) -> int:
        head = self.embedder.head
        linears = [m for m in (head.modules() if head is not None else ()) if isinstance(m, torch.nn.Linear)]
        return linears[-1].out_features if linears else self.embedder.model.config.hidden_size


def _best_window(a: int, b: int, starts: list[int], room: int) -> int:
    """The window holding text tokens [a, b) with the most context on its tighter side."""
    best, margin = -1, -1
    for w, s in enumerate(starts):
        if s <= a and b <= s + room and min(a - s, s + room - b) > margin:
            best, margin = w, min(a - s, s + room - b)
    assert best >= 0, "every chunk fits a window by construction (overlap >= longest chunk)"
    return best


def _budget(windows: list[int], length: int, token_budget: int) -> list[list[int]]:
    per = max(1, token_budget // length)
    return [windows[i:i + per] for i in range(0, len(windows), per)]


def _spans_of(chunker, text: str) -> list[Span]:
    """Character spans from our Chunker (returns spans) or a langchain TextSplitter (returns strings)."""
    if hasattr(chunker, "split_text"):
        out, pos = [], 0
        for piece in chunker.split_text(text):
            start = text.find(piece, pos)
            if start < 0:  # a splitter that strips or rewrites text cannot be located
                raise ValueError("the splitter returned text that is not in the document (strip_whitespace=False "
                                 "or pass spans= instead)")
            out.append((start, start + len(piece)))
            pos = start + 1
        return out
    if callable(chunker):
        return list(chunker(text))
    raise ValueError(f"chunker must be callable (text -> spans) or have split_text(), got {type(chunker).__name__}")


def load(model: str, *, pooling: str | None = None, window: int | None = None, device: str = "auto",
         dtype: str = "auto", **kwargs) -> Encoder:
    """An :class:`Encoder` for a hub id, local or exported directory, ``pkg://`` model or ``.ckpt``.

    ``pooling``: a pooling head's name (``dewey_lab.model.pooling.PoolingHead.choices()``); default: the
    model's own (a checkpoint's trained whole-text head, an export's recorded pooling).

    ``kwargs`` go to :func:`dewey_lab.eval.load.load_embedder` (prompts, chunk_size, max_length...)."""
    from dewey_lab.eval.load import load_embedder

    return Encoder(load_embedder(model, pooling=pooling, device=device, dtype=dtype, **kwargs), window=window)
