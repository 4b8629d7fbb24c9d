"""Scoring modes ``single:<pooling>``: extra whole-text heads from the one forward pass, checked against a
separate Embedder built with that pooling (its own full pass), forward passes counted, the cache's keys."""

import hashlib
import json
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from dewey_lab.data.store.vectors import cache_key
from dewey_lab.eval.embedder import Embedder
from dewey_lab.eval.load import extend
from dewey_lab.eval.retrieval import DenseRetriever
from dewey_lab.eval.tasks.task import RetrievalTask
from dewey_lab.model.student import StudentConfig, build_student
from dewey_lab.resolve import OFFLINE_TEACHER

DOCS = {"d1": "cats purr on warm mats when they are content. " * 6, "d2": "the stock market fell sharply today.",
        "d3": "rain falls in spring and the rivers rise over their banks. " * 9}
QUERIES = {"q1": "why do cats purr", "q2": "market crash", "q3": "spring rain"}


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    spec = StudentConfig(tokenizer=OFFLINE_TEACHER, attn_implementation="sdpa",
                         config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                 "num_attention_heads": 2, "local_attention": 16, "global_attn_every_n_layers": 2})
    return build_student(spec, tokenizer).eval()


@pytest.fixture(scope="module")
def projection():
    torch.manual_seed(1)
    return nn.Linear(32, 24)  # a trained student's projection: every head's vectors go through it


def _embedder(model, tokenizer, projection, pooling="cls", **kw):
    kw = {"max_length": 128, "chunk_size": 16, "chunk_overlap": 4, "passage_prompt": "doc: ",
          "query_prompt": "query: ", "token_budget": 256, "name": "tiny", **kw}
    return Embedder(model, tokenizer, head=projection, pooling=pooling, **kw)


def _task():
    return RetrievalTask("toy", DOCS, QUERIES, {"q1": {"d1": 1}, "q2": {"d2": 1}, "q3": {"d3": 1}}).validate()


@contextmanager
def _count(model):
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        yield calls
    finally:
        hook.remove()


@pytest.mark.parametrize(("mean_over", "names"), [("content", ["mean", "cls_mean"]), ("all", ["mean"])])
def test_extra_heads_equal_separate_embedders_from_one_pass(model, tokenizer, projection, mean_over, names):
    e = _embedder(model, tokenizer, projection, mean_over=mean_over)
    extra = {name: e.extra_head(name) for name in names}
    items = e.tokenize(list(DOCS.values()), e.passage_prompt)
    assert len(e.batches(items)) == 2  # the 256-token budget: two passes for the three passages
    with _count(model) as calls:
        enc = e.embed(items, extra=extra)
    assert len(calls) == 2  # one forward pass per batch, whatever the number of heads
    plain = e.encode_passages(list(DOCS.values()))
    assert torch.allclose(enc.single, plain.single, atol=1e-5) and torch.allclose(enc.chunks, plain.chunks, atol=1e-5)
    assert torch.equal(enc.owner, plain.owner)
    queries = e.embed_queries(list(QUERIES.values()), extra=extra)
    for name in names:  # the reference: an Embedder of that pooling, its own full pass
        ref = _embedder(model, tokenizer, projection, pooling=name, mean_over=mean_over)
        assert torch.allclose(enc.extra[name], ref.encode_passages(list(DOCS.values()), chunks=False).single,
                              atol=1e-5)
        assert torch.allclose(queries.extra[name], ref.encode_queries(list(QUERIES.values())), atol=1e-5)
        assert enc.extra[name].shape == (3, 24) and torch.allclose(enc.extra[name].norm(dim=-1), torch.ones(3))
    assert not torch.allclose(enc.extra["mean"], enc.single, atol=1e-3)  # the heads do differ


def test_scores_per_mode_equal_separate_runs(model, tokenizer, projection):
    e = _embedder(model, tokenizer, projection)
    task = _task()
    r = DenseRetriever(e, ("single", "single:mean", "multi", "single:cls"), cache_dir=None, progress=False)
    assert set(r.extra) == {"single:mean"}  # single:cls is this model's own head: mode single's vectors
    with _count(model) as calls:
        s = r.score(task)
    assert len(calls) == 1 + 2  # the queries, then the passages' two batches
    assert list(s) == ["single", "single:mean", "multi", "single:cls"]
    plain = DenseRetriever(e, ("single", "multi"), cache_dir=None, progress=False).score(task)
    mean = DenseRetriever(_embedder(model, tokenizer, projection, pooling="mean"), ("single",), cache_dir=None,
                          progress=False).score(task)
    assert torch.allclose(s["single"], plain["single"], atol=1e-5) and torch.equal(s["single:cls"], s["single"])
    assert torch.allclose(s["multi"], plain["multi"], atol=1e-5)
    assert torch.allclose(s["single:mean"], mean["single"], atol=1e-5)


def test_pcw_averages_every_head_per_window(model, tokenizer, projection):
    texts = list(DOCS.values())
    e = extend(_embedder(model, tokenizer, projection), "pcw", 128, window=32)
    ref = extend(_embedder(model, tokenizer, projection, pooling="mean"), "pcw", 128, window=32)
    assert e.extension.splits and len(e.tokenize(texts[:1])[0].input_ids) > 64  # d1 spans several windows
    with _count(model) as calls:
        enc = e.encode_passages(texts, extra={"mean": e.extra_head("mean")})
    with _count(model) as plain_calls:
        plain = e.encode_passages(texts)
    assert len(calls) == len(plain_calls)  # the windows' passes, not one more
    assert torch.allclose(enc.single, plain.single, atol=1e-5) and torch.allclose(enc.chunks, plain.chunks, atol=1e-5)
    assert torch.allclose(enc.extra["mean"], ref.encode_passages(texts, chunks=False).single, atol=1e-5)
    task = _task()
    s = DenseRetriever(e, ("single:mean",), cache_dir=None, progress=False).score(task)["single:mean"]
    assert torch.allclose(s, DenseRetriever(ref, ("single",), cache_dir=None, progress=False).score(task)["single"],
                          atol=1e-5)


def test_cache_keeps_old_keys_and_adds_only_the_extra_head(model, tokenizer, projection, tmp_path):
    e = _embedder(model, tokenizer, projection)
    task, cache = _task(), str(tmp_path / "ec")
    first = DenseRetriever(e, ("single",), cache_dir=cache, progress=False).score(task)
    # the keys every earlier cache holds: model | settings | "single", over prompt + text
    old = [cache_key(f"{e.fingerprint}|{e.fingerprint_extra}|single", "doc: " + t) for t in DOCS.values()]
    r = DenseRetriever(e, ("single", "single:mean"), cache_dir=cache, progress=False)
    assert r.cache.dir.name == hashlib.sha256(b"tiny").hexdigest()[:16] and r.cache.missing(old) == []
    stored = torch.from_numpy(r.cache.get_many(old))
    with _count(model) as calls:
        both = r.score(task)
    assert len(calls) == 1 + 2  # single is cached, single:mean is not: one pass for it
    assert torch.equal(torch.from_numpy(r.cache.get_many(old)), stored)  # never rewritten
    assert torch.equal(both["single"], first["single"])
    mean_ref = _embedder(model, tokenizer, projection, pooling="mean")
    assert torch.allclose(both["single:mean"], mean_ref.embed_queries(list(QUERIES.values())).single
                          @ mean_ref.encode_passages(list(DOCS.values()), chunks=False).single.T, atol=1e-5)
    with _count(model) as calls:
        again = DenseRetriever(e, ("single:mean", "single"), cache_dir=cache, progress=False).score(task)
    assert len(calls) == 1  # the queries only
    assert all(torch.equal(again[m], both[m]) for m in both)
    # another head never reads the mean's vectors
    other = DenseRetriever(e, ("single:cls_mean",), cache_dir=cache, progress=False)
    assert other._extra_kind("single:cls_mean") != r._extra_kind("single:mean")


def test_killed_run_resumes_where_it_stopped(model, tokenizer, projection, tmp_path):
    e = _embedder(model, tokenizer, projection, token_budget=1)  # one passage per pass
    modes, cache = ("single", "single:mean", "multi"), str(tmp_path / "ec")
    part = RetrievalTask("toy", {"d1": DOCS["d1"]}, QUERIES, {"q1": {"d1": 1}}).validate()  # the run so far
    DenseRetriever(e, modes, cache_dir=cache, block=1, progress=False).score(part)
    with _count(model) as calls:
        s = DenseRetriever(e, modes, cache_dir=cache, block=1, progress=False).score(_task())
    assert len(calls) == 3 + 2  # three queries one by one, then d2 and d3: d1 is cached
    fresh = DenseRetriever(e, modes, cache_dir=None, progress=False).score(_task())
    assert all(torch.allclose(s[m], fresh[m], atol=1e-5) for m in modes)


@pytest.mark.parametrize(("modes", "expect"), [
    (("singel",), ("unknown scoring mode 'singel'; use single, multi, single:<pooling> or multi:<query pooling> "
                   "with <pooling> one of cls")),
    ((), "unknown scoring mode ''"),
    (("single:meen",), "unknown mode single:<pooling> 'meen'; use one of cls, mean"),
    (("single:attention",), "has learned weights this model did not train (its head is cls)"),
    (("single:last",), "'last' reads inputs with an appended EOS, unlike this embedder's cls head"),
])
def test_bad_modes_are_one_line(model, tokenizer, projection, modes, expect):
    with pytest.raises(ValueError, match="^[^\n]*$") as err:
        DenseRetriever(_embedder(model, tokenizer, projection), modes, cache_dir=None, progress=False)
    assert expect in str(err.value)


def test_eval_cli_comma_modes_and_report(tmp_path):
    from dewey_lab.eval.run import main

    out = tmp_path / "results"
    payload = main(["--model", OFFLINE_TEACHER, "--tasks", "passkey", "--lengths", "96", "--n_queries", "3",
                    "--n_docs", "4", "--mode", "single,single:cls,multi", "--out_dir", str(out), "--cache_dir", "",
                    "--progress", "false"])
    assert [r["mode"] for r in payload["rows"]] == ["single", "single:cls", "multi"]
    assert json.loads(next(out.rglob("*.json")).read_text())["summary"].keys() == {"single", "single:cls", "multi"}
    md = next(out.rglob("*.md")).read_text()
    assert "| single:cls |" in md and "passkey single:cls" in md
    with pytest.raises(ValueError, match="mode must be single, multi or both, or a comma list"):
        main(["--model", OFFLINE_TEACHER, "--mode", "single,late", "--cache_dir", ""])
