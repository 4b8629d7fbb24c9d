"""Training-free context-window extension (LongEmbed, arXiv 2404.12096, section 4), as swappable classes.

With ``L_o`` the model's window, ``L_t`` the target length and ``s = ceil(L_t / L_o)``:

| class | models | what changes | kind |
|---|---|---|---|
| ``PCW`` | any | passages split into L_o-token windows (the last = the final tokens), raw window vectors averaged, then normalised | per input |
| ``GroupedPositions`` (gp) | APE | position id -> floor(pid / f), f = ceil(length / L_o) of that input | per input |
| ``RecurrentPositions`` (rp) | APE | position id -> pid mod L_o | per input |
| ``PositionInterpolation`` (pi) | APE, RoPE | inputs longer than L_o: APE table E_t[i*s] = E_o[i], linear between; RoPE positions / s | per input |
| ``NTK`` | RoPE | theta -> theta * lambda (default lambda = s^(d/(d-2)), "slightly above s") | model level |
| ``YaRN`` | RoPE | per-frequency blend of interpolation and extrapolation + temperature (transformers' yarn) | model level |
| ``SelfExtend`` | ModernBERT, decoders | normal relative positions within ``window``, grouped by ``group`` beyond (both triangles on an encoder) | model level |

Two kinds, as in LongEmbed's reference code (``src/encoder_model.py`` of dwzhu-pku/LongEmbed):

* **per input** (PCW, GP, RP, PI): an input of L_o tokens or fewer (every query, every short passage)
  is read exactly as the unextended model reads it. GP's factor is ceil(length / L_o), so it is 1 up
  to L_o; RP's pid mod L_o is pid up to L_o; PI interpolates only inputs longer than L_o (the
  reference gives shorter ones positions pid * s on the interpolated table, i.e. their original
  embeddings); PCW splits only passages (queries are never chunked). The reference decides this
  per padded batch; we decide it per sequence, so a vector never depends on which other texts
  shared its batch.
* **model level** (NTK, YaRN, SelfExtend): the model itself changes (rope_theta, the RoPE
  frequencies, a patched attention) for every input, queries included, as the reference's
  model-level settings (``--rope_theta``, ``--use_self_extend``) do.

Every method may also scale attention logits by max(1, log L / log L_o) (``attention_scaling``),
with L each sequence's own length (not the padded batch's), so inputs of L_o tokens or fewer
keep their logits. On ModernBERT position changes touch the global-attention layers only: local
layers never see a distance beyond their 128-token window. With s = 1 every method is the
unextended model.

Select one from the CLI (``--extension pi``, ``--extension "selfextend(group=9,window=64)"``) or
YAML (``class_path: dewey_lab.eval.extension.methods.NTK``, ``init_args: {factor: 10}``).
"""

from __future__ import annotations

import copy
import inspect
import math
import re
from contextlib import ExitStack, contextmanager
from typing import ClassVar

import torch
from torch import Tensor, nn

from dewey_lab.eval.embedder import uses_rope
from dewey_lab.eval.extension.scaling import scaled_attention

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
    # True: inputs of L_o tokens or fewer run through the unextended model (the Embedder splits the batch)
    short_inputs_unchanged: ClassVar[bool] = False

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
    def forward(self, model: nn.Module, ids: Tensor, attn: Tensor, mask=None) -> Tensor:
        """Last hidden state (B, T, H) of the extended model.

        ``attn`` is the (B, T) 0/1 attention mask (each row's length is its sum); ``mask`` is what the
        model is given as ``attention_mask`` when that differs (the banded path's key masks).
        """
        lengths = attn.sum(1)  # (B,) each sequence's own length
        with ExitStack() as stack:
            kwargs = stack.enter_context(self.patched(model, lengths, ids.shape[1]))
            if self.attention_scaling:
                stack.enter_context(scaled_attention(model, lengths, self.original))
            return model(input_ids=ids, attention_mask=attn if mask is None else mask, **kwargs).last_hidden_state

    @contextmanager
    def patched(self, model: nn.Module, lengths: Tensor, width: int):
        """Subclasses change the model (or forward arguments) inside this block, for rows of ``lengths``
        (B,) padded to ``width`` tokens."""
        yield {}


class PCW(Extension):
    """Parallel context windows (per input): a passage's L_o-token windows embedded apart, averaged.

    As LongEmbed's reference ("chunk" mode) does: each window holds L_o - (special + prompt) text
    tokens, windows do not overlap except the last, which is the final tokens; the raw (pooled,
    unnormalised) window vectors are averaged, then the mean is normalised. A passage of L_o tokens
    or fewer is one window: the unextended model's vector. Queries are never split.

    Hidden states are stitched back in token order (each token from its window; the last window
    wins where it overlaps), so late chunking still works.
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
    """GP (per input): position id -> floor(pid / f); f neighbours share a position.

    f = ceil(length / L_o) of each input (LongEmbed's reference: ``factor = ceil(len / L_o)``), so an
    input of L_o tokens or fewer keeps its positions. The reference takes the padded batch's length;
    we take each sequence's own, so a vector never depends on its batch. ``gp(factor=k)`` fixes
    f = k for inputs longer than L_o instead.
    """

    name = "gp"
    fits = ("ape",)

    def factors(self, lengths: Tensor) -> Tensor:
        """(B,) integer group size per input: ceil(length / L_o), or the fixed factor past L_o."""
        f = torch.div(lengths + self.original - 1, self.original, rounding_mode="floor").clamp_min(1)
        if self.factor is not None:
            f = torch.where(lengths > self.original, torch.full_like(f, int(self.factor)), torch.ones_like(f))
        return f

    def position_ids(self, lengths: Tensor | int, width: int | None = None) -> Tensor:
        """(B, T) positions for rows of ``lengths`` padded to ``width``; padding gets position 0."""
        lengths = torch.as_tensor(lengths).reshape(-1)
        pid = torch.arange(width or int(lengths.max()), device=lengths.device)[None, :]  # (1, T)
        return torch.where(pid < lengths[:, None], pid // self.factors(lengths)[:, None], 0)

    @contextmanager
    def patched(self, model, lengths, width):
        yield _ape_kwargs(model, self.position_ids(lengths, width))


class RecurrentPositions(Extension):
    """RP (per input): position id -> pid mod L_o; positions restart every L_o tokens, so an input of
    L_o tokens or fewer keeps its positions by construction."""

    name = "rp"
    fits = ("ape",)

    def position_ids(self, lengths: Tensor | int, width: int | None = None) -> Tensor:
        """(1, T) positions: the same for every row (padding beyond a row's length is masked)."""
        lengths = torch.as_tensor(lengths).reshape(-1)
        return (torch.arange(width or int(lengths.max()), device=lengths.device) % self.original)[None, :]

    @contextmanager
    def patched(self, model, lengths, width):
        yield _ape_kwargs(model, self.position_ids(lengths, width))


class PositionInterpolation(Extension):
    """PI (per input). APE: a longer table with E_t[i*s] = E_o[i] and linear steps between (beyond the
    last original row the table holds it). RoPE: every position divided by s (inv_freq / s; on
    ModernBERT the global layers only).

    Only inputs longer than L_o are interpolated, with the one factor s = ceil(L_t / L_o) (the
    reference's ``encode_max_length // L_o``); an input of L_o tokens or fewer runs through the
    unextended model, which is what the reference's positions pid * s on the interpolated table
    give it (E_t[pid * s] = E_o[pid]).
    """

    name = "pi"
    max_factor = 32.0  # beyond this neighbouring positions are < 1/32 apart: indistinguishable
    short_inputs_unchanged = True

    def table(self, weight: Tensor, length: int) -> Tensor:
        """(length, H) interpolated position table from the original (L_o, H) one."""
        s = float(self.factor or self.s)
        pos = (torch.arange(length, dtype=torch.float64) / s).clamp(max=weight.shape[0] - 1)
        lo = pos.floor().long()
        hi = (lo + 1).clamp(max=weight.shape[0] - 1)
        frac = (pos - lo).unsqueeze(1).to(weight.dtype)
        return weight[lo] * (1 - frac) + weight[hi] * frac

    @contextmanager
    def patched(self, model, lengths, width):
        s = float(self.factor or self.s)
        if uses_rope(model.config):
            with _global_rope(model, lambda inv, scale: (inv / s, scale)):
                yield {}
            return
        emb = model.embeddings
        old = emb.position_embeddings
        offset = POSITION_OFFSET.get(model.config.model_type, 0) * (model.config.pad_token_id + 1)
        weight = old.weight[offset:]
        table = self.table(weight, width)
        emb.position_embeddings = nn.Embedding.from_pretrained(torch.cat([old.weight[:offset], table]), freeze=True)
        try:
            yield _ape_kwargs(model, torch.arange(width)[None, :])
        finally:
            emb.position_embeddings = old


class NTK(Extension):
    """NTK-aware (model level): theta -> theta * lambda on the global layers, for every input, queries
    included, as the reference's ``--rope_theta`` does (E5-Mistral + NTK: 10,000 -> 100,000, i.e.
    ``ntk(factor=10)``). lambda defaults to s^(d/(d-2)), "slightly above s"."""

    name = "ntk"
    fits = ("rope",)
    max_factor = 1e4

    def lam(self, head_dim: int) -> float:
        return float(self.factor) if self.factor is not None else self.s ** (head_dim / (head_dim - 2))

    @contextmanager
    def patched(self, model, lengths, width):
        def scale(inv: Tensor, attn_scale: float):
            d = 2 * inv.numel()
            # inv_freq_i = theta^(-2i/d)  ->  (theta * lambda)^(-2i/d) = inv_freq_i * lambda^(-2i/d)
            return inv * self.lam(d) ** (-torch.arange(0, d, 2, dtype=inv.dtype, device=inv.device) / d), attn_scale

        with _global_rope(model, scale):
            yield {}


class YaRN(Extension):
    """YaRN (arXiv 2309.00071; model level): transformers' own yarn frequencies and temperature on the
    global layers, for every input. Not in LongEmbed; included as the RoPE method decoders ship with."""

    name = "yarn"
    fits = ("rope",)

    def __init__(self, factor: float | None = None, attention_scaling: bool = False, beta_fast: float = 32.0,
                 beta_slow: float = 1.0) -> None:
        super().__init__(factor, attention_scaling)
        self.beta_fast, self.beta_slow = beta_fast, beta_slow

    def _args(self):
        return ("factor", "attention_scaling", "beta_fast", "beta_slow")

    @contextmanager
    def patched(self, model, lengths, width):
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
    """SelfExtend (model level): ModernBERT's global layers (both triangles) or a Llama-family decoder's
    layers (causal), for every input.

    Query i and key j at distance |i - j| <= ``window`` keep their relative position; beyond it both
    are grouped: distance floor(j/g) - floor(i/g) + (window - floor(window/g)), mirrored for keys
    before the query.

    Defaults: window = L_o / 8 and group = s + 1 (s > 1), which give exactly the LongEmbed paper's two
    settings (arXiv 2404.12096, section 4 / Table 2): E5-RoPE-Base 512 -> 4k, g = 9, w = 64 (the
    60.8 row); E5-Mistral 4k -> 32k, g = 9, w = 512 (``scripts/run_long_embed.sh mistral_se``:
    ``--group_size_1 9 --group_size_2 512``). That script's ``e5rope_se`` entry runs g = 17,
    w = 32 instead: ``selfextend(group=17,window=32)``.
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
        from dewey_lab.eval.extension.self_extend import decoder_fits

        if model.config.model_type != "modernbert" and not decoder_fits(model):
            raise ValueError(f"extension selfextend is built for ModernBERT's global layers and Llama-family "
                             f"decoders, not {model.config.model_type}; use ntk, pi or yarn")
        self.g = self.group if self.group is not None else (self.s + 1 if self.s > 1 else 1)
        self.w = self.window if self.window is not None else max(1, original // 8)
        return self

    @contextmanager
    def patched(self, model, lengths, width):
        from dewey_lab.eval.extension.self_extend import self_extend_layers

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
    """Forward arguments for APE models: explicit (B or 1, T) positions, and token types (BERT would
    otherwise gather them from a buffer of L_o entries)."""
    offset = POSITION_OFFSET.get(model.config.model_type, 0) * (model.config.pad_token_id + 1)
    device = next(model.parameters()).device
    pos = (position_ids + offset).to(device)
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
