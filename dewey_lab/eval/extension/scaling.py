"""Attention scaling at inference: logits x max(1, log L / log L_o), L each sequence's own length.

LongEmbed (section 4) reports that this helps extrapolation; every extension method can turn it on
(``attention_scaling``). It is a registered transformers attention backend (``dewey_scaled``) that
wraps the model's own (sdpa-family) backend for the duration of a ``scaled_attention`` block;
SelfExtend's patched attention reads the same per-sequence factors.
"""

from __future__ import annotations

import contextvars
import math
from contextlib import contextmanager

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from dewey_lab.model.attention import BANDED

_SCALE: contextvars.ContextVar[tuple[str, Tensor]] = contextvars.ContextVar("dewey_attention_scale")
SCALED = "dewey_scaled"


def length_scale(lengths: Tensor, original: int) -> Tensor:
    """(B,) max(1, log L / log L_o) for each sequence's own length L."""
    return (torch.log(lengths.double().clamp_min(1)) / math.log(original)).clamp_min(1.0).float()


def _scaled_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    base, factor = _SCALE.get()  # factor: (B,) one per sequence
    if getattr(module, "sliding_window", None) is None:  # ModernBERT's local layers keep their scale
        # logits x f_b for row b: scaling the queries of row b by f_b is the same thing
        query = query * factor.to(query.device, query.dtype).view(-1, 1, 1, 1)
    return ALL_ATTENTION_FUNCTIONS[base](module, query, key, value, attention_mask, scaling=scaling, **kwargs)


AttentionInterface.register(SCALED, _scaled_attention)
# transformers builds no mask at all for an attention name it has no mask function for
AttentionMaskInterface.register(SCALED, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


@contextmanager
def scaled_attention(model, lengths: Tensor, original: int):
    """Attention logits x max(1, log L / log L_o) inside the block, L each row's own length in
    ``lengths`` (B,) (sdpa-family backends). The reference (its BERT path) does the same per sequence."""
    config = model.config
    base = config._attn_implementation
    if base not in ("sdpa", BANDED):
        raise ValueError(f"attention_scaling needs the sdpa attention backend, not {base}; "
                         "load the model with attn_implementation sdpa")
    token = _SCALE.set((base, length_scale(torch.as_tensor(lengths).reshape(-1), original)))
    config._attn_implementation = SCALED
    try:
        yield
    finally:
        config._attn_implementation = base
        _SCALE.reset(token)
