"""Memory-light SDPA for ModernBERT at long length, where flash-attn is absent (CPU, or a GPU without it).

transformers' SDPA path builds dense (B, 1, L, L) masks for ModernBERT's global *and* sliding-window
layers, and a masked SDPA falls back to kernels that materialise (B, H, L, L) scores: a 32k-token
passage through the tiny student peaked at 16.8 GiB on CPU. Here instead:

* global layers get no mask when nothing is padded (SDPA then takes its fused, O(L) memory kernel)
  and a (B, 1, 1, L) key-padding mask otherwise;
* sliding-window layers attend block by block: queries [s, s+block) see keys [s-w, s+block+w),
  so memory is O(L x (block + 2w)), not O(L^2).

Outputs equal the dense path's (tested); it is registered as the attention implementation
``sdpa_banded`` and switched on only around a forward pass (``banded(model)``).

``forward_rows(model, batch)`` runs a collated batch, packed or not: a packed batch gets
per-document positions and either ``cu_seqlens`` (flash-attn varlen: no mask, no padding cost)
or a block-diagonal mask (eager) so that no token sees another document. On ModernBERT's SDPA path
each packed text attends on its own (``row_spans``): a global layer runs one unmasked SDPA per text
(sum(n_i^2) scores, not T^2) and a sliding layer runs ``banded_sdpa`` in 256-query blocks within the
text, so no layer builds or reads a (T, T) mask. Measured on the small student, 4 x 2,048 packed tokens,
forward + backward: 1.59x (fp32) and 1.45x (bf16) the dense-mask path (``benchmarks/packed_attention.py``).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

BANDED = "sdpa_banded"


def banded_sdpa(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                dropout: float = 0.0, scaling: float | None = None, sliding_window: int | None = None,
                block: int = 1024, row_spans: list[list[tuple[int, int]]] | None = None,
                **kwargs) -> tuple[Tensor, None]:
    """transformers attention interface: (B, H, L, Dh) q/k/v -> ((B, L, H, Dh), None).

    ``attention_mask`` is None, a boolean key mask (B, 1, 1, L), True where a token is real, or a boolean
    (B, 1, L, L) mask, sliced to each block's queries and keys. ``row_spans``
    (packed rows, ``forward_rows``): for each row the ``[start, end)`` of each text, padding its own span,
    covering the row; each text then attends on its own and no mask is built (the mask is ignored).
    """
    if row_spans is not None:
        rows = [torch.cat([_attend(query[r:r + 1, :, a:b], key[r:r + 1, :, a:b], value[r:r + 1, :, a:b], None,
                                   dropout, scaling, sliding_window, block) for a, b in spans], dim=2)
                for r, spans in enumerate(row_spans)]
        out = torch.cat(rows, dim=0)
    else:
        out = _attend(query, key, value, attention_mask, dropout, scaling, sliding_window, block)
    return out.transpose(1, 2).contiguous(), None  # (B, L, H, Dh)


def _attend(query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, dropout: float,
            scaling: float | None, sliding_window: int | None, block: int) -> Tensor:
    """(B, H, L, Dh) attention output: unwindowed (a global layer), or ``sliding_window`` in ``block``-query
    blocks; ``attention_mask`` as ``banded_sdpa`` takes it."""
    if sliding_window is None:  # a global layer
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                              scale=scaling)
    w = sliding_window - 1  # ModernBERT passes half-window + 1 (flash-attn's inclusive bound)
    L = query.shape[2]
    outs = []
    for s in range(0, L, block):
        e = min(s + block, L)
        ks, ke = max(0, s - w), min(L, e + w)
        mask = None
        if ke - 1 - s > w or e - 1 - ks > w:  # else every query of the block sees every key: no band to apply
            q_pos = torch.arange(s, e, device=query.device)[:, None]
            k_pos = torch.arange(ks, ke, device=query.device)[None, :]
            mask = (q_pos - k_pos).abs() <= w  # (bq, bk): the band
        if attention_mask is not None:  # a key mask, or a (B, 1, L, L) one sliced to the block's queries
            rows = attention_mask[..., s:e, :] if attention_mask.shape[-2] == L else attention_mask
            mask = rows[..., ks:ke] if mask is None else mask & rows[..., ks:ke]
        outs.append(F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, ks:ke], value[:, :, ks:ke],
                                                   attn_mask=mask, dropout_p=dropout, scale=scaling))
    return torch.cat(outs, dim=2)


AttentionInterface.register(BANDED, banded_sdpa)
AttentionMaskInterface.register(BANDED, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # else transformers builds no mask
# Packed training rows (2k tokens, a 128-token window): 256-query blocks read 384 keys each instead of 2,048;
# with the document mask sliced per block (before each text attended alone) measured 1.31x (fp32) and 1.22x
# (bf16) per forward + backward of the small student on 4 x 2,048 packed tokens against dense document masks,
# 1.14x / 1.16x with 1,024-query blocks (2 CPU cores).
PACKED_BLOCK = 256
BANDED_PACKED = "sdpa_banded_packed"
AttentionInterface.register(BANDED_PACKED, functools.partial(banded_sdpa, block=PACKED_BLOCK))
AttentionMaskInterface.register(BANDED_PACKED, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def can_band(model) -> bool:
    """ModernBERT on the SDPA or eager path (flash-attn and flex already handle the window)."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", "") == "modernbert" and config._attn_implementation in ("sdpa", "eager")


def key_masks(attention_mask: Tensor) -> dict[str, Tensor | None]:
    """The per-layer-type masks ``banded_sdpa`` expects, from a (B, L) 0/1 attention mask."""
    keys = None if bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
    return {"full_attention": keys, "sliding_attention": keys}


@contextmanager
def banded(model, impl: str = BANDED):
    """Run ``model`` with ``banded_sdpa`` (``impl``: its registered name, ``BANDED_PACKED`` for packed rows'
    smaller blocks) inside the block; restores its attention implementation."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = impl
    try:
        yield
    finally:
        config._attn_implementation = before


TORCH_VARLEN = "torch_varlen"


@functools.cache
def _torch_varlen_attn():
    """torch's own FlashAttention varlen kernel with sliding windows, or None where this torch lacks it
    (feature-detected: ``torch.nn.attention.varlen.varlen_attn`` taking ``window_size``)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    import inspect

    return varlen_attn if "window_size" in inspect.signature(varlen_attn).parameters else None


def has_torch_varlen() -> bool:
    """CUDA present and this torch ships ``varlen_attn`` with sliding windows."""
    return torch.cuda.is_available() and _torch_varlen_attn() is not None


def torch_varlen_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                           dropout: float = 0.0, scaling: float | None = None, sliding_window: int | None = None,
                           cu_seq_lens_q: Tensor | None = None, cu_seq_lens_k: Tensor | None = None,
                           max_length_q: int | None = None, max_length_k: int | None = None,
                           **kwargs) -> tuple[Tensor, None]:
    """transformers attention interface over ``torch.nn.attention.varlen.varlen_attn``: (B, H, L, Dh) q/k/v
    -> ((B, L, H, Dh), None), with no (L, L) mask anywhere.

    * Packed rows (``forward_rows`` passes ``cu_seq_lens_q``; B = 1, every text one segment) go to the
      kernel as they are.
    * A padded batch (``dewey-lab eval``: ``attention_mask`` is the (B, L) 0/1 mask, as transformers gives
      flash-attn) is unpadded into segments first and scattered back, padding rows left at 0.

    ModernBERT's local layers attend ``sliding_window - 1`` tokens each side (flash-attn's inclusive
    bound, as transformers passes it); global layers are unwindowed.
    """
    if dropout:
        raise ValueError("attention dropout is not supported by torch's varlen kernel; set it to 0 (ModernBERT's "
                         "default) or use attn_implementation sdpa")
    w = sliding_window - 1 if sliding_window is not None else -1
    B, H, L, Dh = query.shape
    q, k, v = (x.transpose(1, 2).reshape(B * L, x.shape[1], Dh) for x in (query, key, value))  # (B*L, H, Dh)
    keep = None
    if cu_seq_lens_q is None:  # one text per row: its real tokens are one segment
        lengths = (attention_mask.sum(1) if attention_mask is not None
                   else torch.full((B,), L, device=query.device)).to(torch.int32)
        cu_seq_lens_q = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        max_length_q = int(lengths.max())
        if attention_mask is not None and not bool(attention_mask.all()):
            keep = attention_mask.reshape(-1).bool().nonzero().squeeze(1)  # (tokens,)
            q, k, v = q[keep], k[keep], v[keep]
    cu_k = cu_seq_lens_k if cu_seq_lens_k is not None else cu_seq_lens_q
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    out = _torch_varlen_attn()(q, k, v, cu_seq_lens_q, cu_k, int(max_length_q), int(max_length_k or max_length_q),
                               scale=scaling, window_size=(w, w), **gqa)
    if keep is not None:
        out = out.new_zeros(B * L, H, Dh).index_copy_(0, keep, out)
    return out.reshape(B, L, H, Dh), None


AttentionInterface.register(TORCH_VARLEN, torch_varlen_attention)
# the mask transformers builds for flash-attn: None, or the (B, L) padding mask (never an (L, L) one)
AttentionMaskInterface.register(TORCH_VARLEN, ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])

VARLEN = {"flash_attention_2", "flash_attention_3", TORCH_VARLEN}
"""Attention implementations that read ``cu_seq_lens_q``/``_k`` (varlen kernels) for packed rows."""


def forward_rows(model, batch: dict[str, Tensor]) -> Tensor:
    """Last hidden state (R, T, H) of a collated batch (``datamodule.collate``), packed or not."""
    ids = batch["input_ids"]
    if "position_ids" not in batch:  # one text per row
        return model(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state
    impl = model.config._attn_implementation
    if impl in VARLEN:  # all rows as one sequence; the kernel keeps each segment to itself
        R, T = ids.shape
        cu, longest = batch["cu_seqlens"], int(batch["max_seqlen"])
        out = model(input_ids=ids.reshape(1, R * T), position_ids=batch["position_ids"].reshape(1, R * T),
                    cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        return out.last_hidden_state.reshape(R, T, -1)
    if impl not in ("sdpa", "eager", BANDED, BANDED_PACKED):
        raise ValueError(f"data.batching.pack needs attention sdpa, eager or flash_attention_2, not {impl}; "
                         "set model.student.attn_implementation: auto, or data.batching.pack: false")
    if impl == "sdpa" and can_band(model):  # each text on its own: sum(n_i^2) scores, not T^2, and no mask
        with banded(model, BANDED_PACKED):
            out = model(input_ids=ids, position_ids=batch["position_ids"],
                        attention_mask={"full_attention": None, "sliding_attention": None},
                        row_spans=row_spans(batch["token_doc"]))
        return out.last_hidden_state
    masks = document_masks(batch["token_doc"], model.config.sliding_window)
    if impl == "eager":  # eager adds its mask to the scores
        low = torch.finfo(model.dtype).min
        masks = {k: torch.zeros(m.shape, dtype=model.dtype, device=m.device).masked_fill(~m, low)
                 for k, m in masks.items()}
    return model(input_ids=ids, position_ids=batch["position_ids"], attention_mask=masks).last_hidden_state


def row_spans(token_doc: Tensor) -> list[list[tuple[int, int]]]:
    """For each packed row, the ``[start, end)`` of each run of one document id (padding, -1, is a run too)."""
    R, T = token_doc.shape
    cuts = (token_doc[:, 1:] != token_doc[:, :-1]).nonzero().tolist()  # (row, i): a new run starts at i + 1
    bounds: list[list[int]] = [[0] for _ in range(R)]
    for r, i in cuts:
        bounds[r].append(i + 1)
    return [list(zip(b, b[1:] + [T])) for b in bounds]


def document_masks(token_doc: Tensor, half_window: int | None) -> dict[str, Tensor]:
    """Boolean (R, 1, T, T) masks, True where query i may see key j: same document (padding is its
    own group, so no query row is empty), and for sliding layers also ``|i - j| <= half_window``
    (None: no band, the sliding mask is the document mask)."""
    same = token_doc[:, None, :, None] == token_doc[:, None, None, :]
    if half_window is None:
        return {"full_attention": same, "sliding_attention": same}
    pos = torch.arange(token_doc.shape[1], device=token_doc.device)
    band = (pos[:, None] - pos[None, :]).abs() <= half_window
    return {"full_attention": same, "sliding_attention": same & band}
