"""A random student's token table started from a teacher's static token vectors (``model.student.embeddings_from``).

The paper's student is a pretrained ModernBERT: its token vectors already mean something when distillation
starts. A student built from a config on a CPU has no such start, and a few hundred steps from random
weights leave it near the floor (results/chunk_alignment_ablation/2026-12-06-random-start/). This is the
offline stand-in for pretraining, model2vec's distillation (Tulkens and van Dongen, 2024): every vocabulary
token is read alone by the teacher, as the text ``[CLS] token [SEP]``, and the teacher's sentence vector of
that text (its own pooling and normalisation) is the token's static vector. The vectors are centred and
reduced to the student's width by PCA (model2vec's default width is 256 as well), then scaled so their
entries have the spread of the student's random init (``initializer_range``), so an optimiser step moves
them as much as it would move a random table. model2vec's Zipf weighting is left out: ModernBERT's
embedding LayerNorm rescales every token vector, which would undo it.

Only the token table is set; the layers, norms and heads keep their random init (ModernBERT is pre-norm, so
at init the residual stream is mostly the token vectors and a mean over tokens is a bag of static vectors).
The teacher must speak the student's tokenizer, id for id (one-line error otherwise).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def static_token_vectors(model: str, ids: list[int] | None = None, batch_size: int = 1024) -> tuple[Tensor, dict]:
    """(len(ids), D) float32: ``model``'s sentence vector of each token id read alone (``[CLS] id [SEP]``),
    and the model's tokenizer vocabulary. ``ids`` defaults to the whole vocabulary (30,522 ids of MiniLM:
    ~20 s on 2 CPU cores)."""
    from sentence_transformers import SentenceTransformer

    from dewey_lab.resolve import is_local, resolve_model

    st = SentenceTransformer(resolve_model(model), device="cpu", local_files_only=is_local(model))
    tok = st.tokenizer
    if tok.cls_token_id is None or tok.sep_token_id is None:
        raise ValueError(f"model.student.embeddings_from {model}: its tokenizer has no [CLS]/[SEP] tokens to "
                         "read a token alone with; give a BERT-style sentence-transformers model")
    ids_t = torch.arange(len(tok)) if ids is None else torch.as_tensor(ids)
    out = []
    st.eval()
    with torch.inference_mode():
        for start in range(0, len(ids_t), batch_size):
            b = ids_t[start:start + batch_size]
            x = torch.stack([torch.full_like(b, tok.cls_token_id), b, torch.full_like(b, tok.sep_token_id)], 1)
            out.append(st({"input_ids": x, "attention_mask": torch.ones_like(x),
                           "token_type_ids": torch.zeros_like(x)})["sentence_embedding"].float())
    return torch.cat(out), tok.get_vocab()


def pca_table(vectors: Tensor, dim: int, std: float) -> tuple[Tensor, float]:
    """(V, dim): ``vectors`` centred and projected on their ``dim`` leading principal directions, scaled so
    the table's entries have standard deviation ``std``; and the share of the variance those directions keep."""
    if dim > vectors.shape[1]:
        raise ValueError(f"model.student.embeddings_from gives {vectors.shape[1]}-d token vectors, fewer than the "
                         f"student's hidden_size {dim}; set hidden_size <= {vectors.shape[1]} or drop embeddings_from")
    centred = vectors.double() - vectors.double().mean(0)
    _, s, vt = torch.linalg.svd(centred, full_matrices=False)
    table = centred @ vt[:dim].T
    return (table * (std / table.std())).float(), float((s[:dim] ** 2).sum() / (s ** 2).sum())


def init_token_table(student, model: str, tokenizer) -> None:
    """Overwrite ``student``'s token table (a ModernBertModel) with ``model``'s static token vectors, PCA-reduced
    to its width; the padding row stays zero. One line if the vocabularies differ."""
    vectors, vocab = static_token_vectors(model)
    if vocab != tokenizer.get_vocab():
        raise ValueError(f"model.student.embeddings_from {model} does not use the student's tokenizer "
                         f"({len(vocab)} against {len(tokenizer)} tokens, or other ids); give the teacher whose "
                         "tokenizer the student reads, or drop embeddings_from")
    config = student.config
    table, kept = pca_table(vectors, config.hidden_size, config.initializer_range)
    emb = student.embeddings.tok_embeddings.weight
    if emb.shape[0] < table.shape[0]:
        raise ValueError(f"the student's vocabulary ({emb.shape[0]}) is smaller than {model}'s ({table.shape[0]}); "
                         "drop model.student.config.vocab_size")
    with torch.no_grad():
        emb[: table.shape[0]] = table.to(emb.dtype)
        if config.pad_token_id is not None:
            emb[config.pad_token_id] = 0.0
    log.info("student: token table from %s's static token vectors, PCA %d -> %d (%.1f%% of their variance)",
             model, vectors.shape[1], config.hidden_size, 100 * kept)
