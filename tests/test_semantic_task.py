"""semantic/summary and semantic/concat: a module's one-line summary finds the module's text.

Checked against references written here: the query searched for in every candidate with a
hand-written normalisation, lengths by tokenizing the candidates, the answer's place found by
searching the candidate for the bodies it joins, its depth by tokenizing the text before it, and
BM25 (bm25s) scored against the relevance judgements with a hand-written nDCG@10.
"""

import logging
import math

import bm25s
import pytest

from dewey_lab.eval.run import TASK_NAMES, build_tasks, parse_tasks
from dewey_lab.eval.tasks.heldout import heldout_documents, package_versions
from dewey_lab.eval.tasks.semantic import make_semantic

MAX_TOKENS = 8190  # --lengths 8k with MiniLM's two special tokens


def flat(text):
    return " ".join(text.split()).lower()


def count(tokenizer, texts):
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]]


@pytest.fixture(scope="module")
def docs():
    return heldout_documents()


@pytest.fixture(scope="module")
def summary(tokenizer):
    return make_semantic("summary", tokenizer, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def concat(tokenizer):
    return make_semantic("concat", tokenizer, max_tokens=MAX_TOKENS)


def ndcg10_one_relevant(scores, corpus_ids, qrels, qids):
    """nDCG@10 with one relevant document per query: 1 / log2(rank + 2) if in the top 10, ties broken
    by the larger document id first (trec_eval's order)."""
    total = 0.0
    for row, qid in zip(scores, qids, strict=True):
        (relevant,) = qrels[qid]
        by_id = sorted(range(len(corpus_ids)), key=lambda j: corpus_ids[j], reverse=True)
        ranked = sorted(by_id, key=lambda j: -row[j])  # stable: equal scores keep the id order
        rank = [corpus_ids[j] for j in ranked].index(relevant)
        total += 1 / math.log2(rank + 2) if rank < 10 else 0.0
    return 100 * total / len(qids)


def bm25_ndcg(task):
    ids = list(task.corpus)
    retriever = bm25s.BM25(k1=1.2, b=0.75)
    retriever.index(bm25s.tokenize(list(task.corpus.values()), stopwords="en", show_progress=False),
                    show_progress=False)
    qids = list(task.queries)
    tokens = bm25s.tokenize([task.queries[q] for q in qids], stopwords="en", return_ids=False, show_progress=False)
    vocab = retriever.vocab_dict
    scores = [list(retriever.get_scores([t for t in q if t in vocab])) for q in tokens]
    return ndcg10_one_relevant(scores, ids, task.qrels, qids)


def test_summary_queries_are_summaries_absent_from_every_document(summary, docs, tokenizer):
    assert (summary.name, summary.metric, summary.length) == ("semantic/summary", "ndcg@10", None)
    assert len(summary.queries) == 50 and summary.meta["packages"] == package_versions()
    # every document with a body is a candidate, its summary taken out, cut to max_tokens at whitespace
    assert list(summary.corpus) == [d for d, doc in docs.items() if doc.body]
    for doc_id, text in summary.corpus.items():
        assert docs[doc_id].body.startswith(text)
    assert max(count(tokenizer, summary.corpus.values())) <= MAX_TOKENS
    corpus = {d: flat(t) for d, t in summary.corpus.items()}
    on = [next(iter(rels)) for rels in summary.qrels.values()]
    assert len(set(on)) == 50 and on == list(summary.meta["documents"].values())
    for qid, query in summary.queries.items():
        (doc_id,) = summary.qrels[qid]
        assert query == docs[doc_id].summary and 4 <= len(query.split()) <= 40
        assert flat(query) in flat(docs[doc_id].text)  # taken from the module's own text
        assert not [d for d, text in corpus.items() if flat(query) in text], query  # not in its document, nor any


def test_concat_answer_is_third_or_later_among_unrelated_documents(concat, docs, tokenizer):
    assert concat.name == "semantic/concat" and len(concat.corpus) == 100 and len(concat.queries) == 50
    lengths = count(tokenizer, concat.corpus.values())
    assert MAX_TOKENS - 64 <= min(lengths) and max(lengths) <= MAX_TOKENS  # length says nothing
    answers = set(concat.meta["documents"].values())
    depths = []
    for qid, query in concat.queries.items():
        (cid,) = concat.qrels[qid]
        answer = concat.meta["documents"][qid]
        text, parts = concat.corpus[cid], concat.meta["parts"][cid]
        assert query == docs[answer].summary
        assert not [c for c, t in concat.corpus.items() if flat(query) in flat(t)]  # in no candidate verbatim
        # the answer's body, whole, in this candidate only; the bodies before it joined by blank lines
        body = docs[answer].body
        assert [c for c, t in concat.corpus.items() if body in t] == [cid]
        at = text.index(body)
        position = parts.index(answer)
        assert position >= 2 and position == concat.meta["positions"][qid]
        assert text[:at] == "\n\n".join(docs[d].body for d in parts[:position]) + "\n\n"
        assert len({docs[d].family for d in parts if d != answer} & {docs[answer].family}) == 0
        assert len(set(parts)) == len(parts) and not (set(parts) - {answer}) & answers
        depths.append(count(tokenizer, [text[:at]])[0])
        assert depths[-1] == concat.meta["depths"][qid]
    assert min(depths) > 100 and max(depths) > MAX_TOKENS // 2  # early and late in the candidate
    # the candidates without an answer hold no query's document
    empty = set(concat.corpus) - {next(iter(r)) for r in concat.qrels.values()}
    assert len(empty) == 50 and all(not set(concat.meta["parts"][c]) & answers for c in empty)


def test_bm25_is_well_below_its_ceiling(summary, concat):
    """The point of the tasks: word overlap does not decide them (deep/... and needle give BM25 ~93-100)."""
    assert bm25_ndcg(summary) < 90 and bm25_ndcg(concat) < 90


def test_seed_fixes_every_choice(tokenizer, concat):
    again = make_semantic("concat", tokenizer, max_tokens=MAX_TOKENS)
    assert (again.corpus, again.queries, again.qrels, again.meta) == (concat.corpus, concat.queries, concat.qrels,
                                                                     concat.meta)
    other = make_semantic("summary", tokenizer, max_tokens=MAX_TOKENS, seed=1)
    assert set(other.queries.values()) != set(make_semantic("summary", tokenizer, max_tokens=MAX_TOKENS).queries.values())


def test_short_cut_makes_fewer_concat_queries_and_says_so(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="dewey_lab.eval.tasks.semantic"):
        task = make_semantic("concat", tokenizer, max_tokens=1022, n_docs=60)
    assert 0 < len(task.queries) < 50 and f"only {len(task.queries)} of 50 queries" in caplog.text
    assert max(count(tokenizer, task.corpus.values())) <= 1022


def test_registered_in_eval(tokenizer):
    assert {"semantic/summary", "semantic/concat", "deep/heldout", "deep/langref"} <= set(TASK_NAMES)
    assert "deep/pydoc" not in TASK_NAMES
    assert parse_tasks("semantic/summary,semantic/concat") == ["semantic/summary", "semantic/concat"]
    with pytest.raises(ValueError, match=r"deep/heldout, deep/langref, semantic/summary, semantic/concat$"):
        parse_tasks("semantic/x")
    (task,) = build_tasks(["semantic/concat"], tokenizer, [2048], n_queries=5, n_docs=8, seed=3)
    assert task.meta["max_tokens"] == 2046 and len(task.corpus) == 8 and len(task.queries) == 5


def test_bad_arguments_are_one_line_errors(tokenizer):
    for kwargs, message in [({"kind": "abstract"}, r"unknown task 'abstract'; choose one of summary, concat"),
                            ({"kind": "concat", "n_docs": 10}, r"n_docs=10 < n_queries=50"),
                            ({"kind": "summary", "max_tokens": 10}, r"max_tokens must be >= 64"),
                            ({"kind": "concat", "max_tokens": 64, "n_docs": 50},
                             r"no document qualifies .* raise max_tokens")]:
        kind = kwargs.pop("kind")
        with pytest.raises(ValueError, match=message) as err:
            make_semantic(kind, tokenizer, **kwargs)
        assert "\n" not in str(err.value)


def test_the_training_callback_builds_them(tokenizer, small_corpus_path):
    from dewey_lab.callbacks import PasskeyCallback

    callback = PasskeyCallback(tasks=["semantic/summary", "semantic/concat", "deep/heldout"], lengths=[2048],
                               n_queries=5, n_docs=10, haystack=str(small_corpus_path))
    tasks = callback.generated(tokenizer)
    assert [t.name for t in tasks] == ["deep/heldout", "semantic/summary", "semantic/concat"]
    assert [len(t.queries) for t in tasks] == [5, 5, 5] and tasks[2].meta["max_tokens"] == 2046
    with pytest.raises(ValueError, match=r"unknown 'deep/pydoc'; use any of passkey, needle, deep/heldout"):
        PasskeyCallback(tasks=["deep/pydoc"])
