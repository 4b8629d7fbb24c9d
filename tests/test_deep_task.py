"""deep/heldout and deep/langref: each query a sentence from deep inside one real document.

Checked against references written here: a hand-written normalisation, depths re-counted by
tokenizing the text before each sentence, lengths by tokenizing the documents, pydoc pages
rendered in this process, and word runs shared with them found by a plain set of word tuples.
"""

import importlib
import json
import logging
import platform
import pydoc
import re
from pydoc_data.topics import topics

import pytest

from dewey_lab.eval.tasks.deep import make_deep
from dewey_lab.eval.tasks.heldout import EVAL_PACKAGES, heldout_documents, package_versions

HELDOUT = {"n_queries": 50, "max_tokens": 8190, "min_depth": 1024}  # the defaults of --lengths 8k
LANGREF = {"n_queries": 10_000, "max_tokens": 8192, "min_depth": 1024}  # every candidate
MIN_WORDS, MAX_WORDS = 8, 40
RENDERED = ("builtins", "operator", "types", "string", "pdb")  # str/dict/number docstrings, pdb's commands:
SHARED_WORDS = 32                                                # near langref's text


def flat(text):
    """Each line without leading spaces, tabs and '|' (pydoc's class gutter), whitespace runs one space."""
    return " ".join(word for line in text.split("\n") for word in line.lstrip(" \t|").split())


def shares_a_run(text, pages, n=SHARED_WORDS):
    """Whether ``text`` and any of ``pages`` (all flattened, lower-cased) share n consecutive words."""
    seen = {tuple(words[i:i + n]) for page in pages for words in [flat(page).lower().split()]
            for i in range(len(words) - n + 1)}
    words = flat(text).lower().split()
    return any(tuple(words[i:i + n]) in seen for i in range(len(words) - n + 1))


@pytest.fixture(scope="module")
def rendered_pages(tmp_path_factory):
    """pydoc pages rendered here, as a corpus jsonl: langref must drop the sentences they share."""
    pages = {m: pydoc.render_doc(importlib.import_module(m), renderer=pydoc.plaintext) for m in RENDERED}
    path = tmp_path_factory.mktemp("rendered") / "pages.jsonl"
    path.write_text("".join(json.dumps({"id": m, "text": t}) + "\n" for m, t in pages.items()))
    return path, pages


@pytest.fixture(scope="module")
def heldout_task(tokenizer, small_corpus_path):
    return make_deep("heldout", tokenizer, corpus_path=str(small_corpus_path), **HELDOUT)


@pytest.fixture(scope="module")
def langref_task(tokenizer, rendered_pages):
    return make_deep("langref", tokenizer, corpus_path=str(rendered_pages[0]), **LANGREF)


@pytest.fixture(scope="module")
def sources():
    """What each task was cut from: the networkx modules' docstrings and the topics."""
    return {"heldout": {d: doc.text for d, doc in heldout_documents().items()}, "langref": topics}


@pytest.fixture(params=["heldout", "langref"])
def task(request, heldout_task, langref_task):
    return {"heldout": heldout_task, "langref": langref_task}[request.param]


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


def test_heldout_documents_are_the_evaluation_only_modules(heldout_task, sources):
    assert list(heldout_task.corpus) == list(sources["heldout"]) and len(heldout_task.corpus) > 200
    assert heldout_task.name == "deep/heldout" and heldout_task.meta["packages"] == package_versions()
    assert all(d.split(".")[0] in EVAL_PACKAGES for d in heldout_task.corpus)
    # one query per document at the defaults: queries in 50 documents (deep/pydoc had 10)
    docs = [next(iter(rels)) for rels in heldout_task.qrels.values()]
    assert len(heldout_task.queries) == 50 and len(set(docs)) == 50
    assert heldout_task.meta["shared_dropped"] == []


def test_langref_is_the_topics_without_pydoc_text(langref_task, rendered_pages):
    assert langref_task.name == "deep/langref" and langref_task.meta["python"] == platform.python_version()
    assert len(topics) == 79
    # a topic sharing a run of 32 words with a page is left out (debugger: pdb's docstring), the rest kept
    sharing = [name for name, text in topics.items() if shares_a_run(text, rendered_pages[1].values())]
    assert "debugger" in sharing and langref_task.meta["shared_dropped"] == sharing
    assert list(langref_task.corpus) == [name for name in topics if name not in sharing]
    # the deepest any topic goes: fewer than 50 of the 79 are longer than min_depth, so fewer than 50 hold
    # queries; every topic with a candidate does (round-robin)
    docs = {next(iter(rels)) for rels in langref_task.qrels.values()}
    assert 10 < len(docs) < 50
    pages = [flat(text).lower() for text in rendered_pages[1].values()]
    assert not [q for q in langref_task.queries.values() if any(q.lower() in page for page in pages)]
    # the str / dict docstrings share a few sentences with the topics; those were dropped, not missed
    assert langref_task.meta["in_training_dropped"] >= 1
    meta = langref_task.meta
    assert len(langref_task.queries) + meta["in_training_dropped"] == meta["n_candidates"]


def test_seed_fixes_the_queries(tokenizer, small_corpus_path, heldout_task):
    again = make_deep("heldout", tokenizer, corpus_path=str(small_corpus_path), **HELDOUT)
    assert (again.corpus, again.queries, again.qrels, again.meta) == (
        heldout_task.corpus, heldout_task.queries, heldout_task.qrels, heldout_task.meta)
    other = make_deep("heldout", tokenizer, corpus_path=str(small_corpus_path), **HELDOUT, seed=1)
    assert other.corpus == heldout_task.corpus and other.queries != heldout_task.queries


def test_fewer_sentences_than_asked_warns(tokenizer, rendered_pages, caplog):
    with caplog.at_level(logging.WARNING, logger="dewey_lab.eval.tasks.deep"):
        task = make_deep("langref", tokenizer, corpus_path=str(rendered_pages[0]), **{**LANGREF, "n_queries": 1000})
    assert len(task.queries) + task.meta["in_training_dropped"] == task.meta["n_candidates"] < 1000
    assert f"only {len(task.queries)} of 1000 queries" in caplog.text


def test_bad_arguments_are_one_line_errors(tokenizer, small_corpus_path):
    with pytest.raises(ValueError, match=r"unknown source 'pydoc'; choose one of heldout, langref") as err:
        make_deep("pydoc", tokenizer)
    assert "\n" not in str(err.value)
    # no topic has a prose sentence 8000 tokens in before a cut at 8100
    with pytest.raises(ValueError, match=r"no sentence qualifies .*; lower min_depth or raise max_tokens"):
        make_deep("langref", tokenizer, corpus_path=str(small_corpus_path), min_depth=8099, max_tokens=8100)
