"""A second implementation of LongEmbed's plug-and-play extensions, written from the definitions in its
reference code (dwzhu-pku/LongEmbed, ``src/encoder_model.py``: ``get_position_ids`` and
``encode_corpus``; ``src/utils.py``: ``get_chunked_docs`` and ``pool``), one text at a time, in the
plainest torch. The tests hold ``dewey_lab.eval.extension.methods`` to these; nothing here imports it.

Definitions carried over (our code, their facts), for an APE encoder with window ``L_o`` (512) and
target ``L_t``:

* group:       factor = ceil(n / L_o); position pid -> pid // factor
* recurrent:   pid -> pid % L_o
* interpolate: factor = max(L_t // L_o, 1); an input of n <= L_o tokens gets pid * factor, a longer
  one pid, both on the interpolated table E_t[i * factor] = E_o[i], linear between
* chunk (PCW): text tokens (no specials) cut at L_t - 2; windows of L_o - 2 text tokens at 0, room,
  2 room, ...; the window that would run past the end is the final L_o - 2 tokens instead, and ends
  the list; each window is [CLS] + tokens + [SEP]; the windows' raw average-pooled vectors are
  averaged, then L2-normalised.
* pooling "avg": mean of the last hidden state over the attention mask; then L2-normalised.

Where we differ from the reference, on purpose: it decides per padded batch, we per text (n is the
text's own length), and PCW windows are fed as token ids (the reference decodes them to text and
tokenises again, which can shift a token at a window's edge).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_positions(mode: str, n: int, original: int, target: int) -> list[int]:
    """Position ids the reference gives one input of ``n`` tokens."""
    pids = list(range(n))
    if mode == "group":
        factor = math.ceil(n / original)
        return [p // factor for p in pids]
    if mode == "recurrent":
        return [p % original for p in pids]
    if mode == "interpolate":
        factor = max(target // original, 1)
        return [p * factor for p in pids] if n <= original else pids
    return pids


def interpolated_table(weight: torch.Tensor, factor: int, rows: int) -> torch.Tensor:
    """(rows, H): E_t[i * factor] = E_o[i], linear in between (align_corners interpolation over the
    (L_o - 1) * factor + 1 rows that span the original table), the last original row held after it."""
    span = (weight.shape[0] - 1) * factor + 1
    inner = F.interpolate(weight.T[None].double(), size=span, mode="linear", align_corners=True)[0].T
    if rows > span:
        inner = torch.cat([inner, inner[-1:].expand(rows - span, -1)])
    return inner[:rows].to(weight.dtype)


@torch.no_grad()
def _avg(model, ids: list[int], positions: list[int] | None = None, table: torch.Tensor | None = None) -> torch.Tensor:
    """The raw "avg" vector (H,) of one unpadded input, optionally at given positions / on another table."""
    x = torch.tensor([ids])
    kwargs = {"attention_mask": torch.ones_like(x), "token_type_ids": torch.zeros_like(x)}
    if positions is not None:
        kwargs["position_ids"] = torch.tensor([positions])
    emb = model.embeddings.position_embeddings
    saved = emb.weight.data
    if table is not None:
        emb.weight.data = table
    try:
        hidden = model(input_ids=x, **kwargs).last_hidden_state[0]
    finally:
        emb.weight.data = saved
    return hidden.mean(0)


def reference_encode(model, tokenizer, text: str, mode: str, original: int, target: int) -> torch.Tensor:
    """A passage vector as the reference computes it for ``mode`` in original / group / recurrent /
    interpolate, the input cut at ``target`` tokens (specials included)."""
    ids = tokenizer(text, truncation=True, max_length=target)["input_ids"]
    positions = reference_positions(mode, len(ids), original, target)
    table = None
    if mode == "interpolate":
        factor = max(target // original, 1)
        table = interpolated_table(model.embeddings.position_embeddings.weight.data, factor, original * factor)
    return F.normalize(_avg(model, ids, positions, table), dim=-1)


def reference_pcw(model, tokenizer, text: str, original: int, target: int) -> torch.Tensor:
    """A passage vector by the reference's "chunk" mode (PCW)."""
    tokens = tokenizer(text, add_special_tokens=False, truncation=True, max_length=target - 2)["input_ids"]
    room = original - 2  # for [CLS] and [SEP]
    windows = []
    for start in range(0, len(tokens), room):
        if start + room > len(tokens):
            windows.append(tokens[-room:])
            break
        windows.append(tokens[start:start + room])
    raw = [_avg(model, [tokenizer.cls_token_id, *w, tokenizer.sep_token_id]) for w in windows]
    return F.normalize(torch.stack(raw).mean(0), dim=-1)


# -- RoPE (ModernBERT): the global layers' rotations, from a config, and SelfExtend by its distances ---
def self_extend_distance(length: int, group: int, window: int) -> torch.Tensor:
    """(L, L) key-minus-query distance under bidirectional SelfExtend, case by case from the paper."""
    out = torch.zeros(length, length, dtype=torch.long)
    shift = window - window // group
    for i in range(length):
        for j in range(length):
            if abs(j - i) <= window:
                out[i, j] = j - i
            elif j > i:
                out[i, j] = j // group - i // group + shift
            else:
                out[i, j] = j // group - i // group - shift
    return out


def self_extend_attention(module, hidden: torch.Tensor, inv_freq: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """One ModernBERT attention layer with each (query, key) pair rotated by its SelfExtend distance:
    RoPE in rotate-half layout as complex numbers, logit = Re(sum q conj(k) e^{-i d theta})."""
    B, L, _ = hidden.shape
    qkv = module.Wqkv(hidden).view(B, L, 3, -1, module.head_dim)
    q, k, v = (x.transpose(1, 2).double() for x in qkv.unbind(dim=2))  # (B, H, L, Dh)
    half = module.head_dim // 2
    qc, kc = torch.complex(q[..., :half], q[..., half:]), torch.complex(k[..., :half], k[..., half:])
    phase = torch.exp(-1j * distance[..., None].double() * inv_freq.double())  # (L, L, Dh/2)
    logits = (qc[:, :, :, None, :] * kc[:, :, None, :, :].conj() * phase).real.sum(-1)  # (B, H, L, L)
    attn = torch.softmax(logits * module.head_dim ** -0.5, dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(B, L, -1).to(hidden.dtype)
    return module.Wo(out)


def causal_self_extend_attention(module, hidden: torch.Tensor, inv_freq: torch.Tensor,
                                 distance: torch.Tensor) -> torch.Tensor:
    """One Llama-family attention layer (grouped key/value heads) with each pair rotated by its SelfExtend
    distance and keys after the query masked out."""
    B, L, _ = hidden.shape
    q = module.q_proj(hidden).view(B, L, -1, module.head_dim).transpose(1, 2).double()
    k = module.k_proj(hidden).view(B, L, -1, module.head_dim).transpose(1, 2).double()
    v = module.v_proj(hidden).view(B, L, -1, module.head_dim).transpose(1, 2).double()
    group = q.shape[1] // k.shape[1]  # query heads per key/value head
    k, v = k[:, [h // group for h in range(q.shape[1])]], v[:, [h // group for h in range(q.shape[1])]]
    half = module.head_dim // 2
    qc, kc = torch.complex(q[..., :half], q[..., half:]), torch.complex(k[..., :half], k[..., half:])
    phase = torch.exp(-1j * distance[..., None].double() * inv_freq.double())
    logits = (qc[:, :, :, None, :] * kc[:, :, None, :, :].conj() * phase).real.sum(-1) * module.head_dim ** -0.5
    future = torch.ones(L, L, dtype=torch.bool).triu(1)
    attn = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
    return module.o_proj((attn @ v).transpose(1, 2).reshape(B, L, -1).to(hidden.dtype))
