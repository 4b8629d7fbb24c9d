"""Synthetic LongEmbed tasks (passkey, needle): format, length contract, depths, determinism, errors.

Checks are made against independent facts: the tokenizer's own count of each whole document,
the paper's sentence format parsed back with a regex, the haystack text itself.
"""

import importlib.metadata
import json
import logging
import re

import pytest

from dewey_lab.eval.tasks import placement
from dewey_lab.eval.tasks.heldout import heldout_documents
from dewey_lab.eval.tasks.needles import NEEDLES
from dewey_lab.eval.tasks.synthetic import (
    PASSKEY_FILLER,
    default_haystack,
    make_needle,
    make_passkey,
    make_synthetic,
)

PASSKEY_RE = re.compile(r"([A-Z][a-z]+ [A-Z][a-z]+)'s pass key is (\d+)\. Remember it\. (\d+) is the pass key "
                        r"for ([A-Z][a-z]+ [A-Z][a-z]+)\.")
FILLER_TEXT = " ".join([PASSKEY_FILLER] * 100)
QUESTION_OF = {fact: question for fact, question in NEEDLES}


@pytest.fixture(scope="module")
def haystack(small_corpus_path):
    """A haystack of the caller's own: the ten-module pydoc corpus joined by blank lines (~18k MiniLM tokens)."""
    with open(small_corpus_path, encoding="utf-8") as f:
        return "\n\n".join(json.loads(line)["text"] for line in f if line.strip())


def token_lengths(tokenizer, task):
    return [len(ids) for ids in tokenizer(list(task.corpus.values()), verbose=False)["input_ids"]]


def found_sentence(doc):
    return PASSKEY_RE.search(doc).group(0)


def the_fact(doc):
    facts = [fact for fact, _ in NEEDLES if fact in doc]
    assert len(facts) == 1, facts
    return facts[0]


def depths(task, find):
    """Where each document's inserted sentence starts, as a fraction of the document's characters."""
    return [doc.index(find(doc)) / len(doc) for doc in task.corpus.values()]


def test_filler_and_needle_table():
    assert PASSKEY_FILLER == "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    assert len(NEEDLES) == 100
    facts, questions = zip(*NEEDLES, strict=True)
    assert len(set(facts)) == 100 and len(set(questions)) == 100
    for fact, question in NEEDLES:
        assert fact.endswith(".") and "\n" not in fact and len(fact) < 130
        assert question.endswith("?") and question.count("?") == 1 and len(question) < 90
    # no fact sits inside another, so "the document containing this fact" is unambiguous
    assert not [(a, b) for a in facts for b in facts if a != b and a in b]


@pytest.mark.parametrize("length", [256, 777, 4096])
def test_passkey_length_contract(tokenizer, length):
    task = make_passkey(tokenizer, length)
    # the tokenizer's own count of each whole document, specials included, is the contract
    lengths = token_lengths(tokenizer, task)
    assert len(lengths) == 100
    assert length - 8 <= min(lengths) and max(lengths) <= length


@pytest.mark.parametrize("length", [256, 1000, 4096])
def test_needle_length_contract(tokenizer, haystack, length):
    task = make_needle(tokenizer, length, haystack=haystack)
    lengths = token_lengths(tokenizer, task)
    assert len(lengths) == 100
    assert length - 8 <= min(lengths) and max(lengths) <= length


def test_passkey_documents_and_queries(tokenizer):
    task = make_passkey(tokenizer, 512)
    assert (task.name, task.metric, task.length, task.label) == ("passkey", "ndcg@1", 512, "passkey@512")
    assert task.meta == {"source": "generated", "seed": 0, "haystack": "filler"}
    assert list(task.corpus) == [f"passkey-512-d{i:03d}" for i in range(100)]
    assert len(task.queries) == 50
    keys, names = {}, []  # parsed back from the text, not taken from the generator
    for doc_id, doc in task.corpus.items():
        found = PASSKEY_RE.findall(doc)
        assert len(found) == 1, doc_id
        name, key, key_again, name_again = found[0]
        assert (key, name) == (key_again, name_again) and 10000 <= int(key) <= 99999
        keys[doc_id], names = key, [*names, name]
        # take the sentence out again: what is left is the repeated filler, cut at the end
        sentence = found_sentence(doc)
        bare = doc.replace(sentence + " ", "", 1) if doc.startswith(sentence) else doc.replace(" " + sentence, "", 1)
        assert FILLER_TEXT.startswith(bare) and len(bare) > 1000
    assert len(set(names)) == 100 and len(set(keys.values())) == 100
    # a query's name must lead to exactly one document, and qrels must point at that one
    for qid, query in task.queries.items():
        name = re.fullmatch(r"What is the pass key for (.+)\?", query).group(1)
        holders = [d for d, doc in task.corpus.items() if name in doc]
        assert len(holders) == 1
        assert task.qrels[qid] == {holders[0]: 1}
        assert qid == holders[0].replace("-d", "-q")


def test_needle_documents_and_queries(tokenizer, haystack):
    task = make_needle(tokenizer, 1024, haystack=haystack)
    assert (task.name, task.metric, task.length) == ("needle", "ndcg@1", 1024)
    assert task.meta == {"source": "generated", "seed": 0, "haystack": "custom"}
    assert len(task.corpus) == 100 and len(task.queries) == 50
    facts = [the_fact(doc) for doc in task.corpus.values()]
    assert len(set(facts)) == 100
    for doc, fact in zip(task.corpus.values(), facts, strict=True):
        # take the needle out again: what is left is the start of the haystack, from character 0
        bare = doc.replace(fact + " ", "", 1) if doc.startswith(fact) else doc.replace(" " + fact, "", 1)
        assert haystack.startswith(bare) and len(bare) > 1000
    for qid, question in task.queries.items():
        holders = [d for d, doc in task.corpus.items() if QUESTION_OF[the_fact(doc)] == question]
        assert len(holders) == 1
        assert task.qrels[qid] == {holders[0]: 1}


def test_insertion_depths_spread_over_the_document(tokenizer, haystack):
    passkey = depths(make_passkey(tokenizer, 2048), found_sentence)
    needle = depths(make_needle(tokenizer, 2048, haystack=haystack), the_fact)
    for spread in (passkey, needle):
        assert min(spread) < 0.2 and max(spread) > 0.8
        assert 0.3 < sorted(spread)[50] < 0.7  # uniform depth: the median is mid-document


def test_deterministic_per_seed_and_length(tokenizer, haystack):
    def parts(task):
        return task.corpus, task.queries, task.qrels

    assert parts(make_passkey(tokenizer, 300)) == parts(make_passkey(tokenizer, 300))
    assert parts(make_needle(tokenizer, 300, haystack)) == parts(make_needle(tokenizer, 300, haystack))
    assert make_passkey(tokenizer, 300, seed=1).corpus != make_passkey(tokenizer, 300).corpus
    assert make_needle(tokenizer, 300, haystack, seed=1).queries != make_needle(tokenizer, 300, haystack).queries
    # each length draws its own names and keys
    a, b = make_passkey(tokenizer, 300), make_passkey(tokenizer, 301)
    assert sorted(a.queries.values()) != sorted(b.queries.values())


def test_make_synthetic_one_task_per_length(tokenizer, haystack):
    tasks = make_synthetic("needle", tokenizer, [256, 512], n_queries=5, n_docs=10, haystack=haystack)
    assert [t.label for t in tasks] == ["needle@256", "needle@512"]
    assert [(len(t.corpus), len(t.queries)) for t in tasks] == [(10, 5), (10, 5)]
    tasks = make_synthetic("passkey", tokenizer, [256], n_queries=3, n_docs=4, seed=7)
    assert tasks[0].label == "passkey@256" and tasks[0].meta["seed"] == 7
    assert tasks[0].corpus == make_passkey(tokenizer, 256, n_queries=3, n_docs=4, seed=7).corpus


def test_default_haystack_is_the_evaluation_only_text(tokenizer, haystack):
    text = default_haystack()
    assert default_haystack() is text  # memoized
    # every networkx module's docstrings (rebuilt by import in tests/test_heldout.py), joined by blank lines
    assert text == "\n\n".join(doc.text for doc in heldout_documents().values()) and len(text) > 1_000_000
    default = make_needle(tokenizer, 256, n_queries=1, n_docs=2)
    assert default.meta == {"source": "generated", "seed": 0, "haystack": "heldout",
                            "packages": {"networkx": importlib.metadata.version("networkx")}}
    for doc in default.corpus.values():  # the needle taken out again: the haystack's start
        fact = the_fact(doc)
        assert text.startswith(doc.replace(fact + " ", "", 1) if doc.startswith(fact) else doc.replace(" " + fact, "", 1))
    # passing the default text explicitly still records where it came from
    assert make_needle(tokenizer, 256, text, n_queries=1, n_docs=2).meta["haystack"] == "heldout"
    assert make_needle(tokenizer, 256, haystack, n_queries=1, n_docs=2).meta["haystack"] == "custom"


def one_line_error(fn, *args, **kwargs):
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_inputs_raise_one_line_errors(tokenizer, haystack):
    assert "n_queries" in one_line_error(make_passkey, tokenizer, 512, n_queries=11, n_docs=10)
    assert "n_docs" in one_line_error(make_needle, tokenizer, 512, haystack, n_queries=5, n_docs=101)
    assert "n_docs" in one_line_error(make_passkey, tokenizer, 512, n_queries=5, n_docs=901)
    assert "passkey" in one_line_error(make_synthetic, "passkeys", tokenizer, [512])
    assert "haystack" in one_line_error(make_needle, tokenizer, 4096, haystack[:3000])
    assert "haystack" in one_line_error(make_needle, tokenizer, 512, "   \n ")


@pytest.mark.parametrize("kind", ["passkey", "needle"])
def test_too_short_length_names_the_smallest_that_works(tokenizer, haystack, kind):
    make = make_passkey if kind == "passkey" else make_needle
    extra = {} if kind == "passkey" else {"haystack": haystack}
    # the length the error names must work, and one less must not
    message = one_line_error(make, tokenizer, 24, n_queries=5, n_docs=10, **extra)
    smallest = int(re.search(r"length >= (\d+)", message).group(1))
    assert 24 < smallest < 256
    one_line_error(make, tokenizer, smallest - 1, n_queries=5, n_docs=10, **extra)
    task = make(tokenizer, smallest, n_queries=5, n_docs=10, **extra)
    assert max(token_lengths(tokenizer, task)) <= smallest


def test_byte_level_bpe_tokenizer(haystack):
    """The length contract holds for a byte-level BPE tokenizer too (ModernBERT's kind)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([haystack, PASSKEY_FILLER], trainer)
    bpe.post_processor = processors.RobertaProcessing(("</s>", 1), ("<s>", 0), trim_offsets=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    for task in (make_passkey(tok, 1024), make_needle(tok, 1024, haystack=haystack)):
        lengths = token_lengths(tok, task)
        assert 1024 - 8 <= min(lengths) and max(lengths) <= 1024


def test_falls_back_to_full_counts_when_local_counts_are_wrong(tokenizer, haystack, monkeypatch, caplog):
    local = placement._count_local

    def off_by_three(*args):
        return [n + 3 for n in local(*args)]

    # a tokenizer whose local counts are off: the whole-document check must notice and recount
    monkeypatch.setattr(placement, "_count_local", off_by_three)
    with caplog.at_level(logging.WARNING, logger="dewey_lab.eval.tasks.placement"):
        task = make_needle(tokenizer, 640, haystack=haystack, seed=3)
    assert "re-counting every document in full" in caplog.text
    lengths = token_lengths(tokenizer, task)
    assert 640 - 8 <= min(lengths) and max(lengths) <= 640
