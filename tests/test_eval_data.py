"""Tests for dewey_lab.eval.tasks.longembed and .loco: the stand-in benchmark files under tests/data, offline.

The hub path is exercised with a fake ``datasets.load_dataset`` that serves the same stand-in rows,
so it runs the same row -> task conversion as the local path without any network.
"""

import os

# Before `datasets` is imported anywhere in this process: never reach the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import json
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dewey_lab.eval.tasks.loco import LOCO_SUBSETS, load_loco
from dewey_lab.eval.tasks.longembed import LONGEMBED_REPO, LONGEMBED_REVISION, MTEB_NAMES, load_longembed
from dewey_lab.eval.tasks.task import RetrievalTask

DATA = Path(__file__).parent / "data"
LONGEMBED = DATA / "longembed"
LOCO = DATA / "loco"


def read_rows(path: Path) -> list[dict]:
    """Rows of a stand-in file, read independently of the module under test."""
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def content(task: RetrievalTask) -> tuple:
    """Everything but meta (provenance differs between hub and local), with dict order kept."""
    return (task.name, task.length, task.metric, list(task.corpus.items()), list(task.queries.items()),
            task.qrels)


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message, repr(message)
    return message


# --- LongEmbed, local folders ---------------------------------------------------------------------


def test_qmsum_jsonl_folder():
    (task,) = load_longembed("qmsum", source=str(LONGEMBED))
    assert (task.name, task.label, task.metric, task.length) == ("qmsum", "qmsum", "ndcg@10", None)
    assert list(task.corpus) == [f"qmsum-{i}" for i in range(5)]
    assert list(task.queries) == [f"qmsum-q{i}" for i in range(4)]
    assert task.corpus["qmsum-2"].startswith("Grad A: The recogniser is still failing on far-field mic")
    assert task.queries["qmsum-q3"] == "What did the minister say about teacher retention?"
    assert task.qrels == {"qmsum-q0": {"qmsum-0": 1}, "qmsum-q1": {"qmsum-1": 1},
                          "qmsum-q2": {"qmsum-2": 1}, "qmsum-q3": {"qmsum-4": 1}}
    assert task.meta == {"mteb_name": "LEMBQMSumRetrieval", "source": "local",
                         "path": str(LONGEMBED / "qmsum"), "revision": None}


def test_task_files_directly_in_source_folder():
    (nested,) = load_longembed("qmsum", source=str(LONGEMBED))
    (direct,) = load_longembed("qmsum", source=str(LONGEMBED / "qmsum"))
    assert content(direct) == content(nested)
    assert direct.meta["path"] == str(LONGEMBED / "qmsum")


def test_2wikimqa_parquet_folder():
    (task,) = load_longembed("2wikimqa", source=str(LONGEMBED))
    assert (task.name, task.metric, len(task.corpus), len(task.queries)) == ("2wikimqa", "ndcg@10", 4, 3)
    assert task.corpus["2wiki-3"].endswith("Charlie Chaplin was born on 16 April 1889 in London, England.")
    assert task.qrels == {"2wiki-q0": {"2wiki-0": 1}, "2wiki-q1": {"2wiki-1": 1, "2wiki-3": 1},
                          "2wiki-q2": {"2wiki-2": 1}}
    assert task.meta["mteb_name"] == "LEMBWikimQARetrieval"


def test_parquet_and_jsonl_give_the_same_task(tmp_path):
    for split in ("corpus", "queries", "qrels"):
        rows = read_rows(LONGEMBED / "2wikimqa" / f"{split}.parquet")
        write_jsonl(tmp_path / "2wikimqa" / f"{split}.jsonl", rows)
    (from_parquet,) = load_longembed("2wikimqa", source=str(LONGEMBED))
    (from_jsonl,) = load_longembed("2wikimqa", source=str(tmp_path))
    assert content(from_jsonl) == content(from_parquet)
    # and the other way round, for a jsonl stand-in
    for split in ("corpus", "queries", "qrels"):
        rows = read_rows(LONGEMBED / "passkey" / f"{split}.jsonl")
        (tmp_path / "passkey").mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "passkey" / f"{split}.parquet")
    assert [content(t) for t in load_longembed("passkey", source=str(tmp_path))] == [
        content(t) for t in load_longembed("passkey", source=str(LONGEMBED))
    ]


def test_passkey_one_task_per_length():
    tasks = load_longembed("passkey", source=str(LONGEMBED))
    assert [(t.name, t.length, t.label, t.metric) for t in tasks] == [
        ("passkey", 256, "passkey@256", "ndcg@1"),
        ("passkey", 512, "passkey@512", "ndcg@1"),
    ]
    for task in tasks:
        n = task.length
        assert list(task.corpus) == [f"passkey-{n}-{i}" for i in range(4)]  # only this length's candidates
        assert list(task.queries) == [f"passkey-{n}-q0", f"passkey-{n}-q2"]
        assert task.qrels == {f"passkey-{n}-q0": {f"passkey-{n}-0": 1},
                              f"passkey-{n}-q2": {f"passkey-{n}-2": 1}}
        assert task.meta["mteb_name"] == "LEMBPasskeyRetrieval"
    assert "Alice's pass key is 38271." in tasks[0].corpus["passkey-256-0"]
    assert tasks[1].queries["passkey-512-q2"] == "What is the pass key for Gus?"


def test_passkey_lengths_filter():
    (task,) = load_longembed("passkey", source=str(LONGEMBED), lengths=[512])
    assert task.label == "passkey@512" and len(task.corpus) == 4
    both = load_longembed("passkey", source=str(LONGEMBED), lengths=[512, 256, 512])
    assert [t.length for t in both] == [256, 512]


def test_lengths_ignored_for_real_tasks():
    (task,) = load_longembed("qmsum", source=str(LONGEMBED), lengths=[4096])
    assert task.length is None and len(task.corpus) == 5


def test_synthetic_qrels_with_context_length_and_ids_repeated_across_lengths(tmp_path):
    # As on the hub: qrels rows carry context_length, and ids need not be unique across lengths.
    folder = tmp_path / "needle"
    write_jsonl(folder / "corpus.jsonl", [{"doc_id": f"d{i}", "text": f"essay {n} {i}", "context_length": n}
                                          for n in (1024, 256) for i in range(2)])
    write_jsonl(folder / "queries.jsonl", [{"qid": "q0", "text": f"needle at {n}?", "context_length": n}
                                           for n in (1024, 256)])
    write_jsonl(folder / "qrels.jsonl", [{"qid": "q0", "doc_id": "d1", "context_length": 256},
                                         {"qid": "q0", "doc_id": "d0", "context_length": 1024}])
    tasks = load_longembed("needle", source=str(tmp_path))
    assert [(t.label, t.metric, t.meta["mteb_name"]) for t in tasks] == [
        ("needle@256", "ndcg@1", "LEMBNeedleRetrieval"), ("needle@1024", "ndcg@1", "LEMBNeedleRetrieval")]
    assert tasks[0].corpus == {"d0": "essay 256 0", "d1": "essay 256 1"}
    assert tasks[0].qrels == {"q0": {"d1": 1}} and tasks[1].qrels == {"q0": {"d0": 1}}


def test_qrels_score_and_relevance_fields(tmp_path):
    folder = tmp_path / "narrativeqa"
    write_jsonl(folder / "corpus.jsonl", [{"doc_id": f"d{i}", "text": f"story {i}"} for i in range(3)])
    write_jsonl(folder / "queries.jsonl", [{"qid": "q0", "text": "who?"}, {"qid": "q1", "text": "why?"}])
    write_jsonl(folder / "qrels.jsonl", [
        {"qid": "q0", "doc_id": "d0", "score": 2},
        {"qid": "q0", "doc_id": "d1", "score": 0},  # judged not relevant: dropped
        {"qid": "q1", "doc_id": "d2", "relevance": 1},
        {"qid": "q1", "doc_id": "d1"},  # no score: relevant
    ])
    (task,) = load_longembed("narrativeqa", source=str(tmp_path))
    assert task.qrels == {"q0": {"d0": 2}, "q1": {"d2": 1, "d1": 1}}
    assert task.meta["mteb_name"] == "LEMBNarrativeQARetrieval"


# --- LoCoV1, local folder -------------------------------------------------------------------------


def test_loco_local_all_subsets_present():
    tasks = load_loco(source=str(LOCO))
    assert [(t.name, t.metric, t.length) for t in tasks] == [
        ("loco/qmsum", "ndcg@10", None), ("loco/stackoverflow", "ndcg@10", None)]  # LOCO_SUBSETS order
    qmsum, so = tasks
    assert list(qmsum.corpus) == ["qmsum_0", "qmsum_1", "qmsum_2"]
    assert list(so.corpus) == ["so_0", "so_1", "so_2"]
    assert so.corpus["so_0"].startswith("How do I reverse a list in Python?")
    assert qmsum.qrels == {"qmsum_q0": {"qmsum_0": 1, "qmsum_1": 1}, "qmsum_q1": {"qmsum_2": 1}}
    assert so.qrels == {"so_q0": {"so_0": 1}, "so_q1": {"so_1": 1}}
    assert so.queries["so_q0"] == "python reverse list"
    assert qmsum.meta == {"source": "local", "path": str(LOCO), "revision": None, "mteb_name": None,
                          "subset": "qmsum"}


def test_loco_subset_selection():
    (task,) = load_loco(["stackoverflow"], source=str(LOCO))
    assert task.name == "loco/stackoverflow" and len(task.corpus) == 3


def test_loco_missing_qid_is_numbered_within_the_subset(tmp_path):
    shutil.copy(LOCO / "documents.jsonl", tmp_path / "documents.jsonl")
    rows = read_rows(LOCO / "queries.jsonl")
    for row in rows:
        del row["qid"]
    write_jsonl(tmp_path / "queries.jsonl", rows)
    qmsum, so = load_loco(source=str(tmp_path))
    assert list(qmsum.queries) == ["qmsum-q0", "qmsum-q1"]
    assert so.qrels == {"stackoverflow-q0": {"so_0": 1}, "stackoverflow-q1": {"so_1": 1}}


# --- errors: one line, right type, naming the fix -------------------------------------------------


def test_unknown_longembed_name():
    with pytest.raises(ValueError) as excinfo:
        load_longembed("narrative_qa", source=str(LONGEMBED))
    message = one_line(excinfo)
    assert "'narrative_qa'" in message and all(n in message for n in MTEB_NAMES)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        load_longembed("qmsum", source=str(tmp_path / "nowhere"))
    assert "does not exist" in one_line(excinfo) and "source" in one_line(excinfo)
    with pytest.raises(FileNotFoundError) as excinfo:
        load_loco(source=str(tmp_path / "nowhere"))
    assert "does not exist" in one_line(excinfo)


def test_folder_without_the_task(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        load_longembed("narrativeqa", source=str(LONGEMBED))
    assert "no narrativeqa/ subfolder" in one_line(excinfo)


def test_missing_qrels_file():
    with pytest.raises(FileNotFoundError) as excinfo:
        load_longembed("qmsum", source=str(DATA / "longembed_broken"))
    assert one_line(excinfo) == (f"{DATA / 'longembed_broken' / 'qmsum'} has no qrels.jsonl or "
                                 "qrels.parquet; "
                                 "LongEmbed folders need corpus, queries and qrels")


def test_both_jsonl_and_parquet(tmp_path):
    shutil.copytree(LONGEMBED / "qmsum", tmp_path / "qmsum")
    pq.write_table(pa.Table.from_pylist(read_rows(tmp_path / "qmsum" / "qrels.jsonl")),
                   tmp_path / "qmsum" / "qrels.parquet")
    with pytest.raises(ValueError) as excinfo:
        load_longembed("qmsum", source=str(tmp_path))
    assert "both qrels.jsonl and qrels.parquet" in one_line(excinfo)


def test_row_missing_a_field(tmp_path):
    shutil.copytree(LONGEMBED / "qmsum", tmp_path / "qmsum")
    rows = read_rows(tmp_path / "qmsum" / "corpus.jsonl")
    del rows[2]["doc_id"]
    write_jsonl(tmp_path / "qmsum" / "corpus.jsonl", rows)
    with pytest.raises(ValueError) as excinfo:
        load_longembed("qmsum", source=str(tmp_path))
    message = one_line(excinfo)
    assert f"{tmp_path / 'qmsum' / 'corpus.jsonl'} row 3: missing field 'doc_id'" in message
    assert "need doc_id, text" in message


def test_passkey_row_without_context_length(tmp_path):
    shutil.copytree(LONGEMBED / "passkey", tmp_path / "passkey")
    rows = read_rows(tmp_path / "passkey" / "queries.jsonl")
    del rows[1]["context_length"]
    write_jsonl(tmp_path / "passkey" / "queries.jsonl", rows)
    with pytest.raises(ValueError) as excinfo:
        load_longembed("passkey", source=str(tmp_path))
    assert "queries.jsonl row 2: missing field 'context_length'" in one_line(excinfo)


def test_invalid_json_line(tmp_path):
    shutil.copytree(LONGEMBED / "qmsum", tmp_path / "qmsum")
    with open(tmp_path / "qmsum" / "queries.jsonl", "a", encoding="utf-8") as f:
        f.write('{"qid": "x", "text": \n')
    with pytest.raises(ValueError) as excinfo:
        load_longembed("qmsum", source=str(tmp_path))
    assert "queries.jsonl line 5: invalid JSON" in one_line(excinfo)


def test_duplicate_doc_id(tmp_path):
    shutil.copytree(LONGEMBED / "qmsum", tmp_path / "qmsum")
    rows = read_rows(tmp_path / "qmsum" / "corpus.jsonl")
    write_jsonl(tmp_path / "qmsum" / "corpus.jsonl", rows + rows[:1])  # an exact repeat: dropped, counted
    (task,) = load_longembed("qmsum", source=str(tmp_path))
    assert len(task.corpus) == len(rows) and task.meta["warnings"] == {"duplicate_rows": 1}
    write_jsonl(tmp_path / "qmsum" / "corpus.jsonl", rows + [{**rows[0], "text": "another text"}])
    with pytest.raises(ValueError) as excinfo:
        load_longembed("qmsum", source=str(tmp_path))
    assert "row 6: duplicate doc_id 'qmsum-0' with a different text" in one_line(excinfo)


def test_qrels_naming_an_unknown_document(tmp_path):
    shutil.copytree(LONGEMBED / "qmsum", tmp_path / "qmsum")
    rows = read_rows(tmp_path / "qmsum" / "qrels.jsonl")
    rows[1]["doc_id"] = "qmsum-99"
    write_jsonl(tmp_path / "qmsum" / "qrels.jsonl", rows)
    with pytest.raises(ValueError) as excinfo:
        load_longembed("qmsum", source=str(tmp_path))
    assert "'qmsum-99', which is not in the corpus" in one_line(excinfo)


def test_requested_length_not_present():
    with pytest.raises(ValueError) as excinfo:
        load_longembed("passkey", source=str(LONGEMBED), lengths=[256, 1024])
    message = one_line(excinfo)
    assert "context_length 1024 not in" in message and message.endswith("available: 256, 512")


def test_unknown_loco_subset():
    with pytest.raises(ValueError) as excinfo:
        load_loco(["stack_overflow"], source=str(LOCO))
    message = one_line(excinfo)
    assert "'stack_overflow'" in message and all(s in message for s in LOCO_SUBSETS)


def test_loco_subset_absent_from_local_data():
    with pytest.raises(ValueError) as excinfo:
        load_loco(["gov_report"], source=str(LOCO))
    assert "subsets present: qmsum, stackoverflow" in one_line(excinfo)


def test_loco_missing_file_and_field(tmp_path):
    shutil.copy(LOCO / "queries.jsonl", tmp_path / "queries.jsonl")
    with pytest.raises(FileNotFoundError) as excinfo:
        load_loco(source=str(tmp_path))
    assert "has no documents.jsonl or documents.parquet" in one_line(excinfo)
    rows = read_rows(LOCO / "documents.jsonl")
    del rows[4]["passage"]
    write_jsonl(tmp_path / "documents.jsonl", rows)
    with pytest.raises(ValueError) as excinfo:
        load_loco(source=str(tmp_path))
    assert "documents.jsonl row 5: missing field 'passage'" in one_line(excinfo)


# --- hub path, with a fake load_dataset serving the stand-in rows ---------------------------------


@pytest.fixture
def fake_hub(monkeypatch):
    """Patch datasets.load_dataset; return the list of (path, name, split, revision) calls."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(path, name=None, *, split=None, revision=None, **kwargs):
        calls.append((path, name, split, revision))
        if path == LONGEMBED_REPO:
            (file,) = [f for f in (LONGEMBED / name).iterdir() if f.stem == split]
        else:
            assert split == "test" and name is None
            file = LOCO / {"hazyresearch/LoCoV1-Queries": "queries.jsonl",
                           "hazyresearch/LoCoV1-Documents": "documents.jsonl"}[path]
        return datasets.Dataset.from_list(read_rows(file))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.mark.parametrize("name", ["qmsum", "2wikimqa", "passkey"])
def test_longembed_hub_matches_local(fake_hub, name):
    hub = load_longembed(name)
    splits = ("corpus", "queries", "qrels")
    assert fake_hub == [(LONGEMBED_REPO, name, split, LONGEMBED_REVISION) for split in splits]
    assert [content(t) for t in hub] == [content(t) for t in load_longembed(name, source=str(LONGEMBED))]
    assert hub[0].meta == {"mteb_name": MTEB_NAMES[name], "source": "hub", "repo": LONGEMBED_REPO,
                           "revision": LONGEMBED_REVISION}


def test_longembed_hub_lengths_and_revision(fake_hub):
    (task,) = load_longembed("passkey", revision="main", lengths=[256])
    assert task.label == "passkey@256" and task.meta["revision"] == "main"
    assert {call[3] for call in fake_hub} == {"main"}


def test_loco_hub_matches_local(fake_hub):
    hub = load_loco()
    assert fake_hub == [("hazyresearch/LoCoV1-Queries", None, "test", None),
                        ("hazyresearch/LoCoV1-Documents", None, "test", None)]
    assert [content(t) for t in hub] == [content(t) for t in load_loco(source=str(LOCO))]
    repos = ["hazyresearch/LoCoV1-Queries", "hazyresearch/LoCoV1-Documents"]
    assert hub[0].meta == {"source": "hub", "repo": repos,
                           "revision": None, "mteb_name": None, "subset": "qmsum"}
    fake_hub.clear()
    (task,) = load_loco(["qmsum"], revision="abc123")
    assert {call[3] for call in fake_hub} == {"abc123"} and task.meta["revision"] == "abc123"


def test_hub_offline_error_is_one_line_and_names_source(monkeypatch):
    datasets = pytest.importorskip("datasets")
    original = ConnectionError("Couldn't reach 'dwzhu/LongEmbed' on the Hub (LocalEntryNotFoundError)\nmore")

    def load_dataset(*args, **kwargs):
        raise original

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError) as excinfo:
        load_longembed("qmsum")
    message = one_line(excinfo)
    assert excinfo.value.__cause__ is original
    assert "dwzhu/LongEmbed qmsum" in message and LONGEMBED_REVISION in message
    assert "HF_HUB_OFFLINE=0" in message and "source=" in message
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    with pytest.raises(RuntimeError) as excinfo:
        load_loco()
    message = one_line(excinfo)
    assert "hazyresearch/LoCoV1-Queries" in message and "network" in message and "source=" in message


def test_hub_without_datasets_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ImportError) as excinfo:
        load_longembed("qmsum")
    expected = "loading from the hub needs the datasets package: pip install 'dewey-lab[hub]'"
    assert one_line(excinfo) == expected
    (task,) = load_longembed("qmsum", source=str(LONGEMBED))  # local folders never need it
    assert len(task.corpus) == 5


def test_synthetic_qrels_naming_a_query_of_no_length(tmp_path):
    shutil.copytree(LONGEMBED / "passkey", tmp_path / "passkey")
    rows = read_rows(tmp_path / "passkey" / "qrels.jsonl")
    rows[3]["qid"] = "passkey-1024-q0"
    write_jsonl(tmp_path / "passkey" / "qrels.jsonl", rows)
    with pytest.raises(ValueError) as excinfo:
        load_longembed("passkey", source=str(tmp_path))
    assert "qrels.jsonl row 4: qrels name query 'passkey-1024-q0', which is in no length" in one_line(excinfo)
