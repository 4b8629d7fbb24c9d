"""deep/pydoc and deep/langref: each query a sentence from deep inside one real document.

Checked against references written here: a hand-written normalisation, the split recomputed with
hashlib, depths re-counted by tokenizing the text before each sentence, lengths by tokenizing the
documents, and pydoc pages rendered in this process.
"""

import hashlib
import importlib
import json
import logging
import platform
import pydoc
import re
from pydoc_data.topics import topics

import pytest

from dewey_lab.eval.tasks.deep import make_deep

VAL = 0.5  # the ten-module test corpus holds out 8 pages at 0.5 (4 long enough for depth 1024)
PYDOC = {"n_queries": 12, "max_tokens": 4096, "min_depth": 1024, "val_fraction": VAL}
LANGREF = {"n_queries": 10_000, "max_tokens": 8192, "min_depth": 1024}  # every candidate
MIN_WORDS, MAX_WORDS = 8, 40
RENDERED = ("builtins", "operator", "types", "string")  # str/dict/number docstrings, near langref's text


def flat(text):
    """Each line without leading spaces, tabs and '|' (pydoc's class gutter), whitespace runs one space."""
    return " ".join(word for line in text.split("\n") for word in line.lstrip(" \t|").split())


def held_out(doc_id, fraction):
    """windows.py's split, by hand: sha256 of the id, first 8 bytes little-endian, over 2**64."""
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "little") / 2**64 < fraction


@pytest.fixture(scope="module")
def rendered_pages(tmp_path_factory):
    """pydoc pages rendered here, as a corpus jsonl: langref must drop the sentences they share."""
    pages = {m: pydoc.render_doc(importlib.import_module(m), renderer=pydoc.plaintext) for m in RENDERED}
    path = tmp_path_factory.mktemp("rendered") / "pages.jsonl"
    path.write_text("".join(json.dumps({"id": m, "text": t}) + "\n" for m, t in pages.items()))
    return path, pages


@pytest.fixture(scope="module")
def pydoc_task(tokenizer, small_corpus_path):
    return make_deep("pydoc", tokenizer, corpus_path=str(small_corpus_path), **PYDOC)


@pytest.fixture(scope="module")
def langref_task(tokenizer, rendered_pages):
    return make_deep("langref", tokenizer, corpus_path=str(rendered_pages[0]), **LANGREF)


@pytest.fixture(scope="module")
def sources(small_corpus_path):
    """What each task was cut from: the corpus file's pages and the topics."""
    rows = [json.loads(line) for line in small_corpus_path.read_text().splitlines() if line.strip()]
    return {"pydoc": {r["id"]: r["text"] for r in rows}, "langref": topics}


@pytest.fixture(params=["pydoc", "langref"])
def task(request, pydoc_task, langref_task):
    return {"pydoc": pydoc_task, "langref": langref_task}[request.param]


def test_each_query_is_in_exactly_its_document(task):
    docs = {doc_id: flat(text).lower() for doc_id, text in task.corpus.items()}
    assert task.queries and task.metric == "ndcg@10" and task.length is None
    for qid, query in task.queries.items():
        assert query == flat(query) and MIN_WORDS <= len(query.split()) <= MAX_WORDS, query
        assert [d for d, text in docs.items() if query.lower() in text] == list(task.qrels[qid]), query
        assert task.qrels[qid] == {next(iter(task.qrels[qid])): 1}


def test_depth_recounted_from_the_text_before_the_sentence(task, tokenizer):
    sep = r"(?:[^\S\n]|\n[ \t|]*)+"  # whitespace, or a line break and the next line's gutter
    qids = list(task.queries)[:60]  # a spread over documents (round-robin), enough to recount
    prefixes = []
    for qid in qids:
        doc = task.corpus[next(iter(task.qrels[qid]))]
        match = re.search(sep.join(map(re.escape, task.queries[qid].split())), doc, re.IGNORECASE)
        assert match, task.queries[qid]
        prefixes.append(doc[:match.start()])
    counts = [len(ids) for ids in tokenizer(prefixes, add_special_tokens=False)["input_ids"]]
    assert min(counts) >= task.meta["min_depth"]
    assert counts == [task.meta["depths"][q] for q in qids]


def test_documents_are_cut_at_whitespace_to_max_tokens(task, tokenizer, sources):
    source = sources[task.meta["source"]]
    max_tokens = task.meta["max_tokens"]
    counts = tokenizer(list(task.corpus.values()), add_special_tokens=False)["input_ids"]
    n_cut = 0
    for (doc_id, doc), ids in zip(task.corpus.items(), counts, strict=True):
        assert len(ids) <= max_tokens, doc_id
        original = source[doc_id]
        assert original.startswith(doc), doc_id
        if doc != original:
            n_cut += 1
            assert original[len(doc)].isspace() and len(ids) > max_tokens - 64, doc_id
    assert n_cut == task.meta["n_cut"] >= 1


def test_pydoc_documents_are_the_held_out_pages(pydoc_task, sources):
    pages = sources["pydoc"]
    expected = [doc_id for doc_id in pages if held_out(doc_id, VAL)]
    assert list(pydoc_task.corpus) == expected and len(expected) == 8
    assert pydoc_task.name == "deep/pydoc" and pydoc_task.meta["val_fraction"] == VAL
    assert len(pydoc_task.queries) == PYDOC["n_queries"]
    # round-robin: the first round takes one sentence from each document that has one
    docs = [next(iter(rels)) for rels in pydoc_task.qrels.values()]
    assert len(set(docs[:len(set(docs))])) == len(set(docs)) > 1


def test_langref_is_the_topics_without_pydoc_sentences(langref_task, rendered_pages):
    assert langref_task.name == "deep/langref" and list(langref_task.corpus) == list(topics)
    assert langref_task.meta["python"] == platform.python_version()
    assert langref_task.meta["n_docs"] == len(topics) == 79
    pages = [flat(text).lower() for text in rendered_pages[1].values()]
    assert not [q for q in langref_task.queries.values() if any(q.lower() in page for page in pages)]
    # the str / dict docstrings share a few sentences with the topics; those were dropped, not missed
    assert langref_task.meta["in_training_dropped"] >= 1
    meta = langref_task.meta
    assert len(langref_task.queries) + meta["in_training_dropped"] == meta["n_candidates"]


def test_seed_fixes_the_queries(tokenizer, small_corpus_path, pydoc_task):
    again = make_deep("pydoc", tokenizer, corpus_path=str(small_corpus_path), **PYDOC)
    assert (again.corpus, again.queries, again.qrels, again.meta) == (
        pydoc_task.corpus, pydoc_task.queries, pydoc_task.qrels, pydoc_task.meta)
    other = make_deep("pydoc", tokenizer, corpus_path=str(small_corpus_path), **PYDOC, seed=1)
    assert other.corpus == pydoc_task.corpus and other.queries != pydoc_task.queries


def test_fewer_sentences_than_asked_warns(tokenizer, small_corpus_path, caplog):
    with caplog.at_level(logging.WARNING, logger="dewey_lab.eval.tasks.deep"):
        task = make_deep("pydoc", tokenizer, corpus_path=str(small_corpus_path),
                         **{**PYDOC, "n_queries": 1000})
    assert len(task.queries) + task.meta["in_training_dropped"] == task.meta["n_candidates"] < 1000
    assert f"only {len(task.queries)} of 1000 queries" in caplog.text


def test_bad_arguments_are_one_line_errors(tokenizer, small_corpus_path):
    with pytest.raises(ValueError, match=r"unknown source 'wiki'; choose one of pydoc, langref") as err:
        make_deep("wiki", tokenizer)
    assert "\n" not in str(err.value)
    # at 0.08 the ten-module corpus holds out only short pages (glob, shlex, fnmatch)
    with pytest.raises(ValueError, match=r"no sentence qualifies .*; lower min_depth or raise val_fraction"):
        make_deep("pydoc", tokenizer, corpus_path=str(small_corpus_path), min_depth=1024, val_fraction=0.08)
