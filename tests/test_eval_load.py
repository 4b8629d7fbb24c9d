"""Loading never changes a model silently: a sentence-transformers model with a Dense head scores as
sentence-transformers itself encodes it, from a local folder and from the hub (a stand-in in the hub
cache's own layout); a pooling mode or module type we cannot reproduce is one error line."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from dewey_lab.eval.load import load_embedder
from dewey_lab.resolve import OFFLINE_TEACHER, resolve_model

TEXTS = ["The grass is green and the sky is blue.", "Mira Holt's pass key is 52817. Remember it.",
         "Which river runs past the old stone house?"]


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory):
    """MiniLM -> mean Pooling -> Dense(384 -> 48, tanh) -> Normalize, saved by sentence-transformers."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Dense, Normalize

    torch.manual_seed(0)
    base = SentenceTransformer(resolve_model(OFFLINE_TEACHER), device="cpu")
    model = SentenceTransformer(modules=[base[0], base[1], Dense(384, 48, activation_function=torch.nn.Tanh()),
                                         Normalize()], device="cpu")
    folder = tmp_path_factory.mktemp("st") / "minilm-dense"
    model.save(str(folder))
    return folder, model


def test_local_dense_head_scores_as_sentence_transformers(dense_model):
    folder, st = dense_model
    ours = load_embedder(str(folder), device="cpu")
    assert ours.head is not None
    expected = torch.from_numpy(st.encode(TEXTS, normalize_embeddings=True))
    got = ours.encode_passages(TEXTS, chunks=False).single
    assert got.shape == (3, 48) and torch.allclose(got, expected, atol=1e-5)


def test_hub_model_keeps_its_dense_head(dense_model, tmp_path, monkeypatch):
    import huggingface_hub.constants

    folder, st = dense_model
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--standin--minilm-dense"
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = load_embedder("standin/minilm-dense", device="cpu")  # a hub id: read through the hub's cache
    assert ours.fingerprint == "standin/minilm-dense@main"
    expected = torch.from_numpy(st.encode(TEXTS, normalize_embeddings=True))
    assert torch.allclose(ours.encode_passages(TEXTS, chunks=False).single, expected, atol=1e-5)


def _copy_minilm(tmp_path) -> Path:
    folder = tmp_path / "minilm"
    shutil.copytree(resolve_model(OFFLINE_TEACHER), folder)
    return folder


@pytest.mark.parametrize("mode", ["max", "weightedmean", "mean_sqrt_len_tokens", ["cls", "max"]])
def test_unknown_pooling_mode_is_one_line(tmp_path, mode):
    folder = _copy_minilm(tmp_path)
    cfg = folder / "1_Pooling" / "config.json"
    pool = json.loads(cfg.read_text())
    pool = {k: v for k, v in pool.items() if not k.startswith("pooling_mode")}
    cfg.write_text(json.dumps({**pool, "pooling_mode": mode}))
    with pytest.raises(ValueError) as err:
        load_embedder(str(folder), device="cpu")
    msg = str(err.value)
    assert "is not supported" in msg and "supported: cls, mean, cls+mean, lasttoken" in msg and "\n" not in msg


def test_legacy_pooling_flags_are_read(tmp_path):
    folder = _copy_minilm(tmp_path)
    cfg = folder / "1_Pooling" / "config.json"
    pool = {k: v for k, v in json.loads(cfg.read_text()).items() if not k.startswith("pooling_mode")}
    cfg.write_text(json.dumps({**pool, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
                               "pooling_mode_max_tokens": True}))
    with pytest.raises(ValueError, match="pooling max is not supported"):
        load_embedder(str(folder), device="cpu")
    cfg.write_text(json.dumps({**pool, "pooling_mode_cls_token": True}))
    assert load_embedder(str(folder), device="cpu").pooling == "cls"


def test_unknown_module_type_is_one_line(tmp_path):
    folder = _copy_minilm(tmp_path)
    modules = json.loads((folder / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_LayerNorm", "type": "sentence_transformers.models.LayerNorm"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError) as err:
        load_embedder(str(folder), device="cpu")
    msg = str(err.value)
    assert "sentence_transformers.models.LayerNorm is not supported" in msg
    assert "Transformer, Pooling, Dense, Normalize, WordWeights" in msg and "\n" not in msg


def test_lasttoken_pooling_is_read(tmp_path):
    folder = _copy_minilm(tmp_path)
    cfg = folder / "1_Pooling" / "config.json"
    pool = {k: v for k, v in json.loads(cfg.read_text()).items() if not k.startswith("pooling_mode")}
    cfg.write_text(json.dumps({**pool, "pooling_mode": "lasttoken"}))
    assert load_embedder(str(folder), device="cpu").pooling == "last"
