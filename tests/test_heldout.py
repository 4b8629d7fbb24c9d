"""The evaluation-only text (dewey_lab/eval/tasks/heldout.py) and what every eval task built on it
shares with training text.

References written here: each module's text rebuilt by importing it and reading ``__doc__`` with
``inspect`` (the code under test reads the source with ``ast``); the training text's 50-token
spans built from the full pydoc corpus (every page, a superset of any training split), tokenized
here and hashed with a rolling hash written here.
"""

import importlib
import inspect
import re

import numpy as np
import pytest

from dewey_lab.data.pydoc import PydocCorpus, default_pydoc_modules
from dewey_lab.eval.tasks.deep import make_deep
from dewey_lab.eval.tasks.heldout import (
    EVAL_PACKAGES,
    default_haystack,
    heldout_documents,
    package_versions,
    read_haystack,
)
from dewey_lab.eval.tasks.semantic import make_semantic
from dewey_lab.eval.tasks.synthetic import make_needle

SPAN = 50  # tokens: no eval text may share a span this long with training text
# small modules with plain functions and classes, a package __init__ and a reST-table docstring
REBUILT = ("networkx.algorithms.core", "networkx.algorithms.cuts", "networkx.classes.filters",
           "networkx.utils.union_find", "networkx.algorithms.flow.dinitz_alg", "networkx.algorithms.community",
           "networkx.linalg.algebraicconnectivity")
ADORNMENT = set("=-~*^#+_")


def is_adornment(line):
    stripped = line.strip()
    return len(stripped.replace(" ", "")) >= 3 and set(stripped) <= ADORNMENT | {" ", "\t"}


def by_inspect(name):
    """A module's text rebuilt from the imported module: its docstring, then every public function and
    class defined in it, ordered by source line, a class followed by its public methods and __init__."""
    module = importlib.import_module(name)
    own = [obj for key, obj in vars(module).items() if not key.startswith("_")
           and (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == name]
    own.sort(key=lambda obj: inspect.getsourcelines(obj)[1])
    docs = [module.__doc__]
    for obj in own:
        docs.append(obj.__doc__)
        if inspect.isclass(obj):
            docs += [m.__doc__ for key, m in vars(obj).items()
                     if inspect.isfunction(m) and (not key.startswith("_") or key == "__init__")]
    pieces = ["\n".join(line for line in inspect.cleandoc(d).split("\n") if not is_adornment(line)).strip()
              for d in docs if d]
    return "\n\n".join(p for p in pieces if p)


def rolling(ids):
    """A 64-bit hash of every SPAN-token window of ``ids`` (polynomial, wrapping)."""
    a = np.asarray(ids, dtype=np.uint64)
    if len(a) < SPAN:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(len(a) - SPAN + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(SPAN):
            h = h * np.uint64(1_000_003) + a[j:len(a) - SPAN + 1 + j]
    return h


@pytest.fixture(scope="module")
def full_pydoc(tmp_path_factory):
    """The whole pydoc corpus, the training text (every split of it), built here (~5 s)."""
    path = tmp_path_factory.mktemp("full_pydoc") / "pydoc.jsonl"
    list(PydocCorpus(cache_path=str(path)).documents())
    return path


@pytest.fixture(scope="module")
def training_spans(tokenizer, full_pydoc):
    """Every 50-token span of every pydoc page (~1.2M tokens, ~3 s)."""
    pages = [doc.text for doc in PydocCorpus(cache_path=str(full_pydoc)).documents()]
    assert len(pages) > 150
    ids = tokenizer(pages, add_special_tokens=False, verbose=False)["input_ids"]
    return np.unique(np.concatenate([rolling(x) for x in ids]))


def shared_spans(tokenizer, texts, spans):
    """{text index: number of its SPAN-token windows that also occur in ``spans``}, nonzero only."""
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    windows = [rolling(x) for x in ids]
    owner = np.repeat(np.arange(len(windows)), [len(w) for w in windows])
    hit = np.isin(np.concatenate(windows), spans)  # one sort for all texts
    found, counts = np.unique(owner[hit], return_counts=True)
    return dict(zip(found.tolist(), counts.tolist(), strict=True))


def test_documents_match_the_imported_modules():
    docs = heldout_documents()
    for name in REBUILT:
        assert docs[name].text == by_inspect(name), name
        assert docs[name].package == "networkx"


def test_split_by_package_not_by_page():
    docs = heldout_documents()
    assert EVAL_PACKAGES == ("networkx",) and len(docs) > 200
    assert all(d.split(".")[0] in EVAL_PACKAGES and doc.package == d.split(".")[0] for d, doc in docs.items())
    # the training corpus's default module list (stdlib) holds none of them
    assert not {m.split(".")[0] for m in default_pydoc_modules()} & set(EVAL_PACKAGES)
    # no test code, no private module
    assert not [d for d in docs if re.search(r"(^|\.)(tests?|testing|_[^.]*|conftest)(\.|$)", d)]
    assert package_versions() == {"networkx": importlib.import_module("networkx").__version__}


def test_summary_is_the_first_sentence_and_body_the_rest():
    docs = heldout_documents()
    assert docs["networkx.algorithms.flow.dinitz_alg"].summary == "Dinitz' algorithm for maximum flow problems."
    assert docs["networkx.algorithms.cuts"].summary == "Functions for finding and evaluating cuts in a graph."
    with_summary = [doc for doc in docs.values() if doc.summary]
    assert len(with_summary) > 200
    for doc in with_summary:
        assert "\n" not in doc.summary and doc.summary == " ".join(doc.summary.split())
        # the summary taken out of the text (whitespace aside) leaves the body
        flat = " ".join(doc.text.split())
        assert flat.replace(doc.summary, "", 1).split() == doc.body.split(), doc.doc_id
    assert all(doc.body == doc.text for doc in docs.values() if not doc.summary)


def test_deterministic():
    first = dict(heldout_documents())
    heldout_documents.cache_clear()
    assert heldout_documents() == first


def test_missing_package_names_the_fix():
    with pytest.raises(ValueError, match=r"package 'no_such_pkg_xyz' is not installed; pip install no_such_pkg_xyz") as err:
        heldout_documents(("no_such_pkg_xyz",))
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="omit --haystack for the offline evaluation-only text"):
        read_haystack("no/such/file.txt")


def test_no_eval_text_shares_a_50_token_span_with_training(tokenizer, training_spans, full_pydoc):
    haystack = default_haystack()
    assert haystack == "\n\n".join(doc.text for doc in heldout_documents().values())
    needle = make_needle(tokenizer, 2048, n_queries=5, n_docs=10)
    assert needle.meta["haystack"] == "heldout" and needle.meta["packages"] == package_versions()
    deep = make_deep("heldout", tokenizer, max_tokens=4096, corpus_path=str(full_pydoc))
    assert deep.meta["shared_dropped"] == []
    summary = make_semantic("summary", tokenizer, max_tokens=4096)
    concat = make_semantic("concat", tokenizer, max_tokens=4096, n_docs=60)
    texts = [haystack, *needle.corpus.values(), *deep.corpus.values(), *summary.corpus.values(),
             *concat.corpus.values()]
    assert shared_spans(tokenizer, texts, training_spans) == {}


def test_langref_shares_only_table_borders_with_training(tokenizer, training_spans, full_pydoc):
    """deep/langref's topics are CPython's own text, kept as CPython ships them, less those sharing a
    run of words with the pydoc pages (``debugger``: pdb's docstring): what 50-token spans the rest
    share with the pages are reST table borders (``====``, ``----``, in two topics on 3.11), at most
    one word token next to a border run."""
    task = make_deep("langref", tokenizer, max_tokens=8190, corpus_path=str(full_pydoc))
    assert "debugger" in task.meta["shared_dropped"] and "debugger" not in task.corpus
    border = set(tokenizer.convert_tokens_to_ids(sorted(ADORNMENT)))
    ids = tokenizer(list(task.corpus.values()), add_special_tokens=False, verbose=False)["input_ids"]
    shared = shared_spans(tokenizer, task.corpus.values(), training_spans)
    assert shared  # the borders: the check below has something to look at
    worded = {}
    for i in shared:
        x = ids[i]
        at = np.flatnonzero(np.isin(rolling(x), training_spans))
        words = [j for j in at if len(set(x[j:j + SPAN]) - border) > 1]  # two distinct words: text, not a border
        if words:
            worded[list(task.corpus)[i]] = len(words)
    assert worded == {}


@pytest.mark.slow
def test_no_eval_text_shares_a_50_token_span_with_the_package_corpus(tokenizer, tmp_path_factory):
    """The small scale's corpus (the standard library's and every installed package's pages) against every eval
    text built on the evaluation-only package: the same check as above, with the spans of the package corpus.
    Reads ``data/pydoc_packages_corpus.jsonl`` where a study built it, else builds it here (~10 min, 2 cores)."""
    from pathlib import Path

    built = Path("data/pydoc_packages_corpus.jsonl")
    path = built if built.exists() else tmp_path_factory.mktemp("packages") / "packages.jsonl"
    pages = [doc.text for doc in PydocCorpus(cache_path=str(path), packages="installed").documents()]
    assert len(pages) >= 1500
    ids = tokenizer(pages, add_special_tokens=False, verbose=False)["input_ids"]
    spans = np.unique(np.concatenate([rolling(x) for x in ids]))
    needle = make_needle(tokenizer, 8192, n_queries=5, n_docs=10)
    deep = make_deep("heldout", tokenizer, max_tokens=8192, corpus_path=str(path))
    texts = [default_haystack(), *needle.corpus.values(), *deep.corpus.values(),
             *make_semantic("summary", tokenizer, max_tokens=8192).corpus.values(),
             *make_semantic("concat", tokenizer, max_tokens=8192, n_docs=100).corpus.values()]
    assert shared_spans(tokenizer, texts, spans) == {}
