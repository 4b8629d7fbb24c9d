"""sentence-transformers modules of ours: late-chunk multi-vector pooling (``dewey-lab export --multi-vector``).

A multi-vector export is a stock ``MultiVectorEncoder`` (sentence-transformers >= 6) whose pipeline is

    Transformer  ->  LateChunkPooling (this file)  ->  [Dense]  ->  Normalize      (all on token_embeddings)

and it scores exactly as ``dewey-lab eval --mode multi`` (query_pooling ``chunk``) does: a query is the mean of
its text tokens (no CLS, SEP or prompt), a passage is one vector per late chunk (``chunk_size`` tokens,
``chunk_overlap`` apart, each the mean of its span of states from one pass over the whole passage), and
MaxSim over a one-vector query is ``max_c(q_mean . chunk_c)``, dewey_en_beta's multi-vector score.
Nothing to import from dewey_lab; it has to be installed, and sentence-transformers >= 6 imports a module
class outside its own namespace only with ``trust_remote_code=True`` (here that imports this installed file,
no code is downloaded)::

    from sentence_transformers import MultiVectorEncoder

    model = MultiVectorEncoder("models/tiny-student-multi", trust_remote_code=True)
    q = model.encode_query(["What is the pass key for Ana Lee?"])        # [(1, D)]: the query's mean
    d = model.encode_document(long_documents)                            # [(M_i, D)]: one row per late chunk
    scores = model.similarity(q, d)                                      # (Q, N): max over chunks of q . chunk
    out = model.encode_document(long_documents, output_value=None)       # + where each chunk lies
    spans = [o["chunk_spans"][o["attention_mask"]] for o in out]         # (M_i, 2) token [start, end)

Load it with ``MultiVectorEncoder``: ``SentenceTransformer(path)`` converts a multi-vector save to Transformer +
mean Pooling, dropping these chunks and the projection (sentence-transformers 6.3).

Token spans index ``tokenizer(prompt + text)["input_ids"]`` (special tokens included), as
``dewey_lab.encode.Chunks.token_spans`` do; a query's span is its run of text tokens. Passages are cut at
the Transformer's ``max_seq_length``, as ``dewey-lab eval`` cuts them at its ``max_length`` (for longer text
in bounded memory, ``dewey_lab.encode.load(ckpt).encode_chunks`` reads macro-windows).

Why a module of ours: sentence-transformers' token poolings are ``HierarchicalTokenPooling`` (Ward
clustering on vector similarity: which tokens merge depends on the vectors, not on their positions, and it
keeps protected tokens apart) and ``LambdaTokenPooling`` (a Python callable, which cannot be saved). None
pools fixed, overlapping position windows or reports spans, and a query's mean without CLS, SEP and prompt
needs the prompt length, which ``MultiVectorMask`` (a token-id skiplist) cannot see. The pooling itself is
the eval's own code: ``chunk_windows`` lays out the windows and the checkpoint's chunk head
(``ChunkMeanPooling``, or a trained one, saved with its config and weights) pools them, through
``TextAsChunk`` for queries.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from sentence_transformers.base.modules.module import Module
from torch import Tensor

from dewey_lab.eval.embedder import chunk_windows
from dewey_lab.model.pooling import ChunkMeanPooling, PoolingHead, TextAsChunk


def added_token_ids(tokenizer) -> list[int]:
    """Ids of the tokens a tokenizer adds around a text (CLS, SEP, PAD, BOS, EOS; not UNK or MASK, which stand
    inside it): never text, so never pooled."""
    tokens = (tokenizer.cls_token, tokenizer.sep_token, tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token)
    return sorted({tokenizer.convert_tokens_to_ids(t) for t in tokens if t is not None})


class LateChunkPooling(Module):
    """Token embeddings -> late-chunk vectors (documents) or the text-token mean (queries), with spans.

    Reads ``token_embeddings`` (B, T, H), ``attention_mask`` and ``input_ids`` (B, T), and ``prompt_length``
    (the Transformer's count of CLS + prompt tokens) when a prompt was prepended; writes

    * ``token_embeddings`` (B, M, H): M chunk vectors per document (zeros past a row's last chunk), or
      (B, 1, H) for ``task="query"``;
    * ``attention_mask`` (B, M) bool: which of those rows are chunks (what ``MultiVectorEncoder.encode``
      slices by, so a document comes back as (M_i, D));
    * ``chunk_spans`` (B, M, 2) long: each chunk's token [start, end) in the text's own tokens (-1 past the
      last chunk).

    Args:
        chunk_size, chunk_overlap: late-chunking windows in text tokens (``dewey-lab eval --chunk-size``,
            ``--chunk-overlap``).
        special_token_ids: ids never pooled (``added_token_ids``); None: the model's tokenizer's, once loaded.
        chunk_pooling: the chunk head's ``PoolingHead.config()`` record; None: ``ChunkMeanPooling``.
        hidden_size: the encoder's width, to build a chunk head with weights.
    """

    config_keys: ClassVar[list[str]] = ["chunk_size", "chunk_overlap", "special_token_ids", "chunk_pooling",
                                        "hidden_size"]
    forward_kwargs: ClassVar[set[str]] = {"task"}

    def __init__(self, chunk_size: int = 256, chunk_overlap: int = 64, special_token_ids: list[int] | None = None,
                 chunk_pooling: dict[str, Any] | None = None, hidden_size: int | None = None) -> None:
        super().__init__()
        if not 0 <= chunk_overlap < chunk_size:
            raise ValueError(f"chunk_overlap ({chunk_overlap}) must be >= 0 and below chunk_size ({chunk_size})")
        self.chunk_size, self.chunk_overlap, self.hidden_size = chunk_size, chunk_overlap, hidden_size
        self.special_token_ids = list(special_token_ids) if special_token_ids is not None else None
        head = PoolingHead.from_config(chunk_pooling, hidden_size) if chunk_pooling else ChunkMeanPooling()
        if head.whole:
            raise ValueError(f"chunk_pooling {type(head).__name__} is a whole-text head; give a chunk head")
        self.chunk_head = head

    @property
    def chunk_pooling(self) -> dict[str, Any]:
        return self.chunk_head.config()

    def on_model_ready(self, model) -> None:
        if self.special_token_ids is None and getattr(model, "tokenizer", None) is not None:
            self.special_token_ids = added_token_ids(model.tokenizer)

    def forward(self, features: dict[str, Tensor], task: str | None = None) -> dict[str, Tensor]:
        if "cu_seq_lens_q" in features:  # FA2 packed the batch flat: back to (B, T, ...) rows
            from sentence_transformers.util.tensor import repad_flattened_features

            features = repad_flattened_features(features)
        hidden = features["token_embeddings"]  # (B, T, H)
        attn = features["attention_mask"].bool()  # (B, T)
        B, T = attn.shape
        first = attn.int().argmax(1)  # (B,) a row's first real token: its CLS, whichever side pads
        pos = torch.arange(T, device=attn.device) - first.unsqueeze(1)  # (B, T) index into the text's tokens
        content = attn & (pos >= _prompt_length(features))  # text tokens: not CLS or prompt ...
        if self.special_token_ids:  # ... nor SEP or padding (dewey_lab.data.items.text_token_mask)
            special = torch.as_tensor(self.special_token_ids, device=attn.device)
            content &= ~torch.isin(features["input_ids"], special)
        rows = content.cpu().tolist()
        if task == "query":  # the query's mean, pooled as the passages' chunks are (Embedder.query_head("chunk"))
            batch = {"text_mask": content,
                     "token_doc": torch.where(attn, torch.arange(B, device=attn.device).unsqueeze(1), -1)}
            vectors = TextAsChunk(self.chunk_head)(hidden.float(), batch).to(hidden.dtype)  # (B, H)
            spans = [chunk_windows(r, T + 1, 0) or [(int(f), int(f) + 1)] for r, f in zip(rows, first)]  # the run
            out, mask = vectors.unsqueeze(1), attn.new_ones(B, 1)  # (B, 1, H), (B, 1)
        else:  # documents (task "document" or None): the eval's late-chunk windows, the checkpoint's chunk head
            spans = [chunk_windows(r, self.chunk_size, self.chunk_overlap) for r in rows]
            owner = torch.tensor([b for b, s in enumerate(spans) for _ in s], dtype=torch.long, device=attn.device)
            flat = torch.tensor([w for s in spans for w in s], dtype=torch.long, device=attn.device).view(-1, 2)
            vectors = self.chunk_head(hidden.float(), {"chunk_row": owner, "chunk_start": flat[:, 0],
                                                      "chunk_end": flat[:, 1]}).to(hidden.dtype)  # (N, H)
            M = max(1, max(map(len, spans)))
            out = hidden.new_zeros(B, M, hidden.shape[-1])  # (B, M, H)
            mask = attn.new_zeros(B, M)
            slot = torch.tensor([k for s in spans for k in range(len(s))], dtype=torch.long, device=attn.device)
            out[owner, slot], mask[owner, slot] = vectors, True
        table = torch.full((B, out.shape[1], 2), -1, dtype=torch.long)
        for b, s in enumerate(spans):
            if s:
                table[b, :len(s)] = torch.tensor(s, dtype=torch.long) - int(first[b])  # row index -> token index
        features["token_embeddings"], features["attention_mask"] = out, mask
        features["chunk_spans"] = table.to(attn.device)
        return features

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.save_config(output_path)
        if any(True for _ in self.chunk_head.parameters()):  # a trained chunk head keeps its weights
            self.save_torch_weights(output_path, safe_serialization=safe_serialization)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None,
             cache_folder: str | None = None, revision: str | None = None, local_files_only: bool = False,
             **kwargs) -> LateChunkPooling:
        hub = {"subfolder": subfolder, "token": token, "cache_folder": cache_folder, "revision": revision,
               "local_files_only": local_files_only}
        module = cls(**cls.load_config(model_name_or_path, **hub))
        if any(True for _ in module.chunk_head.parameters()):
            cls.load_torch_weights(model_name_or_path, model=module, **hub)
        return module


def _prompt_length(features: dict[str, Any]) -> int:
    """CLS + prompt tokens at the start of every row (0 without a prompt): an int at inference, a tensor of
    equal values from sentence-transformers' collators."""
    pl = features.get("prompt_length")
    if pl is None:
        return 0
    return int(pl.flatten()[0].item()) if isinstance(pl, Tensor) else int(pl)
