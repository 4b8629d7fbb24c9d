"""Training-free context-window extension (LongEmbed, arXiv 2404.12096, section 4), as swappable classes.

With ``L_o`` the model's window, ``L_t`` the target length and ``s = ceil(L_t / L_o)``:

| class | models | what changes |
|---|---|---|
| ``PCW`` | any | split into L_o-token windows (the last one = the final tokens), embed each, average |
| ``GroupedPositions`` (gp) | APE | position id -> floor(pid / s) |
| ``RecurrentPositions`` (rp) | APE | position id -> pid mod L_o |
| ``PositionInterpolation`` (pi) | APE, RoPE | APE: table E_t[i*s] = E_o[i], linear between; RoPE: positions / s |
| ``NTK`` | RoPE | theta -> theta * lambda (default lambda = s^(d/(d-2)), "slightly above s") |
| ``YaRN`` | RoPE | per-frequency blend of interpolation and extrapolation + temperature (transformers' yarn) |
| ``SelfExtend`` | ModernBERT | normal relative positions within ``window``, grouped by ``group`` beyond, both triangles |

Every method may also scale attention logits by max(1, log L / log L_o) (``attention_scaling``).
On ModernBERT position changes touch the global-attention layers only: local layers never see a
distance beyond their 128-token window. With s = 1 every method is the unextended model.

Select one from the CLI (``--extension pi``, ``--extension "selfextend(group=9,window=64)"``) or
YAML (``class_path: dewey_lab.eval.extension.NTK``, ``init_args: {factor: 10}``).
"""

from __future__ import annotations

import contextvars
import copy
import inspect
import math
import re
from contextlib import ExitStack, contextmanager
from typing import ClassVar

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from dewey_lab.attention import BANDED
from dewey_lab.eval.embedder import uses_rope

POSITION_OFFSET = {"roberta": 1, "xlm-roberta": 1, "camembert": 1}  # positions start at pad_id + 1


class Extension:
    """Base class. ``bind()`` checks the model and fixes s; ``forward()`` runs it extended.

    Args:
        factor: the method's scale (s for GP / RP / PI, lambda for NTK, s for YaRN); None derives
            it from the target length.
        attention_scaling: multiply attention logits by max(1, log L / log L_o).
    """

    name: ClassVar[str] = ""
    fits: ClassVar[tuple[str, ...]] = ("ape", "rope")
    max_factor: ClassVar[float] = 64.0
    splits: ClassVar[bool] = False  # True: the Embedder splits passages into windows (PCW)

    def __init__(self, factor: float | None = None, attention_scaling: bool = False) -> None:
        self.factor, self.attention_scaling = factor, attention_scaling
        self.original = self.target = 0
        self.s = 1

    def __repr__(self) -> str:
        """The spec that rebuilds it: ``pi``, ``ntk(factor=10)``; arguments left at their default are omitted."""
        defaults = {k: p.default for k, p in inspect.signature(type(self).__init__).parameters.items()}
        args = {k: getattr(self, k) for k in self._args() if getattr(self, k) != defaults.get(k)}
        return self.name + (f"({', '.join(f'{k}={v}' for k, v in args.items())})" if args else "")

    def _args(self) -> tuple[str, ...]:
        return ("factor", "attention_scaling")

    # -- binding -----------------------------------------------------------------------------------
    def bind(self, model: nn.Module, original: int, target: int) -> Extension:
        """Check the method fits ``model`` and set s = ceil(target / original); one-line errors."""
        kind = "rope" if uses_rope(model.config) else "ape"
        if kind not in self.fits:
            other = ", ".join(c.name for c in _methods() if kind in c.fits)
            kinds = {"ape": "learned-position", "rope": "RoPE"}
            raise ValueError(f"extension {self.name} needs a {' or '.join(kinds[m] for m in self.fits)} model, but "
                             f"{model.config.model_type} has {'RoPE' if kind == 'rope' else 'learned absolute'} "
                             f"positions; use one of: {other}")
        self.original, self.target = original, max(target, original)
        self.s = math.ceil(self.target / original)
        scale = self.factor if self.factor is not None else self.s
        if scale > self.max_factor or scale < 1:
            raise ValueError(f"extension {self.name}: factor {scale:g} is outside [1, {self.max_factor:g}] "
                             f"(window {original} -> {self.target}); use a shorter --max_length or PCW")
        return self

    # -- running -----------------------------------------------------------------------------------
    def forward(self, model: nn.Module, ids: Tensor, attn: Tensor) -> Tensor:
        """Last hidden state (B, T, H) of the extended model."""
        with ExitStack() as stack:
            kwargs = stack.enter_context(self.patched(model, ids.shape[1]))
            if self.attention_scaling:
                stack.enter_context(scaled_attention(model, ids.shape[1], self.original))
            return model(input_ids=ids, attention_mask=attn, **kwargs).last_hidden_state

    @contextmanager
    def patched(self, model: nn.Module, length: int):
        """Subclasses change the model (or forward arguments) inside this block."""
        yield {}


class PCW(Extension):
    """Parallel context windows: L_o-token windows embedded apart, their embeddings averaged.

    Hidden states are stitched back in token order (each token from its window; the last window
    wins where it overlaps), so late chunking still works; the single vector is the mean of the
    windows' pooled vectors, as LongEmbed defines PCW.
    """

    name = "pcw"
    splits = True

    def windows(self, n_text: int, room: int) -> list[tuple[int, int]]:
        """Text-token windows of ``room`` tokens, no overlap except the last, which ends at the end."""
        if n_text <= room:
            return [(0, n_text)]
        spans = [(a, a + room) for a in range(0, n_text - room, room)]
        return [*spans, (n_text - room, n_text)]


class GroupedPositions(Extension):
    """GP: position id -> floor(pid / s); s neighbours share a position."""

    name = "gp"
    fits = ("ape",)

    def position_ids(self, length: int) -> Tensor:
        return torch.arange(length) // int(self.factor or self.s)

    @contextmanager
    def patched(self, model, length):
        yield _ape_kwargs(model, self.position_ids(length))


class RecurrentPositions(Extension):
    """RP: position id -> pid mod L_o; positions restart every L_o tokens."""

    name = "rp"
    fits = ("ape",)

    def position_ids(self, length: int) -> Tensor:
        return torch.arange(length) % self.original

    @contextmanager
    def patched(self, model, length):
        yield _ape_kwargs(model, self.position_ids(length))


class PositionInterpolation(Extension):
    """PI. APE: a longer table with E_t[i*s] = E_o[i] and linear steps between (beyond the last
    original row the table holds it). RoPE: every position divided by s (inv_freq / s)."""

    name = "pi"
    max_factor = 32.0  # beyond this neighbouring positions are < 1/32 apart: indistinguishable

    def table(self, weight: Tensor, length: int) -> Tensor:
        """(length, H) interpolated position table from the original (L_o, H) one."""
        s = float(self.factor or self.s)
        pos = (torch.arange(length, dtype=torch.float64) / s).clamp(max=weight.shape[0] - 1)
        lo = pos.floor().long()
        hi = (lo + 1).clamp(max=weight.shape[0] - 1)
        frac = (pos - lo).unsqueeze(1).to(weight.dtype)
        return weight[lo] * (1 - frac) + weight[hi] * frac

    @contextmanager
    def patched(self, model, length):
        s = float(self.factor or self.s)
        if uses_rope(model.config):
            with _global_rope(model, lambda inv, scale: (inv / s, scale)):
                yield {}
            return
        emb = model.embeddings
        old = emb.position_embeddings
        offset = POSITION_OFFSET.get(model.config.model_type, 0) * (model.config.pad_token_id + 1)
        weight = old.weight[offset:]
        table = self.table(weight, length)
        emb.position_embeddings = nn.Embedding.from_pretrained(torch.cat([old.weight[:offset], table]), freeze=True)
        try:
            yield _ape_kwargs(model, torch.arange(length))
        finally:
            emb.position_embeddings = old


class NTK(Extension):
    """NTK-aware: theta -> theta * lambda on the global layers; lambda defaults to s^(d/(d-2))."""

    name = "ntk"
    fits = ("rope",)
    max_factor = 1e4

    def lam(self, head_dim: int) -> float:
        return float(self.factor) if self.factor is not None else self.s ** (head_dim / (head_dim - 2))

    @contextmanager
    def patched(self, model, length):
        def scale(inv: Tensor, attn_scale: float):
            d = 2 * inv.numel()
            # inv_freq_i = theta^(-2i/d)  ->  (theta * lambda)^(-2i/d) = inv_freq_i * lambda^(-2i/d)
            return inv * self.lam(d) ** (-torch.arange(0, d, 2, dtype=inv.dtype, device=inv.device) / d), attn_scale

        with _global_rope(model, scale):
            yield {}


class YaRN(Extension):
    """YaRN (arXiv 2309.00071) on the global layers, via transformers' own yarn parameters."""

    name = "yarn"
    fits = ("rope",)

    def __init__(self, factor: float | None = None, attention_scaling: bool = False, beta_fast: float = 32.0,
                 beta_slow: float = 1.0) -> None:
        super().__init__(factor, attention_scaling)
        self.beta_fast, self.beta_slow = beta_fast, beta_slow

    def _args(self):
        return ("factor", "attention_scaling", "beta_fast", "beta_slow")

    @contextmanager
    def patched(self, model, length):
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        layer_type = _global_type(model)
        config = copy.deepcopy(model.config)
        params = dict(config.rope_parameters[layer_type] if layer_type else config.rope_parameters)
        params.update(rope_type="yarn", factor=float(self.factor or self.s), beta_fast=self.beta_fast,
                      beta_slow=self.beta_slow, original_max_position_embeddings=self.original)
        if layer_type:
            config.rope_parameters[layer_type] = params
        else:
            config.rope_parameters = params
        inv, attn_scale = ROPE_INIT_FUNCTIONS["yarn"](config, None, layer_type=layer_type)
        with _global_rope(model, lambda old, _: (inv.to(old), attn_scale)):
            yield {}


class SelfExtend(Extension):
    """SelfExtend, bidirectional (ModernBERT global layers).

    Query i and key j at distance |i - j| <= ``window`` keep their relative position; beyond it both
    are grouped: distance floor(j/g) - floor(i/g) + (window - floor(window/g)), mirrored for keys
    before the query. Defaults follow LongEmbed's settings: window = L_o / 8, group = s + 1 (s > 1).
    """

    name = "selfextend"
    fits = ("rope",)

    def __init__(self, group: int | None = None, window: int | None = None, attention_scaling: bool = False) -> None:
        super().__init__(None, attention_scaling)
        self.group, self.window = group, window

    def _args(self):
        return ("group", "window", "attention_scaling")

    def bind(self, model, original, target):
        super().bind(model, original, target)
        if model.config.model_type != "modernbert":
            raise ValueError(f"extension selfextend is built for ModernBERT's global layers, not "
                             f"{model.config.model_type}; use ntk, pi or yarn")
        self.g = self.group if self.group is not None else (self.s + 1 if self.s > 1 else 1)
        self.w = self.window if self.window is not None else max(1, original // 8)
        return self

    @contextmanager
    def patched(self, model, length):
        from dewey_lab.eval.self_extend import self_extend_layers

        with self_extend_layers(model, self.g, self.w):
            yield {}


# -- helpers ------------------------------------------------------------------------------------
def _methods() -> list[type[Extension]]:
    out, todo = [], list(Extension.__subclasses__())
    while todo:
        cls = todo.pop(0)
        out.append(cls)
        todo += cls.__subclasses__()
    return out


def parse_extension(spec: str | Extension | None) -> Extension | None:
    """``"none"``, ``"pi"``, ``"ntk(factor=10)"``, ``"selfextend(group=9, window=64)"`` -> an Extension."""
    if spec is None or isinstance(spec, Extension):
        return spec
    m = re.fullmatch(r"\s*([\w-]+)\s*(?:\((.*)\))?\s*", str(spec))
    names = {c.name: c for c in _methods()} | {c.__name__.lower(): c for c in _methods()}
    if not m or (m.group(1).lower() not in names and m.group(1).lower() != "none"):
        raise ValueError(f"unknown extension {spec!r}; use none or one of {', '.join(c.name for c in _methods())}, "
                         "e.g. pi or selfextend(group=9,window=64)")
    if m.group(1).lower() == "none":
        return None
    kwargs = {}
    for part in filter(None, (p.strip() for p in (m.group(2) or "").split(","))):
        key, _, value = part.partition("=")
        v = value.strip()
        kwargs[key.strip()] = v.lower() == "true" if v.lower() in ("true", "false") else float(v) if "." in v else int(v)
    try:
        return names[m.group(1).lower()](**kwargs)
    except TypeError as err:
        raise ValueError(f"extension {spec!r}: {err}") from None


def _ape_kwargs(model, position_ids: Tensor) -> dict:
    """Forward arguments for APE models: explicit positions, and token types (BERT would otherwise
    gather them from a buffer of L_o entries)."""
    offset = POSITION_OFFSET.get(model.config.model_type, 0) * (model.config.pad_token_id + 1)
    device = next(model.parameters()).device
    pos = (position_ids + offset).unsqueeze(0).to(device)
    kwargs = {"position_ids": pos}
    if getattr(model.config, "type_vocab_size", 0):
        kwargs["token_type_ids"] = torch.zeros_like(pos)
    return kwargs


def _global_type(model) -> str | None:
    """The rope_parameters key of the global layers (ModernBERT), or None for one shared RoPE."""
    return "full_attention" if "full_attention" in (getattr(model.config, "rope_parameters", None) or {}) else None


@contextmanager
def _global_rope(model, change):
    """Swap the global layers' inv_freq and cos/sin scale for ``change(inv_freq, scale)`` inside the block."""
    rotary = getattr(model, "rotary_emb", None)
    layer_type = _global_type(model)
    inv_attr = f"{layer_type}_inv_freq" if layer_type else "inv_freq"
    scale_attr = f"{layer_type}_attention_scaling" if layer_type else "attention_scaling"
    if rotary is None or not hasattr(rotary, inv_attr):
        raise ValueError(f"{model.config.model_type}: no rotary_emb.{inv_attr} to change; this RoPE model is not "
                         "supported by the RoPE extensions (use pcw)")
    old_inv, old_scale = getattr(rotary, inv_attr), getattr(rotary, scale_attr, 1.0)
    new_inv, new_scale = change(old_inv.clone(), old_scale)
    setattr(rotary, inv_attr, new_inv)
    setattr(rotary, scale_attr, new_scale)
    try:
        yield
    finally:
        setattr(rotary, inv_attr, old_inv)
        setattr(rotary, scale_attr, old_scale)


# -- attention scaling --------------------------------------------------------------------------
_SCALE: contextvars.ContextVar[tuple[str, float]] = contextvars.ContextVar("dewey_attention_scale")
SCALED = "dewey_scaled"


def _scaled_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    base, factor = _SCALE.get()
    if getattr(module, "sliding_window", None) is None:  # ModernBERT's local layers keep their scale
        scaling = (scaling if scaling is not None else query.shape[-1] ** -0.5) * factor
    return ALL_ATTENTION_FUNCTIONS[base](module, query, key, value, attention_mask, scaling=scaling, **kwargs)


AttentionInterface.register(SCALED, _scaled_attention)
# transformers builds no mask at all for an attention name it has no mask function for
AttentionMaskInterface.register(SCALED, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


@contextmanager
def scaled_attention(model, length: int, original: int):
    """Attention logits x max(1, log L / log L_o) inside the block (sdpa-family backends)."""
    config = model.config
    base = config._attn_implementation
    if base not in ("sdpa", BANDED):
        raise ValueError(f"attention_scaling needs the sdpa attention backend, not {base}; "
                         "load the model with attn_implementation sdpa")
    token = _SCALE.set((base, max(1.0, math.log(length) / math.log(original))))
    config._attn_implementation = SCALED
    try:
        yield
    finally:
        config._attn_implementation = base
        _SCALE.reset(token)
