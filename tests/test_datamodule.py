"""The data module: windows, chunks, teacher fill through the cache, batches."""

from dataclasses import fields

import numpy as np
import pytest
import torch

from dewey_lab.data.corpus import JsonlCorpus
from dewey_lab.data.datamodule import DistillDataModule
from dewey_lab.data.fill import CacheConfig
from dewey_lab.data.packing import BatchConfig
from dewey_lab.data.store.vectors import cache_key
from dewey_lab.data.streaming import StreamConfig
from dewey_lab.data.teacher import SentenceTransformerTeacher, Teacher
from dewey_lab.data.windows import WindowConfig


class CountingTeacher(Teacher):
    """A deterministic stand-in teacher: vectors from the text's bytes; counts what it embeds."""

    def __init__(self, dim: int = 12):
        self.dim, self.calls = dim, []

    @property
    def fingerprint(self) -> str:
        return f"counting-{self.dim}"

    def encode(self, texts):
        self.calls.extend(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for j, byte in enumerate(t.encode()):
                out[i, j % self.dim] += (byte % 7) - 3
            out[i] /= max(1e-6, np.linalg.norm(out[i]))
        return out


GROUPS = {"windows": WindowConfig, "batching": BatchConfig, "cache": CacheConfig, "stream": StreamConfig}


def config_groups(**flat) -> dict:
    """A test shorthand: fields by their own names (``max_length=96``, ``batch_size=4``, ``dir=...``) ->
    DistillDataModule's argument groups (``windows=WindowConfig(max_length=96)``, ...)."""
    values = {name: {} for name in GROUPS}
    for key, value in flat.items():
        owners = [name for name, cls in GROUPS.items() if key in {f.name for f in fields(cls)}]
        assert len(owners) == 1, f"{key} is a field of {owners or 'no group'}"
        values[owners[0]][key] = value
    return {name: cls(**values[name]) for name, cls in GROUPS.items()}


def _dm(corpus_path, cache_dir, teacher=None, **kw):
    args = {"max_length": 128, "overflow": "split", "max_windows_per_doc": 3, "val_fraction": 0.2, "batch_size": 4}
    args.update(kw)
    return DistillDataModule(corpus=JsonlCorpus(str(corpus_path)), teacher=teacher or CountingTeacher(),
                             **config_groups(dir=str(cache_dir), **args))


def test_fill_then_all_hits_and_the_teacher_is_not_called_again(small_corpus_path, tmp_path):
    first = CountingTeacher()
    dm = _dm(small_corpus_path, tmp_path, first)
    dm.prepare_data()
    assert dm.fill_stats.misses == dm.fill_stats.unique_texts > 20 and dm.fill_stats.hits == 0
    assert len(first.calls) == len(set(first.calls)) == dm.fill_stats.unique_texts  # each text once
    second = CountingTeacher()
    dm2 = _dm(small_corpus_path, tmp_path, second)
    dm2.prepare_data()
    assert second.calls == [] and dm2.fill_stats.hit_rate == 1.0
    # the real teacher never loads its model when the cache is complete
    real = SentenceTransformerTeacher()
    assert "model" not in real.__dict__


def test_batches_carry_exact_chunk_spans_and_teacher_vectors(small_corpus_path, tmp_path, tokenizer):
    teacher = CountingTeacher()
    dm = _dm(small_corpus_path, tmp_path, teacher, prompt="passage: ")
    dm.prepare_data()
    dm.setup("fit")
    assert dm.teacher_dim == 12
    teacher.calls.clear()
    batch = next(iter(dm.train_dataloader()))
    B, T = batch["input_ids"].shape
    assert B == 4 and T <= 128
    n = batch["chunk_row"].numel()
    assert batch["t_chunk"].shape == (n, 12) and batch["t_whole"].shape == (4, 12)
    prompt_len = len(tokenizer("passage: ", add_special_tokens=False)["input_ids"])
    for b in range(B):
        ids = batch["input_ids"][b][batch["attention_mask"][b].bool()].tolist()
        content = batch["content_mask"][b].tolist()
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        # CLS, the prompt's tokens, SEP and padding are never pooled
        assert not any(content[: 1 + prompt_len]) and not content[len(ids) - 1]
        assert all(content[1 + prompt_len: len(ids) - 1])
    # each chunk's teacher vector is the teacher's embedding of exactly that chunk text
    for i in range(n):
        row, s, e = batch["chunk_row"][i], batch["chunk_start"][i], batch["chunk_end"][i]
        assert 0 < s < e <= T and batch["content_mask"][row, s:e].all()
    assert teacher.calls == []  # batches read the cache only


def test_chunk_targets_match_the_chunk_text(small_corpus_path, tmp_path):
    teacher = CountingTeacher()
    dm = _dm(small_corpus_path, tmp_path, teacher)
    dm.prepare_data()
    dm.setup("fit")
    ex = dm.datasets["train"].examples[0]
    item = dm.datasets["train"][0]
    s, e = ex.chunks[0]
    np.testing.assert_allclose(item["t_chunk"][0], teacher.encode([ex.text[s:e]])[0], rtol=1e-6)
    np.testing.assert_allclose(item["t_whole"], teacher.encode([ex.text])[0], rtol=1e-6)
    assert ex.keys == [cache_key(teacher.fingerprint, t) for t in [ex.text] + [ex.text[s:e] for s, e in ex.chunks]]
    assert len(item["t_chunk"]) == len(ex.chunks) == len(item["spans"])


def test_windows_and_held_out_documents(small_corpus_path, tmp_path):
    dm = _dm(small_corpus_path, tmp_path, max_windows_per_doc=None)
    ex = dm.examples()
    train_docs = {e.doc_id for e in ex["train"]}
    val_docs = {e.doc_id for e in ex["val"]}
    assert train_docs and val_docs and not (train_docs & val_docs)  # held out by document
    for e in ex["train"] + ex["val"]:
        assert len(e.input_ids) <= 128  # a window fits, as the student reads it
    truncated = _dm(small_corpus_path, tmp_path, overflow="truncate").examples()
    assert len({e.doc_id for e in truncated["train"]}) == len(truncated["train"])  # one window per document
    assert len(ex["train"]) > len(truncated["train"])


def test_teacher_means_are_the_training_mean(small_corpus_path, tmp_path):
    teacher = CountingTeacher()
    dm = _dm(small_corpus_path, tmp_path, teacher)
    dm.prepare_data()
    dm.setup("fit")
    wholes = teacher.encode([e.text for e in dm.examples()["train"]])
    torch.testing.assert_close(dm.teacher_means["whole"], torch.from_numpy(wholes.mean(0)), rtol=1e-5, atol=1e-6)


def test_empty_documents_are_skipped_and_counted(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "hello there general kenobi"}\n{"text": "  \\n "}\n{"text": ""}\n')
    dm = DistillDataModule(corpus=JsonlCorpus(str(path)), teacher=CountingTeacher(), cache=CacheConfig(str(tmp_path / "c")),
                           windows=WindowConfig(val_fraction=0.0, max_length=64))
    assert len(dm.examples()["train"]) == 1 and dm.corpus.skipped_empty == 2


def test_missing_corpus_path_names_the_fix(tmp_path):
    dm = DistillDataModule(corpus=JsonlCorpus(str(tmp_path / "nope.jsonl")), teacher=CountingTeacher(),
                           cache=CacheConfig(str(tmp_path / "c")))
    with pytest.raises(FileNotFoundError, match="does not exist; .*path"):
        dm.prepare_data()


def test_teacher_token_budget_batches_give_the_same_vectors():
    """Batching to a token budget regroups texts; every text's vector stays what batch_size gives."""
    texts = ["short", "a " * 200, "three word text", "x" * 50, "the teacher reads " * 30, "last"]
    fixed = SentenceTransformerTeacher(batch_size=2)
    budget = SentenceTransformerTeacher(batch_tokens=64)
    groups = budget._token_groups(texts)
    assert sorted(i for g in groups for i in g) == list(range(6)) and len(groups) > 2
    lengths = [len(budget.model.tokenizer(t, truncation=True, max_length=budget.model.max_seq_length)["input_ids"])
               for t in texts]
    assert all(len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 64 for g in groups)
    np.testing.assert_allclose(budget.encode(texts), fixed.encode(texts), atol=1e-5)


def test_every_data_argument_is_documented_for_help():
    """``dewey-lab fit --help`` shows the docstring under each field of the argument groups."""
    from docstring_parser import parse_from_object

    for cls in GROUPS.values():
        documented = {p.arg_name for p in parse_from_object(cls).params if p.description}
        assert documented == {f.name for f in fields(cls)}, cls.__name__
