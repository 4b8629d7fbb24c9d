"""Embedder and retrievers against independent references: sentence-transformers' own encode,
hand-pooled hidden states, the dense attention path, and exact score algebra."""

import pytest
import torch

from dewey_lab.eval.embedder import Embedder
from dewey_lab.eval.retrieval import BM25Retriever, DenseRetriever
from dewey_lab.eval.tasks.task import RetrievalTask
from dewey_lab.model.attention import banded, key_masks
from dewey_lab.model.student import StudentConfig, build_student
from dewey_lab.resolve import OFFLINE_TEACHER, resolve_model

TEXTS = ["The grass is green.", "What is the pass key for Ana Lee?", "a longer passage about tokens " * 60]


@pytest.fixture(scope="module")
def minilm():
    from dewey_lab.eval.load import load_embedder

    return load_embedder(OFFLINE_TEACHER, device="cpu", chunk_size=32, chunk_overlap=8)


@pytest.fixture(scope="module")
def student(tokenizer):
    torch.manual_seed(0)
    spec = StudentConfig(tokenizer=OFFLINE_TEACHER, attn_implementation="sdpa",
                         config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                                 "num_attention_heads": 2, "local_attention": 16, "global_attn_every_n_layers": 3})
    return build_student(spec, tokenizer).eval()


def test_minilm_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(resolve_model(OFFLINE_TEACHER), device="cpu")
    st.max_seq_length = 512
    ref = st.encode(TEXTS, convert_to_tensor=True, normalize_embeddings=True)
    assert minilm.pooling == "mean" and minilm.mean_over == "all" and minilm.max_length == 512
    assert torch.allclose(minilm.encode_queries(TEXTS), ref, atol=1e-5)


def test_late_chunks_are_means_of_one_forward_pass(student, tokenizer):
    e = Embedder(student, tokenizer, chunk_size=16, chunk_overlap=4, max_length=128, normalize=False,
                 passage_prompt="doc: ")
    items = e.tokenize(TEXTS, e.passage_prompt)
    enc = e.embed(items)
    # reference: hidden states of each passage alone, pooled by hand
    for i, it in enumerate(items):
        ids = torch.tensor([it.input_ids])
        with torch.no_grad():
            h = student(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
        content = torch.tensor(it.content_mask)
        assert torch.allclose(enc.single[i], h[content].mean(0), atol=1e-5)
        mine = enc.chunks[enc.owner == i]
        ref = torch.stack([h[s:t].mean(0) for s, t in it.chunks])
        assert torch.allclose(mine, ref, atol=1e-5)
        # windows: stride 12 over the text tokens, the last one ends at the last text token
        text_idx = content.nonzero().flatten().tolist()
        assert it.chunks[0][0] == text_idx[0] and it.chunks[-1][1] == text_idx[-1] + 1
        assert all(b[0] - a[0] == 12 for a, b in zip(it.chunks[:-1], it.chunks[1:-1]))
        assert all(t - s == 16 for s, t in it.chunks) or len(it.chunks) == 1  # the last one too: no short tail
        assert not content[: len(tokenizer("doc: ")["input_ids"]) - 1].any()  # CLS and prompt never pooled


def test_token_budget_batches_change_nothing(student, tokenizer):
    one = Embedder(student, tokenizer, max_length=256, token_budget=1, chunk_size=32, chunk_overlap=0)
    many = Embedder(student, tokenizer, max_length=256, token_budget=100_000, chunk_size=32, chunk_overlap=0)
    assert len(many.batches(many.tokenize(TEXTS))) == 1 and len(one.batches(one.tokenize(TEXTS))) == 3
    a, b = one.encode_passages(TEXTS), many.encode_passages(TEXTS)
    assert torch.allclose(a.single, b.single, atol=1e-5) and torch.allclose(a.chunks, b.chunks, atol=1e-5)


def test_truncation_is_flagged(minilm):
    items = minilm.tokenize(["word " * 1000, "short"])
    assert [it.truncated for it in items] == [True, False] and len(items[0].input_ids) == 512


def test_banded_attention_equals_dense(student):
    torch.manual_seed(1)
    ids = torch.randint(1000, 2000, (2, 300))
    mask = torch.ones(2, 300, dtype=torch.long)
    mask[1, 170:] = 0
    with torch.no_grad():
        dense = student(input_ids=ids, attention_mask=mask).last_hidden_state
        with banded(student):
            band = student(input_ids=ids, attention_mask=key_masks(mask)).last_hidden_state
    assert student.config._attn_implementation == "sdpa"  # restored
    assert torch.allclose(dense[mask.bool()], band[mask.bool()], atol=1e-5)


def _task():
    corpus = {"d1": "cats purr on warm mats", "d2": "the stock market fell sharply", "d3": "rain falls in spring"}
    queries = {"q1": "why do cats purr", "q2": "market crash", "q3": "no judgement"}
    return RetrievalTask("toy", corpus, queries, {"q1": {"d1": 1}, "q2": {"d2": 1}}).validate()


def test_dense_scores_are_cosines_and_multi_is_best_chunk(minilm, tmp_path):
    task = _task()
    r = DenseRetriever(minilm, cache_dir=None, progress=False, query_pooling="mean")  # its own head on queries
    s = r.score(task)
    q = minilm.encode_queries(["why do cats purr", "market crash"])  # judged queries only
    enc = minilm.encode_passages(list(task.corpus.values()))
    assert torch.allclose(s["single"], q @ enc.single.T, atol=1e-5)
    best = torch.stack([(q @ enc.chunks[enc.owner == j].T).max(1).values for j in range(3)], 1)
    assert torch.allclose(s["multi"], best, atol=1e-5)
    # the cache: a second retriever reads the same vectors without a forward pass
    cached = DenseRetriever(minilm, cache_dir=str(tmp_path / "ec"), progress=False, query_pooling="mean")
    first = cached.score(task)
    calls = []
    hook = minilm.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        again = DenseRetriever(minilm, cache_dir=str(tmp_path / "ec"), progress=False,
                               query_pooling="mean").score(task)
    finally:
        hook.remove()
    assert calls == [1]  # the queries only
    for mode in s:
        assert torch.allclose(first[mode], s[mode], atol=1e-5) and torch.equal(first[mode], again[mode])


def _by_hand(student, tokenizer, prompt: str, text: str) -> tuple[torch.Tensor, list[int]]:
    """(T, H) hidden states of ``prompt + text`` run alone, and the positions of its text tokens: not special
    (offsets (0, 0)), not in the prompt (offset start before len(prompt))."""
    enc = tokenizer(prompt + text, return_offsets_mapping=True)
    ids = torch.tensor([enc["input_ids"]])
    with torch.no_grad():
        h = student(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
    text_pos = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a >= len(prompt)]
    return h, text_pos


def test_multi_scores_mean_queries_against_chunks_by_default(student, tokenizer):
    """dewey_en_beta's multi-vector rule: a passage scores max_c(mean(q) . chunk_c), the query pooled as its
    chunks are (mean of its text tokens; no CLS, SEP or prompt); ``multi:cls`` keeps the trained CLS query."""
    from dewey_lab.model.pooling import CLSPooling

    e = Embedder(student, tokenizer, pooling=CLSPooling(), chunk_size=8, chunk_overlap=2, max_length=128,
                 query_prompt="query: ", passage_prompt="doc: ")
    corpus = {"d1": "cats purr on warm mats while the rain falls outside " * 3, "d2": "the stock market fell",
              "d3": "a long report on the weather of the northern coast in spring and in autumn " * 2}
    queries = {"q1": "why do cats purr", "q2": "weather on the coast"}
    task = RetrievalTask("toy", corpus, queries, {"q1": {"d1": 1}, "q2": {"d3": 1}}).validate()
    s = DenseRetriever(e, modes=("multi", "multi:cls"), cache_dir=None, progress=False).score(task)

    def unit(v):
        return v / v.norm()

    q_mean, q_cls = [], []
    for q in queries.values():
        h, pos = _by_hand(student, tokenizer, "query: ", q)
        q_mean.append(unit(h[pos].mean(0)))
        q_cls.append(unit(h[0]))
    ref_mean, ref_cls = torch.zeros(2, 3), torch.zeros(2, 3)
    for j, text in enumerate(corpus.values()):
        h, pos = _by_hand(student, tokenizer, "doc: ", text)
        first, end = pos[0], pos[-1] + 1  # windows of 8, stride 6; the last one ends at the text's end
        starts = list(range(first, end - 8, 6)) if end - first > 8 else []
        spans = [(a, a + 8) for a in starts] + [(max(first, end - 8), end)]
        chunks = torch.stack([unit(h[a:b].mean(0)) for a, b in spans])  # (C, H)
        for i in range(2):
            ref_mean[i, j] = (chunks @ q_mean[i]).max()
            ref_cls[i, j] = (chunks @ q_cls[i]).max()
    assert torch.allclose(s["multi"], ref_mean, atol=1e-5)
    assert torch.allclose(s["multi:cls"], ref_cls, atol=1e-5)
    assert not torch.allclose(ref_mean, ref_cls, atol=1e-3)  # the two rules differ on this model
    r = DenseRetriever(e, modes=("single", "multi", "multi:cls"), cache_dir=None, progress=False)
    assert r.pooling_of("multi")["query_pooling"].startswith("chunk(ChunkMeanPooling")
    assert r.pooling_of("multi:cls")["query_pooling"] == "cls" == r.pooling_of("single")["passage_pooling"]


def test_query_pooling_errors_name_the_choices(student, tokenizer):
    e = Embedder(student, tokenizer, pooling="cls", max_length=64)
    with pytest.raises(ValueError, match=r"unknown query_pooling 'bogus'; use chunk .* cls, mean, cls_mean"):
        DenseRetriever(e, modes=("multi",), query_pooling="bogus")
    with pytest.raises(ValueError, match="attention' has learned weights this model did not train"):
        DenseRetriever(e, modes=("multi",), query_pooling="attention")
    with pytest.raises(ValueError, match="unknown mode multi:<pooling> .bogus.; use chunk"):
        DenseRetriever(e, modes=("multi:bogus",))


def test_bm25_ranks_the_matching_document_first():
    pytest.importorskip("bm25s")
    s = BM25Retriever().score(_task())["bm25"]
    assert s.argmax(1).tolist() == [0, 1]
