"""Shipping a student: the sentence-transformers export round trip, and dewey_lab.encode's single and
chunk vectors (late chunking, macro-windows) against hand-pooled hidden states."""

import json

import pytest
import torch
import torch.nn.functional as F

from dewey_lab.encode import load
from dewey_lab.export import export

TEXTS = ["What is the pass key?", "The grass is green. The sky is blue. " * 40, "short", "word " * 300]


@pytest.fixture(scope="module")
def encoder(student_ckpt):
    return load(str(student_ckpt), device="cpu")


def _hand(encoder, ids: list[int], spans: list[tuple[int, int]]) -> torch.Tensor:
    """Mean of each span's hidden states from one plain forward over ``ids``, head, unit length."""
    e = encoder.embedder
    with torch.no_grad():
        h = e.model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        h = h.last_hidden_state[0].float()
        return F.normalize(e.head(torch.stack([h[a:b].mean(0) for a, b in spans])), dim=-1)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_export_round_trip_is_exact(pooling, student_ckpt, encoder, tmp_path):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / f"st-{pooling}"
    export(str(student_ckpt), str(out), pooling=pooling, query_prompt="query: " if pooling == "cls" else "",
           max_length=512)
    st = SentenceTransformer(str(out), device="cpu")  # stock modules: no trust_remote_code
    ours = torch.tensor(st.encode(TEXTS))
    assert torch.allclose(ours, encoder.encode(TEXTS, mode=pooling), atol=1e-5)
    assert torch.allclose(ours, load(str(out), device="cpu").encode(TEXTS), atol=1e-5)  # and back in dewey_lab
    assert ours.shape == (4, 384) and (ours[0] - ours[2]).abs().max() > 1e-3  # a real head, distinct texts
    if pooling == "cls":  # the query prompt is recorded and applied the same way on both sides
        q = torch.tensor(st.encode(TEXTS[:2], prompt_name="query"))
        assert torch.allclose(q, load(str(out), device="cpu").encode(TEXTS[:2], prompt="query"), atol=1e-5)
        assert (q - ours[:2]).abs().max() > 1e-4  # the prompt reached the model
    assert st.max_seq_length == 512
    assert json.loads((out / "dewey_lab.json").read_text())["pooling"] == pooling
    assert "Training config" in (out / "README.md").read_text()
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((out / "modules.json").read_text())]
    assert modules == ["Transformer", *(["WordWeights"] if pooling == "mean" else []), "Pooling", "Dense", "Normalize"]


def test_cls_mean_export_reloads_as_sentence_transformers_pools_it(student_ckpt, tmp_path):
    """cls_mean cannot drop CLS / SEP from the mean with stock modules: dewey_lab.json says so, and
    dewey_lab reading the export reproduces what sentence-transformers computes."""
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "st-cls-mean"
    export(str(student_ckpt), str(out), pooling="cls_mean")
    st = torch.tensor(SentenceTransformer(str(out), device="cpu").encode(TEXTS))
    assert torch.allclose(st, load(str(out), device="cpu").encode(TEXTS), atol=1e-5)
    assert json.loads((out / "dewey_lab.json").read_text())["exact_in_sentence_transformers"] is False


def test_export_errors_name_the_fix(tmp_path, capsys):
    from dewey_lab.cli import main

    with pytest.raises(SystemExit):
        main(["export", "--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "x")])
    assert "runs keep them under" in capsys.readouterr().err


def test_chunks_of_a_short_text_are_one_pass(encoder):
    text = TEXTS[1]
    spans = [(0, 20), (20, 120), (100, 400), (395, len(text))]
    out = encoder.encode_chunks(text, spans=spans)
    ids = encoder.tokenizer(text)["input_ids"]
    assert out.windows == 1 and out.char_spans == spans
    assert torch.allclose(out.vectors, _hand(encoder, ids, out.token_spans), atol=1e-5)
    offsets = encoder.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    for (c0, c1), (t0, t1) in zip(out.char_spans, out.token_spans):  # tokens overlap their chunk's characters
        assert offsets[t0][1] > c0 and offsets[t1 - 1][0] < c1
        assert t0 == 0 + 1 or offsets[t0 - 1][1] <= c0  # ... and no earlier token does


def test_macro_windows_keep_the_chunk_geometry(student_ckpt):
    """A 64-token window over a ~300-token text: every chunk is pooled from a forward over the window
    the hand-written layout gives it (CLS + its text slice + SEP), and the spans do not move."""
    text = TEXTS[3]
    whole = load(str(student_ckpt), device="cpu")
    small = load(str(student_ckpt), device="cpu", window=64)
    spans = [(i, i + 40) for i in range(0, len(text) - 40, 97)]  # 8 tokens each
    a, b = whole.encode_chunks(text, spans=spans), small.encode_chunks(text, spans=spans)
    assert a.token_spans == b.token_spans and a.char_spans == b.char_spans
    assert a.windows == 1 and b.windows > 3
    ids = whole.tokenizer(text)["input_ids"]
    n, room = len(ids) - 2, 64 - 2
    overlap = max(room // 4, max(t1 - t0 for t0, t1 in b.token_spans))
    starts = [0]
    while starts[-1] + room < n:
        starts.append(min(starts[-1] + room - overlap, n - room))
    for k, (t0, t1) in enumerate(b.token_spans):
        s = max((s for s in starts if s <= t0 - 1 and t1 - 1 <= s + room),
                key=lambda s: min(t0 - 1 - s, s + room - (t1 - 1)))
        window = [ids[0], *ids[1 + s:1 + s + room], ids[-1]]
        want = _hand(small, window, [(t0 - s, t1 - s)])[0]
        assert torch.allclose(b.vectors[k], want, atol=1e-5), k
    assert (a.vectors - b.vectors).abs().max() > 1e-3  # context differs, geometry does not


def test_chunkers_and_default_windows(encoder):
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    from dewey_lab.data.chunking import Chunker

    text = TEXTS[1]
    splitter = RecursiveCharacterTextSplitter(chunk_size=120, chunk_overlap=30)
    out = encoder.encode_chunks(text, chunker=splitter)
    assert [text[a:b] for a, b in out.char_spans] == splitter.split_text(text)
    ours = encoder.encode_chunks(text, chunker=Chunker(100, 100, seed=1))
    assert ours.char_spans == [tuple(s) for s in Chunker(100, 100, seed=1)(text)]
    default = encoder.encode_chunks(text)  # the embedder's 256 / 64 token windows
    assert next(t1 - t0 for t0, t1 in default.token_spans) == min(256, len(encoder.tokenizer(text)["input_ids"]) - 2)
    assert default.vectors.shape == (len(default.char_spans), 384)


def test_encode_chunks_errors(student_ckpt):
    small = load(str(student_ckpt), device="cpu", window=32)
    with pytest.raises(ValueError, match="larger window"):
        small.encode_chunks(TEXTS[3], spans=[(0, 200)])
    with pytest.raises(ValueError, match="not both"):
        small.encode_chunks("a b", spans=[(0, 1)], chunker=lambda t: [])
    assert small.encode_chunks("   ").vectors.shape == (0, 384)
    with pytest.raises(ValueError, match="use one of cls, mean, cls_mean"):
        small.encode(["x"], mode="max")


def test_push_to_hub_uploads_the_exported_folder(student_ckpt, tmp_path, monkeypatch):
    """--push-to-hub sends the folder export wrote (dewey_lab.json and our model card included), not a
    re-save by sentence-transformers; offline: the hub client's calls are recorded instead of sent."""
    from huggingface_hub import HfApi

    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("repo", repo_id))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, folder_path, repo_id, **kw: calls.update(
        folder=folder_path, to=repo_id, files=sorted(str(p.relative_to(folder_path)) for p in
                                                     __import__("pathlib").Path(folder_path).rglob("*") if p.is_file())))
    out = tmp_path / "pushed"
    export(str(student_ckpt), str(out), pooling="cls", push_to_hub="org/tiny-student")
    assert calls["repo"] == calls["to"] == "org/tiny-student" and calls["folder"] == str(out)
    assert {"dewey_lab.json", "README.md", "modules.json", "model.safetensors"} <= set(calls["files"])
    assert "Training config" in (out / "README.md").read_text()  # the card that was sent is ours


def test_encode_warns_with_a_count_when_it_truncates(encoder, caplog):
    import logging

    caplog.set_level(logging.WARNING)
    encoder.encode(["short", "word " * 5000, "word " * 6000])
    (msg,) = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert msg.startswith("encode: 2 of 3 texts exceed the")
    caplog.clear()
    encoder.encode(["short"])
    assert not [r for r in caplog.records if "truncated" in r.getMessage()]
