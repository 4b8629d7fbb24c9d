"""SelfExtend (arXiv 2401.01325): ModernBERT's global-attention layers (bidirectional) and the
attention layers of Llama-family decoders (Mistral, Llama, Qwen2/3: causal).

Within ``w`` tokens a query and key keep their true relative position; farther apart, both are
grouped by ``g`` and shifted by ``w - floor(w/g)`` so the grouped distances continue where the
neighbour window stops. A causal model only needs the lower triangle; an encoder needs both:

    d(i, j) = j - i                                     if |j - i| <= w
            = floor(j/g) - floor(i/g) + (w - floor(w/g))  if j > i + w   (keys after the query)
            = floor(j/g) - floor(i/g) - (w - floor(w/g))  if j < i - w   (keys before it)

RoPE logits depend only on the difference of the two rotation angles, so each case is one pair of
rotated q / k tensors: normal (i, j); keys after (floor(i/g), floor(j/g) + shift); keys before
(floor(i/g) + shift, floor(j/g)). The three logit matrices are merged by distance, which costs
O(L^2) memory per layer: fine to ~8k tokens on a CPU, and what the method costs anywhere.

A decoder sees keys before the query only: the causal mask keeps the lower triangle, which is the
original (causal) SelfExtend: query at floor(i/g) + shift, key at floor(j/g).
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from dewey_lab.eval.extension.scaling import _SCALE


def relative_positions(length: int, g: int, w: int) -> Tensor:
    """(L, L) effective key-minus-query distance d(i, j) that SelfExtend gives query i and key j."""
    pos = torch.arange(length)
    d = pos[None, :] - pos[:, None]  # j - i
    grouped = (pos // g)[None, :] - (pos // g)[:, None]
    shift = w - w // g
    return torch.where(d.abs() <= w, d, torch.where(d > 0, grouped + shift, grouped - shift))


def _rotate(x: Tensor, positions: Tensor, inv_freq: Tensor, scale: float) -> Tensor:
    """RoPE as ModernBERT applies it (rotate-half layout), at arbitrary integer positions."""
    freqs = positions[:, None].float() * inv_freq[None, :].float()  # (L, Dh/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def self_extend_logits(q: Tensor, k: Tensor, inv_freq: Tensor, g: int, w: int, scale: float = 1.0) -> Tensor:
    """Pre-softmax logits (B, H, L, L), before the 1/sqrt(d) factor, for un-rotated q, k (B, H, L, Dh)."""
    L = q.shape[2]
    pos = torch.arange(L, device=q.device)
    shift = w - w // g
    grouped = pos // g
    normal = _rotate(q, pos, inv_freq, scale) @ _rotate(k, pos, inv_freq, scale).transpose(-1, -2)
    after = _rotate(q, grouped, inv_freq, scale) @ _rotate(k, grouped + shift, inv_freq, scale).transpose(-1, -2)
    before = _rotate(q, grouped + shift, inv_freq, scale) @ _rotate(k, grouped, inv_freq, scale).transpose(-1, -2)
    d = pos[None, :] - pos[:, None]
    return torch.where(d.abs() <= w, normal, torch.where(d > 0, after, before))


def _attend(logits: Tensor, v: Tensor, attention_mask: Tensor | None, scaling: float, causal: bool = False) -> Tensor:
    """softmax(logits x scaling x each sequence's attention-scaling factor, masked) @ v: (B, H, L, Dh).

    ``attention_mask``: None, a flash-style (B, L) padding mask (keys only), a boolean mask (True: attend)
    or an additive one; ``causal`` also hides keys after the query (decoders)."""
    scaled = _SCALE.get(None)  # Extension(attention_scaling=True) is active: (B,) factors, one per sequence
    factor = scaled[1].to(logits.device).view(-1, 1, 1, 1) if scaled else 1.0
    logits = logits.float() * scaling * factor
    if causal:
        pos = torch.arange(logits.shape[-1], device=logits.device)
        logits = logits.masked_fill(pos[None, :] > pos[:, None], float("-inf"))  # keys after the query
    if attention_mask is not None and attention_mask.dim() == 2:
        attention_mask = attention_mask.bool()[:, None, None, :]
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attention_mask, float("-inf"))
        else:
            logits = logits + attention_mask
    return F.softmax(logits, dim=-1).to(v.dtype) @ v


def _forward(self, hidden_states: Tensor, position_embeddings=None, attention_mask=None, **kwargs):
    """Replacement forward of a global ModernBertAttention; same inputs and outputs as the original."""
    B, L, _ = hidden_states.shape
    qkv = self.Wqkv(hidden_states).view(B, L, 3, -1, self.head_dim)
    q, k, v = (x.transpose(1, 2) for x in qkv.unbind(dim=-3))  # (B, H, L, Dh)
    rotary = self._dewey_rotary
    logits = self_extend_logits(q, k, rotary.full_attention_inv_freq, self._dewey_g, self._dewey_w,
                                rotary.full_attention_attention_scaling)
    out = _attend(logits, v, attention_mask, self.head_dim ** -0.5)  # (B, H, L, Dh)
    out = out.transpose(1, 2).reshape(B, L, -1)
    return self.out_drop(self.Wo(out)), None


def _causal_forward(self, hidden_states: Tensor, position_embeddings=None, attention_mask=None, **kwargs):
    """Replacement forward of a Llama-family decoder attention (q/k/v/o projections, grouped key/value
    heads, Qwen3's q/k norms); same inputs and outputs as the original, no KV cache."""
    B, L, _ = hidden_states.shape
    shape = (B, L, -1, self.head_dim)
    q, k, v = self.q_proj(hidden_states).view(shape), self.k_proj(hidden_states).view(shape), \
        self.v_proj(hidden_states).view(shape)
    if getattr(self, "q_norm", None) is not None:  # Qwen3 normalises q and k per head before RoPE
        q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H or H_kv, L, Dh)
    k, v = (x.repeat_interleave(self.num_key_value_groups, dim=1) for x in (k, v))
    rotary = self._dewey_rotary
    logits = self_extend_logits(q, k, rotary.inv_freq, self._dewey_g, self._dewey_w, rotary.attention_scaling)
    out = _attend(logits, v, attention_mask, self.scaling, causal=True)  # (B, H, L, Dh)
    return self.o_proj(out.transpose(1, 2).reshape(B, L, -1)), None


def decoder_fits(model) -> bool:
    """A Llama-family decoder whose attention this module can replace (one rotary table for all layers)."""
    layers = getattr(model, "layers", None)
    attn = getattr(layers[0], "self_attn", None) if layers else None
    return (attn is not None and all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj"))
            and hasattr(getattr(model, "rotary_emb", None), "inv_freq"))


@contextmanager
def self_extend_layers(model, g: int, w: int):
    """Inside the block, ModernBERT's global attention layers (local ones are untouched: distances never
    exceed their window) or every attention layer of a decoder use SelfExtend(g, w)."""
    patched = []
    for layer in model.layers:
        attn = getattr(layer, "attn", None) or layer.self_attn
        if getattr(attn, "sliding_window", None) is not None and hasattr(layer, "attn"):  # ModernBERT local layer
            continue
        attn._dewey_rotary, attn._dewey_g, attn._dewey_w = model.rotary_emb, g, w
        attn.forward = types.MethodType(_forward if hasattr(layer, "attn") else _causal_forward, attn)
        patched.append(attn)
    try:
        yield
    finally:
        for attn in patched:
            del attn.forward, attn._dewey_rotary, attn._dewey_g, attn._dewey_w
