"""Embedder: an encoder's token states -> single-vector and late-chunked multi-vector embeddings.

One forward pass per passage yields both views:

* single vector: the whole passage pooled by a ``dewey_lab.model.pooling`` head, the classes training
  uses (``cls``, ``mean`` or ``cls_mean``, Dewey's three; ``last`` for decoder embedders such as
  E5-Mistral, Linq-Embed-Mistral and Qwen3-Embedding: the hidden state of an EOS token appended to
  every input, right padding, as their own code does; a trained head such as ``attention``);
* multi-vector: fixed token windows (``chunk_size``, ``chunk_overlap``; Dewey's examples use 256 /
  64; the last window is moved back to end at the text's end, so no chunk is a short tail) mean-pooled from the *same* hidden states (late chunking), so every chunk saw the whole
  passage as context and no chunk is encoded on its own;
* query vectors for multi-vector scoring (``query_head``): by default the chunk head over the query's
  whole run of text tokens (``TextAsChunk``; for the default chunk head, the mean of the query's text
  tokens, prompt and specials excluded), so a query is pooled the way the passages' chunks are, as
  dewey_en_beta scores ``max(q_mean . chunk)``; or any whole-text head by name (``cls``: the old rule);
* extra single vectors (``embed(extra=...)``): other whole-text heads (e.g. ``mean`` beside a trained
  ``cls``) pooled from the same hidden states, through the same projection and normalisation, so a
  pooling comparison costs one forward pass, not one per head.

Each padded batch is handed to the heads as the batch dict training's packed batches are
(``doc_row``, ``doc_start``, ``token_doc``, ``content_mask``; one text per row here), so one head
code serves both. Chunks pool text tokens only (no CLS, SEP or prompt), as the training loss pooled
them. Mean pooling covers text tokens (``mean_over="content"``, Dewey) or every attended token
(``mean_over="all"``, what sentence-transformers' Pooling does; used for its models so a baseline
scores exactly as it does in sentence-transformers): that is the batch's ``content_mask``.

Passages longer than ``max_length`` are truncated to it, as LongEmbed evaluates a model without
an extension method; ``Item.truncated`` marks them so reports can say so. Batches are built
to a token budget, longest first, so a 32k-token passage runs alone and short ones share a pass;
ModernBERT batches longer than 2048 tokens use ``dewey_lab.model.attention``'s blocked sliding-window
SDPA, so memory grows linearly with length where flash-attn is absent.

Length: one class, one concept: every view (single, extra heads, late chunks, PCW windows) comes from the same
tokenisation, batch layout and forward pass, and splitting those apart would hand private batch state between
modules; the pure helpers (``chunk_windows``, ``window_of``, ``check_length``) are the few lines outside it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dewey_lab.data.items import text_token_mask
from dewey_lab.model.attention import banded, can_band, key_masks
from dewey_lab.model.pooling import ChunkMeanPooling, PoolingHead, TextAsChunk

QUERY_AS_CHUNK = "chunk"  # query_pooling: the chunk head over the query's text tokens (Dewey's mean query)
BAND_FROM = 2048  # tokens; longer ModernBERT batches use the blocked sliding-window SDPA
CHARS_PER_TOKEN_BOUND = 32  # characters per token no real text exceeds on average (English: about 4)


def check_query_pooling(name: str, where: str = "query_pooling") -> str:
    """``name`` when it is a query pooling (``chunk`` or a ``PoolingHead.choices()`` name), else a one-line error
    listing the choices; learned weights are checked once the model is known (``Embedder.query_head``)."""
    known = PoolingHead.choices()
    if name != QUERY_AS_CHUNK and name not in known:
        raise ValueError(f"unknown {where} {name!r}; use {QUERY_AS_CHUNK} (the chunk head over the query's text "
                         f"tokens: Dewey's mean query, the default) or one of {', '.join(known)}")
    return name


def chunk_windows(content: Sequence[bool], size: int, overlap: int) -> list[tuple[int, int]]:
    """Late-chunking windows [start, end) of ``size`` tokens, ``overlap`` apart, over the text tokens (the True
    entries of ``content``, contiguous: [CLS] prompt text [SEP]); none for a text without any."""
    idx = [i for i, c in enumerate(content) if c]
    if not idx:
        return []
    first, end = idx[0], idx[-1] + 1
    stride = size - overlap
    spans, start = [], first
    while start + size < end:
        spans.append((start, start + size))
        start += stride
    # the last window ends at the text's end and is full-size when the text allows (as PCW's last
    # chunk is): a short tail would be a few tokens whose mean matches generic query words
    spans.append((max(first, end - size), end))
    return spans


@dataclass
class Item:
    """One tokenised passage: ids, which tokens are text, and its late-chunking windows."""

    input_ids: list[int]
    content_mask: list[bool]
    chunks: list[tuple[int, int]]  # token spans [start, end) over text tokens
    truncated: bool


@dataclass
class Encoded:
    single: Tensor  # (N, D), L2-normalised when the embedder normalises
    chunks: Tensor  # (M, D), every passage's chunks, in passage order
    owner: Tensor  # (M,) index of the passage each chunk belongs to
    extra: dict[str, Tensor] = field(default_factory=dict)  # {label: (N, D)} more whole-text heads, same pass


class Embedder:
    """Encode queries and passages with any model whose forward returns ``last_hidden_state``.

    Args:
        model: the encoder (a transformers model, or a student's ModernBertModel).
        tokenizer: its fast tokenizer (offsets are used to tell text from prompt tokens).
        head: applied after pooling (a trained student's projection); None for none.
        pooling: single-vector pooling: a whole-text ``PoolingHead`` (a trained one) or its name, one of
            ``PoolingHead.choices()``: cls, mean, cls_mean, last (the last attended token; an EOS is appended
            to every input unless the tokenizer ends it with one or has none). A name whose head has learned
            weights (attention) is refused: pass the trained head.
        chunk_pooling: the multi-vector chunk head (a trained student's; default: mean of the chunk's tokens).
        mean_over: ``content`` (text tokens) or ``all`` (every attended token, sentence-transformers).
        max_length: tokens per passage, special tokens included; longer passages are truncated.
        query_prompt, passage_prompt: prepended to queries / passages (never pooled by ``content``);
            decoder embedders take an instruction on queries only.
        chunk_size, chunk_overlap: late-chunking windows in tokens.
        token_budget: padded tokens per forward pass (a longer passage runs alone).
        normalize: L2-normalise every vector (cosine scoring).
        name, fingerprint: what reports print; what the embedding cache is keyed by.
        extension: a context-window extension bound to this model (``Extension.bind``), or None.
    """

    def __init__(self, model: nn.Module, tokenizer, *, head: nn.Module | None = None,
                 pooling: str | PoolingHead = "mean", chunk_pooling: PoolingHead | None = None,
                 mean_over: str = "content", max_length: int = 512, query_prompt: str = "",
                 passage_prompt: str = "", chunk_size: int = 256, chunk_overlap: int = 64,
                 token_budget: int = 16384, normalize: bool = True, name: str = "model",
                 fingerprint: str | None = None, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, extension=None) -> None:
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        whole = pooling if isinstance(pooling, PoolingHead) else PoolingHead.pick(pooling, hidden_size=hidden)
        if not whole.whole:
            raise ValueError(f"pooling {type(whole).__name__} is a chunk head; give a whole-text head")
        if mean_over not in ("content", "all"):
            raise ValueError(f"mean_over must be content or all, got {mean_over!r}")
        if not 0 <= chunk_overlap < chunk_size:
            raise ValueError(f"chunk_overlap ({chunk_overlap}) must be >= 0 and below chunk_size ({chunk_size})")
        if max_length < 8:
            raise ValueError(f"max_length {max_length} is too small to hold a passage; use at least 8 tokens")
        self.model, self.tokenizer, self.head = model, tokenizer, head
        self.whole_head, self.chunk_head = whole, chunk_pooling if chunk_pooling is not None else ChunkMeanPooling()
        self.mean_over, self.max_length = mean_over, max_length
        self.query_prompt, self.passage_prompt = query_prompt, passage_prompt
        self.chunk_size, self.chunk_overlap, self.token_budget = chunk_size, chunk_overlap, token_budget
        self.normalize, self.name, self.fingerprint = normalize, name, fingerprint or name
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.dtype = dtype
        self.extension = extension  # a bound dewey_lab.eval.extension.methods.Extension, or None
        self.window = max_length  # the model's own window L_o (load.extend() may raise max_length past it)

    @property
    def pooling(self) -> str:
        """The whole-text head's name (``cls``, ``mean``, ...)."""
        return self.whole_head.name or type(self.whole_head).__name__

    def with_pooling(self, name: str | None) -> Embedder:
        """This embedder pooling by ``name`` (None or its own head's name: itself); one-line error listing the
        choices for an unknown name or a head with learned weights this model did not train."""
        hidden = getattr(getattr(self.model, "config", None), "hidden_size", None)
        head = PoolingHead.pick(name, self.whole_head, hidden)
        if head is self.whole_head:
            return self
        e = copy.copy(self)
        e.whole_head = head
        return e

    def extra_head(self, name: str, where: str = "pooling") -> PoolingHead:
        """The whole-text head ``name`` to pool beside this embedder's own from the same pass
        (``embed(extra=)``): its own head for its own name, else a fresh one. One-line errors for an unknown
        name, learned weights this model did not train (``PoolingHead.pick``) or a head that tokenises
        differently (an appended EOS)."""
        hidden = getattr(getattr(self.model, "config", None), "hidden_size", None)
        head = PoolingHead.pick(name, self.whole_head, hidden, where=where)
        if head.appends_eos != self.whole_head.appends_eos:  # other tokens, so other hidden states
            eos = "with" if head.appends_eos else "without"
            raise ValueError(f"{where} {name!r} reads inputs {eos} an appended EOS, unlike this embedder's "
                             f"{self.pooling} head, so they cannot share a pass; evaluate pooling={name} "
                             "as its own run")
        return head

    def query_head(self, name: str = QUERY_AS_CHUNK, where: str = "query_pooling") -> PoolingHead:
        """The head that pools queries for multi-vector scoring: ``chunk`` (``TextAsChunk``: the chunk head
        over the query's text tokens, Dewey's mean query) or a whole-text head by name (``extra_head``'s rules:
        its own head for its own name, no untrained learned weights, the same tokenisation). One-line error
        listing the choices for an unknown name."""
        if check_query_pooling(name, where) == QUERY_AS_CHUNK:
            return TextAsChunk(self.chunk_head)
        return self.extra_head(name, where=where)

    @property
    def fingerprint_extra(self) -> str:
        """Everything besides the weights that changes a vector; part of every cache key. ``/per-input``
        marks extension vectors computed since GP / PI / PCW follow LongEmbed's reference (per-sequence
        factors, raw PCW means), so an older cache's vectors are never served for them."""
        return (f"pool={self.whole_head.describe()}/{self.mean_over}|len={self.max_length}|"
                f"chunk={self.chunk_size}/{self.chunk_overlap}|norm={int(self.normalize)}|dtype={self.dtype}|"
                f"ext={self.extension!r}"
                f"@{getattr(self.extension, 'original', '')}" + ("/per-input" if self.extension is not None else ""))

    # -- tokenisation ------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], prompt: str = "") -> list[Item]:
        """Tokenise with offsets (one batched call); mark text tokens; lay out chunk windows."""
        full = [prompt + t for t in texts]
        # a 1M-token passage is cut to what max_length tokens can take before it is tokenised (a text whose
        # cut yields fewer tokens than that, e.g. mostly whitespace, is tokenised whole)
        limit = CHARS_PER_TOKEN_BOUND * self.max_length
        kwargs = {"truncation": True, "max_length": self.max_length, "return_offsets_mapping": True,
                  "return_special_tokens_mask": True}
        enc = self.tokenizer([t[:limit] for t in full], **kwargs)
        rows = [(enc["input_ids"][i], enc["offset_mapping"][i], enc["special_tokens_mask"][i]) for i in range(len(full))]
        for i, text in enumerate(full):
            if len(text) > limit and len(rows[i][0]) < self.max_length:
                one = self.tokenizer(text, **kwargs)
                rows[i] = (one["input_ids"], one["offset_mapping"], one["special_tokens_mask"])
        p = len(prompt)
        eos = self.tokenizer.eos_token_id if self.whole_head.appends_eos else None
        items = []
        for text, (ids, offsets, special) in zip(full, rows):
            ids, offsets = list(ids), list(offsets)
            content = text_token_mask(special, offsets, p)
            if eos is not None and (not ids or ids[-1] != eos):  # E5-Mistral: tokenise to max_length - 1, add EOS
                if len(ids) >= self.max_length:
                    ids, offsets, content = ids[:-1], offsets[:-1], content[:-1]
                ids, offsets, content = [*ids, eos], [*offsets, (0, 0)], [*content, False]
            last_end = max((e for c, (_, e) in zip(content, offsets) if c), default=len(text))
            truncated = last_end < len(text.rstrip())  # the last kept text token ends before the text does
            items.append(Item(ids, content, self.windows(content), truncated))
        return items

    def windows(self, content: list[bool]) -> list[tuple[int, int]]:
        """Token windows of ``chunk_size`` with ``chunk_overlap`` over the text tokens (``chunk_windows``)."""
        return chunk_windows(content, self.chunk_size, self.chunk_overlap)

    # -- encoding ----------------------------------------------------------------------------------
    def encode_queries(self, texts: Sequence[str]) -> Tensor:
        """(Q, D) query vectors (single-vector pooling; queries are short)."""
        return self.embed_queries(texts).single

    def embed_queries(self, texts: Sequence[str], extra: Mapping[str, PoolingHead] | None = None) -> Encoded:
        """Query vectors: ``single`` (Q, D) and one (Q, D) per ``extra`` head, from one pass; no chunks.

        PCW never splits a query (LongEmbed's reference chunks the corpus only): a query is read
        unextended, cut at the model's own window. Position and model-level extensions see queries
        as any input (GP / RP / PI leave those of L_o tokens or fewer unchanged)."""
        e = self
        if getattr(self.extension, "splits", False):
            e = copy.copy(self)
            e.extension, e.max_length = None, self.window
        more = {"extra": extra} if extra else {}  # without extra heads embed is called as it always was
        return e.embed(e.tokenize(texts, self.query_prompt), chunks=False, **more)

    def encode_passages(self, texts: Sequence[str], chunks: bool = True,
                        extra: Mapping[str, PoolingHead] | None = None) -> Encoded:
        return self.embed(self.tokenize(texts, self.passage_prompt), chunks=chunks, extra=extra)

    @torch.inference_mode()
    def embed(self, items: Sequence[Item], chunks: bool = True, progress: Callable[[int], None] | None = None,
              extra: Mapping[str, PoolingHead] | None = None) -> Encoded:
        """Vectors for tokenised passages, computed in token-budget batches, returned in input order.

        ``extra``: {label: whole-text head} (``extra_head``) pooled from the same hidden states as
        ``single``, with the same layout, projection and normalisation; ``Encoded.extra`` holds them under
        the same labels. One forward pass per batch, whatever the number of heads."""
        extra = dict(extra or {})
        was_training = self.model.training
        self.model.eval()
        try:
            singles: list[Tensor | None] = [None] * len(items)
            multi: list[Tensor | None] = [None] * len(items)
            others: dict[str, list[Tensor | None]] = {k: [None] * len(items) for k in extra}
            for batch in self.batches(items):
                s, m, x = self._embed_batch([items[i] for i in batch], chunks, extra)
                for k, i in enumerate(batch):
                    singles[i], multi[i] = s[k], m[k]
                    for label in extra:
                        others[label][i] = x[label][k]
                if progress is not None:
                    progress(len(batch))
        finally:
            self.model.train(was_training)
        dim = singles[0].shape[-1] if items else 0
        single = torch.stack(singles) if items else torch.zeros(0, dim)
        counts = [len(m) if m is not None else 0 for m in multi]
        chunk_vecs = torch.cat([m for m in multi if m is not None and len(m)]) if any(counts) else torch.zeros(0, dim)
        owner = torch.repeat_interleave(torch.arange(len(items)), torch.tensor(counts, dtype=torch.long))
        rest = {k: torch.stack(v) if items else torch.zeros(0, dim) for k, v in others.items()}
        return Encoded(single, chunk_vecs, owner, rest)

    def batches(self, items: Sequence[Item]) -> list[list[int]]:
        """Indices grouped longest-first so that rows x longest row <= token_budget."""
        order = sorted(range(len(items)), key=lambda i: -len(items[i].input_ids))
        out: list[list[int]] = []
        for i in order:
            if out and (len(out[-1]) + 1) * len(items[out[-1][0]].input_ids) <= self.token_budget:
                out[-1].append(i)  # the first row of a batch is its longest
            else:
                out.append([i])
        return out

    def _collate(self, items: list[Item]) -> tuple[Tensor, Tensor, Tensor]:
        B, T = len(items), max(len(it.input_ids) for it in items)
        ids = torch.full((B, T), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        attn = torch.zeros(B, T, dtype=torch.long)
        content = torch.zeros(B, T, dtype=torch.bool)
        for b, it in enumerate(items):
            n = len(it.input_ids)
            ids[b, :n], attn[b, :n] = torch.tensor(it.input_ids), 1
            content[b, :n] = torch.tensor(it.content_mask)
        return ids.to(self.device), attn.to(self.device), content.to(self.device)

    def _hidden(self, ids: Tensor, attn: Tensor) -> Tensor:
        """(B, T, H) fp32 last hidden state, through the extension when one is set (PCW aside).

        A per-input method that leaves inputs of L_o tokens or fewer unchanged (PI) runs those rows
        through the plain model and the rest through the extension, each part trimmed to its own
        longest row: which rows share a batch never changes a vector."""
        ext = self.extension if not getattr(self.extension, "splits", False) else None
        if ext is None or not ext.short_inputs_unchanged:
            return self._forward(ids, attn, ext)
        lengths = attn.sum(1)
        short = lengths <= ext.original  # (B,)
        if bool(short.all()):
            return self._forward(ids, attn, None)
        if not bool(short.any()):
            return self._forward(ids, attn, ext)
        out = None
        for rows, e in ((short, None), (~short, ext)):
            width = int(lengths[rows].max())
            h = self._forward(ids[rows, :width], attn[rows, :width], e)  # (b, width, H)
            if out is None:
                out = h.new_zeros(ids.shape[0], ids.shape[1], h.shape[-1])
            out[rows, :width] = h
        return out

    def _forward(self, ids: Tensor, attn: Tensor, ext) -> Tensor:
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype not in (None, torch.float32))
        with autocast, ExitStack() as stack:
            mask = attn
            if ids.shape[1] > BAND_FROM and can_band(self.model):  # dense (T, T) masks would dominate memory
                stack.enter_context(banded(self.model))
                mask = key_masks(attn)
            if ext is not None:
                return ext.forward(self.model, ids, attn, mask).float()
            return self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()

    def _pool(self, hidden: Tensor, content: Tensor, attn: Tensor,
              heads: Sequence[PoolingHead] = ()) -> list[Tensor]:
        """[(B, H)]: the whole-text head, then each of ``heads``, over a padded batch laid out as training's
        batch dict (one text per row, starting at 0, right padding), so a head runs the same code on both."""
        B = hidden.shape[0]
        rows = torch.arange(B, device=hidden.device)
        batch = {"doc_row": rows, "doc_start": torch.zeros_like(rows),
                 "token_doc": torch.where(attn.bool(), rows.unsqueeze(1), -1),  # (B, T)
                 "content_mask": content if self.mean_over == "content" else attn.bool(),  # what a mean reads
                 "text_mask": content}  # text tokens only, whatever mean_over: what chunks pool (TextAsChunk)
        return [head(hidden, batch) for head in (self.whole_head, *heads)]

    def _embed_batch(self, items: list[Item], chunks: bool, extra: Mapping[str, PoolingHead] | None = None
                     ) -> tuple[list[Tensor], list[Tensor], dict[str, list[Tensor]]]:
        extra = dict(extra or {})
        if getattr(self.extension, "splits", False):  # PCW: windows embedded apart
            hidden, single, others = self._pcw(items, extra)
        else:
            ids, attn, content = self._collate(items)
            hidden = self._hidden(ids, attn)
            pooled = [self._finish(p) for p in self._pool(hidden, content, attn, list(extra.values()))]
            single, others = pooled[0], dict(zip(extra, pooled[1:]))
        B = len(items)
        others = {k: list(v.cpu()) for k, v in others.items()}
        if not chunks:
            return list(single.cpu()), [None] * B, others
        rows = [b for b, it in enumerate(items) for _ in it.chunks]
        spans = [s for it in items for s in it.chunks]
        if not spans:
            return list(single.cpu()), [single.new_zeros(0, single.shape[-1]).cpu()] * B, others
        row = torch.tensor(rows, device=self.device)
        start = torch.tensor([s for s, _ in spans], device=self.device)
        end = torch.tensor([e for _, e in spans], device=self.device)
        chunk_vecs = self.chunk_head(hidden, {"chunk_row": row, "chunk_start": start, "chunk_end": end})  # (N, H)
        vecs = self._finish(chunk_vecs).cpu()  # (N, D)
        split = list(torch.split(vecs, [len(it.chunks) for it in items]))
        return list(single.cpu()), split, others

    def _pcw(self, items: list[Item], extra: Mapping[str, PoolingHead] | None = None
             ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Parallel context windows: each passage's text in windows of the original length, each
        window with the passage's CLS / prompt before and SEP after, embedded apart. Returns the
        stitched hidden states (B, T, H), the passage vectors (B, D): the windows' raw vectors
        (pooled and through the head, not normalised) averaged, then normalised, as LongEmbed's
        reference does in its "chunk" mode, and each ``extra`` head's (B, D), averaged the same way."""
        extra = dict(extra or {})
        room_total = self.extension.original
        windows: list[Item] = []
        layout = []  # per passage: (head length, text start, text end, [(a, b) per window])
        for it in items:
            text = [i for i, c in enumerate(it.content_mask) if c]
            first, end = (text[0], text[-1] + 1) if text else (len(it.input_ids) - 1, len(it.input_ids) - 1)
            head, tail = it.input_ids[:first], it.input_ids[end:]
            room = room_total - len(head) - len(tail)
            if room < 1:
                raise ValueError(f"pcw: the prompt and special tokens ({len(head) + len(tail)}) fill the whole "
                                 f"{room_total}-token window; shorten the prompt")
            spans = self.extension.windows(end - first, room)
            layout.append((first, end, spans))
            for a, b in spans:
                ids = head + it.input_ids[first + a:first + b] + tail
                windows.append(Item(ids, [False] * len(head) + [True] * (b - a) + [False] * len(tail), [], False))
        n_heads = 1 + len(extra)
        pooled = [[None] * len(windows) for _ in range(n_heads)]  # per head (own first), per window
        states = [None] * len(windows)
        for batch in self.batches(windows):
            ids, attn, content = self._collate([windows[i] for i in batch])
            hidden = self._hidden(ids, attn)
            for h, p in enumerate(self._pool(hidden, content, attn, list(extra.values()))):
                vecs = self._finish(p, normalize=False)  # raw window vectors
                for k, i in enumerate(batch):
                    pooled[h][i] = vecs[k]
            for k, i in enumerate(batch):
                states[i] = hidden[k, : len(windows[i].input_ids)]
        T = max(len(it.input_ids) for it in items)
        out = torch.zeros(len(items), T, states[0].shape[-1], device=self.device)
        means: list[list[Tensor]] = [[] for _ in range(n_heads)]  # per head, per passage
        w = 0
        for b, (it, (first, end, spans)) in enumerate(zip(items, layout)):
            mine = list(range(w, w + len(spans)))
            w += len(spans)
            for h in range(n_heads):
                means[h].append(torch.stack([pooled[h][i] for i in mine]).mean(0))
            out[b, :first] = states[mine[0]][:first]  # CLS and prompt from the first window
            for i, (a, bb) in zip(mine, spans):  # text tokens: later windows overwrite the overlap
                out[b, first + a:first + bb] = states[i][first:first + bb - a]
            n_tail = len(it.input_ids) - end
            if n_tail:
                out[b, end:len(it.input_ids)] = states[mine[-1]][-n_tail:]  # SEP from the last window
        vecs = [torch.stack(m) for m in means]  # (B, D) per head
        vecs = [F.normalize(v, dim=-1) if self.normalize else v for v in vecs]
        return out, vecs[0], dict(zip(extra, vecs[1:]))

    def _finish(self, x: Tensor, normalize: bool = True) -> Tensor:
        if self.head is not None:
            x = self.head(x).float()  # the head runs in fp32 outside autocast, as it was trained
        return F.normalize(x, dim=-1) if self.normalize and normalize else x


def window_of(config, tokenizer) -> int:
    """A model's usable context in tokens: its position table, capped by the tokenizer's limit."""
    limits = [getattr(config, "max_position_embeddings", None)]
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limits = [limits[0] - 2 if limits[0] else None]  # RoBERTa positions start after the padding id
    tok_max = getattr(tokenizer, "model_max_length", None)
    if tok_max and tok_max < 1_000_000:
        limits.append(tok_max)
    known = [x for x in limits if x]
    return min(known) if known else 512


def uses_rope(config) -> bool:
    """RoPE models can run past their window (badly, without an extension); learned-position ones cannot."""
    return bool(getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None)
                or getattr(config, "position_embedding_type", "absolute") == "rotary")


def check_length(config, window: int, requested: int | None) -> int:
    """The max_length to use: the window unless asked otherwise, refusing what positions cannot hold."""
    if requested is None:
        return window
    table = getattr(config, "max_position_embeddings", None)
    if requested > window and not uses_rope(config) and table and requested > table:
        raise ValueError(f"--max-length {requested} exceeds the {table} learned positions of this "
                         f"{config.model_type} model; use at most {window} or an extension method")
    return requested

