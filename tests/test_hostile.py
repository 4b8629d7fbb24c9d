"""Hostile inputs: each gets one line that names the fix, or a documented recovery, and loses nothing.

Elsewhere: empty and whitespace-only documents (test_datamodule, test_corpus), a teacher whose
dimension differs from the cache's (test_store, test_cli), a read-only or full cache
directory (test_store), torn checkpoints (test_guards)."""

import gzip
import json

import pytest

from dewey_lab.cli import REPO, main
from dewey_lab.data.corpus import JsonlCorpus
from dewey_lab.data.datamodule import DistillDataModule
from dewey_lab.data.items import collate
from tests.test_datamodule import CountingTeacher, config_groups

TINY = str(REPO / "experiments" / "tiny.yaml")


def _dm(path, cache, **kw):
    args = {"max_length": 64, "overflow": "truncate", "val_fraction": 0.0, "batch_size": 4}
    return DistillDataModule(corpus=JsonlCorpus(str(path)), teacher=CountingTeacher(),
                             **config_groups(dir=str(cache), **{**args, **kw}))


def test_a_corpus_of_bad_records_trains_on_what_is_readable(tmp_path, caplog):
    good = "Lists keep their order; sets do not, and dictionaries keep insertion order since 3.7."
    lines = [
        json.dumps({"id": "good", "text": good}).encode(),
        json.dumps({"id": "dup", "text": good}).encode(),  # an exact duplicate: dropped, counted
        json.dumps({"id": "empty", "text": ""}).encode(),
        json.dumps({"id": "blank", "text": " \n\t "}).encode(),
        json.dumps({"id": "short", "text": "Hi."}).encode(),  # shorter than any chunk: one chunk, itself
        json.dumps({"id": "ctrl", "text": "bell\x07 and nul\x00 escaped"}).encode(),
        b'{"id": "raw", "text": "a raw tab\tand a raw \x01 control character"}',
        b'{"id": "latin1", "text": "caf\xe9 cr\xe8me: bytes that are not UTF-8"}',
        b'{"id": "torn", "text": "a writer was killed in the mid',  # the last line, cut off: skipped
    ]
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\n".join(lines))
    caplog.set_level("WARNING")
    dm = _dm(path, tmp_path / "cache")
    examples = dm.examples()["train"]
    ids = [e.doc_id for e in examples]
    assert ids == ["good", "short", "ctrl", "raw", "latin1"]
    assert dm.corpus.skipped_empty == 2 and dm.duplicates_skipped == 1
    assert "\ufffd" in examples[4].text and "cut off" in caplog.text and "not UTF-8" in caplog.text
    short = examples[1]
    assert [short.text[s:e] for s, e in short.chunks] == ["Hi."]
    dm.prepare_data()
    dm.setup("fit")
    batch = collate([dm.datasets["train"][i] for i in range(len(examples))])
    assert batch["t_whole"].shape == (5, 12) and batch["chunk_row"].numel() >= 5


def test_a_bad_line_in_the_middle_is_an_error_naming_it(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "cut\n{"text": "fine again"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        list(JsonlCorpus(str(path)).documents())


def test_a_truncated_gzip_keeps_what_was_there(tmp_path, caplog):
    path = tmp_path / "cut.jsonl.gz"
    data = gzip.compress("".join(json.dumps({"id": str(i), "text": f"document {i} " * 50}) + "\n"
                                 for i in range(200)).encode())
    path.write_bytes(data[: len(data) // 2])
    docs = list(JsonlCorpus(str(path)).documents())
    assert 0 < len(docs) < 200 and [d.doc_id for d in docs] == [str(i) for i in range(len(docs))]
    assert "truncated gzip" in caplog.text


def test_a_ten_million_character_document_reads_only_what_it_uses(tmp_path, tokenizer):
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    text = " ".join(words[(i * 7) % 8] + str(i % 97) for i in range(1_300_000))[:10_000_000]
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"id": "big", "text": text}) + "\n")
    for overflow, windows in (("truncate", None), ("split", 3)):
        dm = _dm(path, tmp_path / "cache", max_length=128, overflow=overflow, max_windows_per_doc=windows)
        got = [e.text for e in dm.examples()["train"]]
        # the reference: windows cut from the full tokenisation of a prefix long enough to hold them
        offsets = tokenizer(text[:20_000], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        budget = 128 - 2
        want = [text[offsets[a][0]:offsets[a + budget - 1][1]] for a in range(0, budget * (windows or 1), budget)]
        assert got == want


@pytest.mark.parametrize(("yaml_text", "expected"), [
    ("data:\n  max_length: 4\n", "unknown key data.max_length; did you mean data.windows.max_length?"),  # a moved key
    ("model:\n  lr: fast\n", 'Parser key "model.lr": Expected a <class \'float\'>. Got value: fast'),
    ("data:\n  corpus:\n    class_path: dewey_lab.data.corpus.JsonlCorpus\n    init_args: {text_field: body}\n",
     "data.corpus: dewey_lab.data.corpus.JsonlCorpus needs path; set data.corpus.init_args.path"),
])
def test_bad_yaml_values_are_one_line_naming_the_fix(yaml_text, expected, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml_text)
    with pytest.raises(SystemExit):
        main(["fit", "-c", TINY, "-c", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0]
