"""model.student.embeddings_from: the teacher's static token vectors start a random student's token table.

References: sentence-transformers' own ``encode`` of a one-token word (the public path, not ours), a
hand-written mean over ``[CLS] token [SEP]``, and PCA by the covariance's eigenvectors (``eigh``, not the
SVD the code uses)."""

import pytest
import torch
import torch.nn.functional as F

import dewey_lab.model.static_init as static_init
from dewey_lab.model.static_init import pca_table, static_token_vectors
from dewey_lab.model.student import StudentConfig, build_student, weights_follow
from dewey_lab.resolve import OFFLINE_TEACHER, resolve_model

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
WORDS = ["the", "graph", "python", "river"]  # one WordPiece token each in MiniLM's vocabulary


def test_static_vectors_are_the_teachers_vectors_of_each_token_read_alone(tokenizer):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    ids = [tokenizer.convert_tokens_to_ids(w) for w in WORDS]
    assert all(tokenizer(w, add_special_tokens=False)["input_ids"] == [i] for w, i in zip(WORDS, ids))
    rows, vocab = static_token_vectors(OFFLINE_TEACHER, ids)
    assert vocab == tokenizer.get_vocab() and rows.shape == (len(WORDS), 384)
    # the public path: encode("graph") reads [CLS] graph [SEP], mean-pools and normalises
    st = SentenceTransformer(resolve_model(OFFLINE_TEACHER), device="cpu")
    torch.testing.assert_close(rows, torch.as_tensor(st.encode(WORDS)), atol=1e-5, rtol=0)
    # by hand: the mean of the three output positions, L2-normalised
    bert = AutoModel.from_pretrained(resolve_model(OFFLINE_TEACHER)).eval()
    x = torch.tensor([[tokenizer.cls_token_id, i, tokenizer.sep_token_id] for i in ids])
    with torch.no_grad():
        by_hand = F.normalize(bert(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state.mean(1), dim=-1)
    torch.testing.assert_close(rows, by_hand, atol=1e-5, rtol=0)


def test_pca_table_keeps_the_leading_directions_at_the_init_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=g) * torch.linspace(3, 0.1, 12) + 5.0  # offset: the table is centred
    table, kept = pca_table(x, 4, std=0.02)
    assert table.shape == (300, 4)
    assert abs(float(table.std()) - 0.02) < 1e-6
    torch.testing.assert_close(table.double().mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-7, rtol=0)
    xc = (x - x.mean(0)).double()
    evals, evecs = torch.linalg.eigh(xc.T @ xc)  # ascending
    top = xc @ evecs[:, -4:]
    scale = 0.02 / top.std()
    # the same subspace and geometry: Gram matrices agree (signs and order of the axes do not matter)
    torch.testing.assert_close((table.double() @ table.double().T), (top @ top.T) * scale ** 2, atol=1e-7, rtol=1e-4)
    assert kept == pytest.approx(float(evals[-4:].sum() / evals.sum()), rel=1e-9)
    with pytest.raises(ValueError, match="set hidden_size <= 12"):
        pca_table(x, 16, std=0.02)


def _fake_vectors(monkeypatch, tokenizer, vocab=None):
    """static_token_vectors replaced by seeded random rows (the real ones take ~20 s for 30k tokens)."""
    rows = torch.randn(len(tokenizer), 48, generator=torch.Generator().manual_seed(1))
    calls = []

    def fake(model, ids=None, batch_size=1024):
        calls.append(model)
        return rows, vocab if vocab is not None else tokenizer.get_vocab()

    monkeypatch.setattr(static_init, "static_token_vectors", fake)
    return rows, calls


def test_build_student_puts_each_tokens_vector_in_its_row(monkeypatch, tokenizer):
    rows, calls = _fake_vectors(monkeypatch, tokenizer)
    spec = StudentConfig(tokenizer=OFFLINE_TEACHER, config=TINY, embeddings_from=OFFLINE_TEACHER)
    model = build_student(spec, tokenizer)
    expected, _ = pca_table(rows, 32, model.config.initializer_range)
    table = model.embeddings.tok_embeddings.weight.detach()
    pad = tokenizer.pad_token_id
    assert torch.all(table[pad] == 0)
    keep = torch.arange(len(tokenizer)) != pad
    torch.testing.assert_close(table[keep], expected[keep])
    assert calls == [OFFLINE_TEACHER]
    # a checkpoint's weights follow (eval, export, resume): no teacher pass
    with weights_follow():
        build_student(spec, tokenizer)
    assert calls == [OFFLINE_TEACHER]


def test_embeddings_from_refuses_what_it_cannot_start(monkeypatch, tokenizer, tmp_path):
    vocab = dict(tokenizer.get_vocab())
    vocab["[NEW]"] = len(vocab)
    _fake_vectors(monkeypatch, tokenizer, vocab=vocab)
    spec = StudentConfig(tokenizer=OFFLINE_TEACHER, config=TINY, embeddings_from=OFFLINE_TEACHER)
    with pytest.raises(ValueError, match="does not use the student's tokenizer"):
        build_student(spec, tokenizer)
    with pytest.raises(ValueError, match="drop one of the two"):
        build_student(StudentConfig(name_or_path=str(tmp_path), embeddings_from=OFFLINE_TEACHER))
