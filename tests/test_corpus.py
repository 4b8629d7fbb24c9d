"""Tests for dewey_lab.data.corpus and dewey_lab.data.pydoc: offline, small inputs, hand-written answers."""

import os

# Before `datasets` is imported anywhere in this process: never reach the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import gzip
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dewey_lab.data.corpus import (
    CorpusSource,
    Document,
    HFCorpus,
    JsonlCorpus,
    MixtureCorpus,
    ParquetCorpus,
    TextCorpus,
)
from dewey_lab.data.pydoc import PydocCorpus, _clean_pydoc, _path_substitutions


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def pairs(source: CorpusSource) -> list[tuple[str, str]]:
    return [(d.doc_id, d.text) for d in source.documents()]


# --- local formats -----------------------------------------------------------------


def test_jsonl_file_ids_and_fallback(tmp_path):
    f = write_jsonl(
        tmp_path / "a.jsonl",
        [{"id": "x1", "text": "hello"}, {"text": "no id here"}, {"id": 7, "text": "seven"}],
    )
    assert pairs(JsonlCorpus(str(f))) == [("x1", "hello"), ("a.jsonl:2", "no id here"), ("7", "seven")]


def test_jsonl_directory_sorted_with_gz_and_custom_fields(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"body": "from b", "key": "b0"}])
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": "from a (gz)", "key": "a0"}) + "\n\n")  # blank line tolerated
    (tmp_path / "ignored.txt").write_text("not jsonl")
    corpus = JsonlCorpus(str(tmp_path), text_field="body", id_field="key")
    assert pairs(corpus) == [("a0", "from a (gz)"), ("b0", "from b")]
    assert pairs(JsonlCorpus(str(tmp_path), text_field="body", id_field=None)) == [
        ("a.jsonl.gz:1", "from a (gz)"),
        ("b.jsonl:1", "from b"),
    ]


def test_jsonl_bad_line_names_file_line_and_field(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON.*'text'"):
        list(JsonlCorpus(str(f)).documents())
    write_jsonl(f, [{"text": "ok"}, {"text": "ok"}, {"content": "wrong key"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: missing text field 'text' \(found \['content'\]\)"):
        list(JsonlCorpus(str(f)).documents())


def test_text_corpus_per_file_and_per_line(tmp_path):
    (tmp_path / "b.txt").write_text("beta line 1\nbeta line 2\n", encoding="utf-8")
    (tmp_path / "a.txt").write_bytes(b"caf\xc3\xa9 \xff end")  # invalid byte -> U+FFFD
    (tmp_path / "skip.md").write_text("not a txt")
    assert pairs(TextCorpus(str(tmp_path))) == [
        ("a.txt", "café \ufffd end"),
        ("b.txt", "beta line 1\nbeta line 2\n"),
    ]
    assert pairs(TextCorpus(str(tmp_path / "b.txt"), per_line=True)) == [
        ("b.txt:1", "beta line 1"),
        ("b.txt:2", "beta line 2"),
    ]


def test_parquet_batches_ids_and_nulls(tmp_path, monkeypatch):
    monkeypatch.setattr(ParquetCorpus, "_batch_rows", 2)  # force several record batches
    table = pa.table({"id": ["p0", None, "p2", "p3", "p4"], "text": ["zero", "one", None, "three", "four"]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=2)
    pq.write_table(pa.table({"text": ["other file"]}), tmp_path / "b.parquet")
    corpus = ParquetCorpus(str(tmp_path))
    assert pairs(corpus) == [
        ("p0", "zero"),
        ("a.parquet:1", "one"),
        ("p3", "three"),
        ("p4", "four"),
        ("b.parquet:0", "other file"),
    ]
    assert corpus.skipped_empty == 1  # the null text
    with pytest.raises(ValueError, match=r"a\.parquet: missing text column 'body'"):
        list(ParquetCorpus(str(tmp_path), text_field="body").documents())


# --- shared behaviour ----------------------------------------------------------------


def test_empty_and_whitespace_texts_are_skipped_and_counted(tmp_path):
    f = write_jsonl(
        tmp_path / "e.jsonl",
        [{"text": ""}, {"text": "keep me"}, {"text": "  \n\t "}, {"text": None}, {"text": " padded "}],
    )
    corpus = JsonlCorpus(str(f))
    assert pairs(corpus) == [("e.jsonl:2", "keep me"), ("e.jsonl:5", " padded ")]
    assert corpus.skipped_empty == 3
    assert len(list(corpus.documents())) == 2 and corpus.skipped_empty == 3  # recounted, not accumulated


def test_limit_counts_kept_documents(tmp_path):
    f = write_jsonl(tmp_path / "l.jsonl", [{"text": t} for t in ["a", " ", "b", "c", "d"]])
    assert [d.text for d in JsonlCorpus(str(f), limit=2).documents()] == ["a", "b"]
    assert [d.text for d in JsonlCorpus(str(f), limit=3).documents()] == ["a", "b", "c"]
    assert list(JsonlCorpus(str(f), limit=0).documents()) == []
    with pytest.raises(ValueError, match="limit"):
        JsonlCorpus(str(f), limit=-1)


@pytest.mark.parametrize("cls", [JsonlCorpus, TextCorpus, ParquetCorpus])
def test_missing_path_is_one_line_naming_the_fix(tmp_path, cls):
    missing = tmp_path / "nope" / "x.jsonl"
    with pytest.raises(FileNotFoundError) as info:
        list(cls(str(missing)).documents())
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(
        f"corpus path {missing} does not exist; set data.corpus.init_args.path to an existing"
    )
    with pytest.raises(FileNotFoundError, match="has no .* files; set data.corpus.init_args.path"):
        list(cls(str(tmp_path)).documents())  # existing but empty directory


def test_fingerprint_stable_and_tracks_file_and_config(tmp_path):
    f = write_jsonl(tmp_path / "f.jsonl", [{"text": "one"}])
    fp = JsonlCorpus(str(f)).fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert JsonlCorpus(str(f)).fingerprint() == fp
    assert JsonlCorpus(str(f), text_field="body").fingerprint() != fp
    assert JsonlCorpus(str(f), limit=1).fingerprint() != fp
    write_jsonl(f, [{"text": "one"}, {"text": "two"}])
    assert JsonlCorpus(str(f)).fingerprint() != fp


def test_document_is_frozen():
    doc = Document("a", "b")
    with pytest.raises(AttributeError):
        doc.text = "c"  # type: ignore[misc]


# --- Hugging Face (offline, local json stand-ins) --------------------------------------


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """load_dataset leaves lock files in the datasets cache even when streaming: keep them in tmp."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def test_hf_text_schema(tmp_path, hf_cache):
    f = write_jsonl(
        tmp_path / "fw.jsonl",
        [{"id": "<urn:1>", "text": "edu page", "score": 3.1}, {"id": "<urn:2>", "text": "  "}],
    )
    corpus = HFCorpus("json", data_files=str(f))
    assert pairs(corpus) == [("<urn:1>", "edu page")]
    assert corpus.skipped_empty == 1


def test_hf_conversations_schema_auto_and_explicit(tmp_path, hf_cache):
    rows = [
        {
            "id": 11,
            "conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4."}],
        },
        {"id": 12, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]},
    ]
    f = write_jsonl(tmp_path / "ii.jsonl", rows)
    expected = [("11", "What is 2+2?\n\n4."), ("12", "Hi")]
    assert pairs(HFCorpus("json", data_files=[str(f)])) == expected
    assert pairs(HFCorpus("json", data_files=str(f), schema="conversations", streaming=True)) == expected
    with pytest.raises(ValueError, match=r"row 0: no 'text' column"):
        list(HFCorpus("json", data_files=str(f), schema="text").documents())


def test_hf_limit_and_fallback_ids(tmp_path, hf_cache):
    f = write_jsonl(tmp_path / "n.jsonl", [{"text": f"doc {i}"} for i in range(5)])
    assert pairs(HFCorpus("json", data_files=str(f), limit=2)) == [("train:0", "doc 0"), ("train:1", "doc 1")]


def test_hf_missing_datasets_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"pip install -e \.\[hub\]"):
        list(HFCorpus("HuggingFaceFW/fineweb-edu").documents())


# --- pydoc --------------------------------------------------------------------------------

PYDOC_MODULES = ["colorsys", "keyword", "shutil", "sys", "no_such_module_xyz"]


@pytest.fixture(scope="module")
def pydoc_cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pydoc") / "sub" / "pydoc.jsonl"
    list(PydocCorpus(str(path), modules=PYDOC_MODULES).documents())
    return path


def test_pydoc_builds_cache_with_clean_pages(pydoc_cache):
    assert sorted(p.name for p in pydoc_cache.parent.iterdir()) == ["pydoc.jsonl"]  # no tmp leftovers
    docs = list(PydocCorpus(str(pydoc_cache), modules=PYDOC_MODULES).documents())
    assert [d.doc_id for d in docs] == ["colorsys", "keyword", "shutil", "sys"]  # unimportable one skipped
    colorsys = docs[0].text
    assert colorsys.startswith(
        "Python Library Documentation: module colorsys\n\nNAME\n    colorsys - Conversion functions"
    )
    assert "\nFUNCTIONS\n    hls_to_rgb(h, l, s)\n" in colorsys
    for doc in docs:
        assert "\nFILE\n" not in doc.text and " at 0x" not in doc.text
        assert str(Path(sys.base_prefix)) not in doc.text and str(Path(sys.prefix)) not in doc.text
    assert "copy_function=<function copy2>" in docs[2].text  # address stripped from the default repr
    # the page of sys shows sys.argv: the renderer's path, under the repository root, pinned where it first lived
    assert "\n    argv = ['<project>/dewey_lab/corpus.py']\n" in docs[3].text


def test_project_is_the_repository_root():
    root = str(Path(__file__).resolve().parents[1])  # tests/ sits in the repository root
    assert (root, "<project>") in _path_substitutions()


def test_pydoc_second_read_uses_cache_and_is_identical(pydoc_cache, monkeypatch):
    first = list(PydocCorpus(str(pydoc_cache), modules=PYDOC_MODULES).documents())
    monkeypatch.setattr(PydocCorpus, "_build", lambda self, path: pytest.fail("cache should be reused"))
    again = PydocCorpus(str(pydoc_cache), modules=PYDOC_MODULES)
    assert list(again.documents()) == first
    assert [d.doc_id for d in PydocCorpus(str(pydoc_cache), modules=PYDOC_MODULES, limit=1).documents()] == [
        "colorsys"
    ]


def test_pydoc_rebuild_is_byte_identical(pydoc_cache, tmp_path):
    other = tmp_path / "again.jsonl"
    fp = PydocCorpus(str(pydoc_cache), modules=PYDOC_MODULES).fingerprint()
    assert PydocCorpus(str(other), modules=PYDOC_MODULES).fingerprint() == fp  # builds, content hash
    assert other.read_bytes() == pydoc_cache.read_bytes()


def test_clean_pydoc_drops_file_section_addresses_and_paths():
    page = (
        "Python Library Documentation: module m\n\nNAME\n    m\n\n"
        "FUNCTIONS\n    f(key=<function g at 0x7f3a2b1c>)\n\n"
        "DATA\n    api = <PyDLL 'None', handle 7f0ef9c6a2e0>\n    where = '/opt/py/lib/x'\n\n"
        "FILE\n    /opt/py/lib/m.py\n\n"
    )
    assert _clean_pydoc(page, [("/opt/py", "<python>")]) == (
        "Python Library Documentation: module m\n\nNAME\n    m\n\n"
        "FUNCTIONS\n    f(key=<function g>)\n\n"
        "DATA\n    api = <PyDLL 'None'>\n    where = '<python>/lib/x'\n"
    )


def test_pydoc_rejects_side_effect_modules_and_foreign_cache(pydoc_cache):
    with pytest.raises(ValueError, match="antigravity"):
        PydocCorpus(str(pydoc_cache), modules=["json", "antigravity"])
    with pytest.raises(ValueError, match="holds module 'colorsys', not in modules"):
        list(PydocCorpus(str(pydoc_cache), modules=["json"]).documents())


# --- mixture --------------------------------------------------------------------------------


def test_mixture_prefixes_ids_sums_skips_and_limits(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "1", "text": "a1"}, {"id": "2", "text": ""}])
    b = write_jsonl(
        tmp_path / "b.jsonl", [{"id": "1", "text": "b1"}, {"id": "2", "text": " "}, {"id": "3", "text": "b3"}]
    )
    mix = MixtureCorpus([JsonlCorpus(str(a)), JsonlCorpus(str(b))])
    assert pairs(mix) == [("0:1", "a1"), ("1:1", "b1"), ("1:3", "b3")]
    assert mix.skipped_empty == 2
    limited = MixtureCorpus([JsonlCorpus(str(a)), JsonlCorpus(str(b))], limit=1)
    list(mix.documents())
    assert pairs(limited) == [("0:1", "a1")] and limited.skipped_empty == 0
    mix.limit = 1  # stops inside source 0: source 1 must not report its previous count
    assert pairs(mix) == [("0:1", "a1")] and mix.skipped_empty == 0
    assert (
        mix.fingerprint() != MixtureCorpus([JsonlCorpus(str(b)), JsonlCorpus(str(a))], limit=1).fingerprint()
    )


def test_mixture_from_jsonargparse_config(tmp_path):
    jsonargparse = pytest.importorskip("jsonargparse")
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "from jsonl"}])
    (tmp_path / "t.txt").write_text("from txt")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--corpus", type=CorpusSource)
    config = {
        "class_path": "dewey_lab.data.corpus.MixtureCorpus",
        "init_args": {
            "sources": [
                {"class_path": "dewey_lab.data.corpus.JsonlCorpus", "init_args": {"path": str(a)}},
                {"class_path": "dewey_lab.data.corpus.TextCorpus", "init_args": {"path": str(tmp_path / "t.txt")}},
            ],
            "limit": 5,
        },
    }
    cfg = parser.parse_args(["--corpus", json.dumps(config)])
    corpus = parser.instantiate_classes(cfg).corpus
    assert pairs(corpus) == [("0:a.jsonl:1", "from jsonl"), ("1:t.txt", "from txt")]
