"""Chunking: the paper's distributions, determinism, and char -> token span mapping."""

import itertools
import random
import statistics

import pytest

from dewey_lab.data.chunking import Chunker, char_spans_to_token_spans, recursive_spans, word_spans

LOREM = ("Embeddings of long documents need chunk-level supervision.\n\n" + " ".join(
    f"Sentence {i} talks about topic {i % 7} and then some more words follow." for i in range(80)))


def _docs(n):
    rng = random.Random(5)
    vocab = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda"]
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(50, 400))) for _ in range(n)]


def test_same_document_and_seed_give_same_chunks():
    assert Chunker(seed=3)(LOREM) == Chunker(seed=3)(LOREM)
    draws = {Chunker(seed=s).draw(LOREM) for s in range(20)}
    assert len(draws) > 10  # the seed matters


def test_draw_distributions_follow_the_paper():
    chunker = Chunker(seed=0)
    draws = [chunker.draw(d) for d in _docs(2000)]
    recursive = sum(d[0] == "recursive" for d in draws) / len(draws)
    assert 0.66 < recursive < 0.74  # p = 0.7, 2000 draws: sd ~ 0.01
    sizes = [d[1] for d in draws]
    assert min(sizes) >= 64 and max(sizes) <= 500
    assert statistics.mean(sizes) == pytest.approx(282, abs=10)
    ratios = [d[2] / d[1] for d in draws]
    assert min(ratios) >= 0.3 - 1 / 64 and max(ratios) <= 0.6
    assert statistics.mean(ratios) == pytest.approx(0.45, abs=0.02)


@pytest.mark.parametrize("split", [recursive_spans, word_spans])
@pytest.mark.parametrize("unit", ["chars", "words"])
def test_spans_are_trimmed_substrings_within_size(split, unit):
    size, overlap = 120 if unit == "chars" else 20, 50 if unit == "chars" else 8
    spans = split(LOREM, size, overlap, unit)
    assert len(spans) > 5
    measure = len if unit == "chars" else (lambda s: len(s.split()))
    covered = set()
    for (s, e), nxt in zip(spans, spans[1:] + [None]):
        chunk = LOREM[s:e]
        assert chunk == chunk.strip() and chunk
        assert measure(chunk) <= size
        covered.update(range(s, e))
        if nxt is not None:
            assert nxt[0] > s  # always moves forward
    # every non-space character belongs to some chunk
    assert all(i in covered for i, c in enumerate(LOREM) if not c.isspace())


def test_word_spans_overlap_by_at_most_overlap():
    text = " ".join(f"w{i}" for i in range(100))
    spans = word_spans(text, 10, 4, "words")
    words = [text[s:e].split() for s, e in spans]
    assert words[0] == [f"w{i}" for i in range(10)]
    assert words[1][0] == "w6"  # 4 words of overlap
    for a, b in itertools.pairwise(words):
        assert len(set(a) & set(b)) <= 4


def test_short_and_blank_texts():
    assert Chunker()("   \n ") == []
    assert Chunker(recursive_prob=1)("tiny text") == [(0, 9)]
    assert Chunker(recursive_prob=0)("  tiny text ") == [(2, 11)]
    with pytest.raises(ValueError, match="max_overlap"):
        Chunker(max_overlap=1.2)


def test_token_spans_hand_example():
    # [CLS] the cat sat [SEP]; offsets as a fast tokenizer gives them
    offsets = [(0, 0), (0, 3), (4, 7), (8, 11), (0, 0)]
    content = [False, True, True, True, False]
    assert char_spans_to_token_spans(offsets, content, [(0, 7), (5, 11), (4, 5), (20, 30)]) == [
        (1, 3), (2, 4), (2, 3), None]


def test_every_chunk_token_span_covers_its_characters(tokenizer):
    text = LOREM + " Ünïcödé wörds and punctuation!? (brackets) x=1; y=2."
    prompt = "search_document: "
    spans = Chunker(seed=1)(text) + word_spans(text, 90, 30)
    enc = tokenizer(prompt + text, return_offsets_mapping=True, return_special_tokens_mask=True)
    offsets = enc["offset_mapping"]
    content = [not sp and a >= len(prompt) for sp, (a, b) in zip(enc["special_tokens_mask"], offsets)]
    token_spans = char_spans_to_token_spans(offsets, content, [(s + len(prompt), e + len(prompt)) for s, e in spans])
    for (cs, ce), ts in zip(spans, token_spans):
        a, b = ts
        assert all(content[a:b])  # no CLS, SEP or prompt token inside a chunk
        first, last = offsets[a][0] - len(prompt), offsets[b - 1][1] - len(prompt)
        assert first <= cs and last >= ce  # tokens cover the chunk's characters
        # decoding the span gives back exactly those characters, as the tokenizer normalises them
        normalise = tokenizer.backend_tokenizer.normalizer.normalize_str
        decoded = tokenizer.decode(enc["input_ids"][a:b]).replace(" ", "")
        assert decoded == normalise(text[first:last]).replace(" ", "")
