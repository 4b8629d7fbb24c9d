"""The teacher's long-text strategies (truncate / pcw) and the fill's count of texts past its window.

The offline MiniLM teacher with a 32-token window makes texts "long" cheaply. PCW is checked against a
reference written here from LongEmbed's definition ("chunk" mode of dwzhu-pku/LongEmbed's
``src/encoder_model.py``): text tokens in windows of the window less the special (and prompt) tokens,
the last window the final tokens, each window's raw pooled vector, their mean, normalised.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from dewey_lab.data.fill import FillStats, fill, report, truncation_line
from dewey_lab.data.teacher import SentenceTransformerTeacher

WINDOW = 32
LONG = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
        "A quiet river runs past the old mill, where nobody has ground any flour for a hundred years. ") * 3
# fingerprint of the default teacher before long_text existed: caches filled then must stay valid
DEFAULT_FINGERPRINT = "model@sha256:83c1a1b15af6d02e|prompt=None|max_length=None|normalize=True"


@pytest.fixture(scope="module")
def truncating():
    return SentenceTransformerTeacher(max_length=WINDOW)


def _sharing(truncating, **kw) -> SentenceTransformerTeacher:
    """A teacher sharing the loaded model (the model is the same; the prompt or long-text rule differs)."""
    teacher = SentenceTransformerTeacher(max_length=WINDOW, **kw)
    teacher.__dict__["model"] = truncating.model
    return teacher


def _reference_pcw(st, text: str, prompt: str = "") -> np.ndarray:
    """LongEmbed's chunk mode, by hand: [CLS] + prompt + window + [SEP] through BERT and mean pooling
    (no Normalize module: raw vectors), averaged, normalised."""
    tok = st.tokenizer
    head = [tok.cls_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    room = WINDOW - len(head) - 1
    assert len(ids) > 2 * room  # at least three windows, the last overlapping
    starts = list(range(0, len(ids) - room, room)) + [len(ids) - room]
    vecs = []
    for a in starts:
        window = torch.tensor([head + ids[a:a + room] + [tok.sep_token_id]])
        assert window.shape[1] == WINDOW
        with torch.inference_mode():
            hidden = st[0]({"input_ids": window, "attention_mask": torch.ones_like(window),
                            "token_type_ids": torch.zeros_like(window), "modality": "text"})["token_embeddings"]
        vecs.append(hidden[0].mean(0))  # mean pooling over every token (MiniLM's include_prompt: True)
    mean = torch.stack(vecs).mean(0)
    return (mean / mean.norm()).numpy()


@pytest.mark.parametrize("prompt", [None, "passage: "])
def test_pcw_of_a_long_text_matches_longembeds_chunk_mode(truncating, prompt):
    teacher = _sharing(truncating, prompt=prompt, long_text="pcw")
    got = teacher.encode([LONG, "a short one"])[0]
    want = _reference_pcw(truncating.model, LONG, prompt or "")
    np.testing.assert_allclose(got, want, atol=1e-5)
    # and it is not what truncation gives
    assert np.abs(_sharing(truncating, prompt=prompt).encode([LONG])[0] - got).max() > 1e-2


def test_a_text_that_fits_gets_the_truncate_vector(truncating):
    short = ["The sky is blue.", "hello " * (WINDOW - 2)]  # the second fills the window exactly
    assert not truncating.too_long(short).any()
    pcw = _sharing(truncating, long_text="pcw")
    for text in short:
        assert np.array_equal(pcw.encode([text]), truncating.encode([text]))


def test_fingerprint_unchanged_for_truncate_new_for_pcw():
    assert SentenceTransformerTeacher().fingerprint == DEFAULT_FINGERPRINT
    assert SentenceTransformerTeacher(long_text="truncate").fingerprint == DEFAULT_FINGERPRINT
    pcw = SentenceTransformerTeacher(long_text="pcw").fingerprint
    assert pcw != DEFAULT_FINGERPRINT and "long_text=pcw" in pcw
    with pytest.raises(ValueError, match="truncate or pcw"):
        SentenceTransformerTeacher(long_text="chunk")


class DictStore:
    """The two calls the fill makes of a vector store, over a dict."""

    file = "memory"

    def __init__(self) -> None:
        self.vectors: dict[bytes, np.ndarray] = {}

    def missing(self, keys):
        return [k for k in keys if k not in self.vectors]

    def put_many(self, keys, vecs):
        self.vectors.update(zip(keys, vecs))


def test_the_fill_counts_texts_past_the_teachers_window(truncating, capsys):
    tok = truncating.model.tokenizer
    assert len(tok("hello " * 7, add_special_tokens=False)["input_ids"]) == 7  # one token a word
    # n words -> n + 2 tokens with [CLS] and [SEP]; the window is 32: n <= 30 fits
    words = {b"w1": 40, b"w2": 31, b"w3": 5, b"c1": 31, b"c2": 30, b"c3": 29, b"c4": 60, b"c5": 1}
    texts = {k: "hello " * n for k, n in words.items()}
    wholes = {b"w1", b"w2", b"w3"}
    store = DictStore()
    stats = fill(texts, truncating, store, block=3, wholes=wholes)
    long_whole = sum(words[k] > WINDOW - 2 for k in wholes)
    long_chunks = sum(words[k] > WINDOW - 2 for k in texts if k not in wholes)
    assert (stats.long_whole, stats.long_chunks) == (long_whole, long_chunks) == (2, 2)
    assert stats.checked == 8 and stats.checked_whole == 3 and stats.long_fraction == 4 / 8
    assert stats.truncated() == {"embedded": 8, "counted": 8, "long": 4, "fraction": 0.5, "long_text": "truncate",
                                 "whole": 2, "whole_counted": 3, "chunks": 2, "chunks_counted": 5}
    report(stats, store)
    assert "teacher/truncated: 4/8 embedded texts truncated (50.0%): whole 2/3, chunks 2/5" in capsys.readouterr().out
    again = fill(texts, truncating, store, wholes=wholes)  # all hits: nothing embedded, nothing counted
    assert again.misses == 0 and truncation_line(again) == "teacher/truncated: 0 embedded"


def test_more_than_one_percent_truncated_warns_with_the_fix(caplog):
    many = FillStats(unique_texts=200, misses=200, checked=200, checked_whole=20, long_whole=3)
    few = FillStats(unique_texts=200, misses=200, checked=200, checked_whole=20, long_whole=2)  # 1.0%: quiet
    split = FillStats(unique_texts=200, misses=200, checked=200, checked_whole=20, long_whole=3, long_text="pcw")
    with caplog.at_level(logging.WARNING, logger="dewey_lab.data.fill"):
        for stats in (few, split):
            report(stats, DictStore())
        assert not caplog.records
        report(many, DictStore())
    (record,) = caplog.records
    assert "3 of 200" in record.getMessage() and "data.teacher.init_args.long_text: pcw" in record.getMessage()
    assert "max_length" in record.getMessage()
