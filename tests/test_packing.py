"""Packing and token-budget batching: same embeddings as one text per row, every text once per epoch."""

import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from dewey_lab.data.items import collate
from dewey_lab.data.packing import TokenBudgetBatchSampler, first_fit_decreasing
from dewey_lab.model import attention
from dewey_lab.model.module import DistillModule
from dewey_lab.model.pooling import ChunkMeanPooling, CLSMeanPooling, CLSPooling, MeanPooling
from dewey_lab.model.student import StudentConfig
from dewey_lab.resolve import OFFLINE_TEACHER
from tests.test_datamodule import CountingTeacher, _dm


def test_first_fit_decreasing_known_answer_and_capacity():
    # 7 and 3 fill a row; 6 and 4 fill the next; 5, 5 the last: three full rows of 10
    assert sorted(map(sorted, first_fit_decreasing([7, 6, 5, 5, 4, 3], 10))) == [[0, 5], [1, 4], [2, 3]]
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(300)]
    rows = first_fit_decreasing(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert len(rows) <= -(-sum(lengths) // 128) * 11 // 9 + 1
    with pytest.raises(ValueError, match="pack_length"):
        first_fit_decreasing([129], 128)


@pytest.mark.parametrize("packed", [False, True])
def test_token_budget_batches_cover_every_text_once_within_budget(packed):
    rng = random.Random(1)
    lengths = [min(512, int(rng.paretovariate(1.2) * 40)) for _ in range(1000)]
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=2048, packed=packed, seed=3)
    seen = []
    for epoch in range(2):
        sampler.sampler.set_epoch(epoch)  # what Lightning calls each epoch
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(1000))
        for b in batches:
            cost = sum(lengths[i] for i in b) if packed else len(b) * max(lengths[i] for i in b)
            assert cost <= 2048
        seen.append(batches)
    assert seen[0] != seen[1]  # a new mix each epoch
    again = TokenBudgetBatchSampler(lengths, max_tokens=2048, packed=packed, seed=3)
    assert list(again) == seen[0]  # and the same mix for the same seed
    if not packed:  # sorting within pools: far less padding than batches of the same sizes in random order
        padded = sum(len(b) * max(lengths[i] for i in b) for b in seen[0])
        order = list(range(1000))
        random.Random(0).shuffle(order)
        at, rand_padded = 0, 0
        for b in seen[0]:
            part = order[at:at + len(b)]
            rand_padded += len(b) * max(lengths[i] for i in part)
            at += len(b)
        assert padded < 0.5 * rand_padded


def torch_varlen_reference(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), **kwargs):
    """``torch.nn.attention.varlen.varlen_attn`` as its documentation defines it, on any device: (T, H, D)
    tokens of segments [cu[i], cu[i+1]), each attending within itself; query i sees key j when
    i - left <= j <= i + right (a side of -1: unbounded)."""
    left, right = window_size
    outs = []
    for a, b in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        pos = torch.arange(b - a)
        d = pos[None, :] - pos[:, None]  # j - i
        mask = ((d >= -left) | (left < 0)) & ((d <= right) | (right < 0))
        outs.append(F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1),
                                                   v[a:b].transpose(0, 1), attn_mask=mask, scale=scale).transpose(0, 1))
    return torch.cat(outs)


def varlen_reference(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                     cu_seq_lens_q=None, **kwargs):
    """What flash-attn's varlen kernel computes, segment by segment with plain SDPA: the reference
    for the ``cu_seqlens`` path that packed batches take on flash-attn."""
    assert attention_mask is None and query.shape[0] == 1 and cu_seq_lens_q is not None
    w = sliding_window - 1 if sliding_window is not None else -1  # flash-attn's inclusive bound
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (L, H, D)
    out = torch_varlen_reference(q, k, v, cu_seq_lens_q, cu_seq_lens_q, 0, 0, scale=scaling, window_size=(w, w))
    return out.unsqueeze(0).contiguous(), None


AttentionInterface.register("varlen_reference", varlen_reference)


@pytest.fixture(scope="module")
def counting_cache(tmp_path_factory):
    """The counting teacher's 12-d vectors (the shared cache holds the real teacher's 384-d)."""
    return tmp_path_factory.mktemp("counting_cache")


@pytest.mark.parametrize("impl", ["sdpa", "eager", "varlen_reference", attention.TORCH_VARLEN])
def test_packed_batch_gives_the_unpacked_embeddings(impl, small_corpus_path, counting_cache, monkeypatch):
    dm = _dm(small_corpus_path, counting_cache, CountingTeacher(), max_length=96, batch_size=12, prompt="doc: ",
             max_windows_per_doc=None)  # every window: each document ends in a short one
    dm.prepare_data()
    dm.setup("fit")
    data = dm.datasets["train"]
    by_length = sorted(range(len(data)), key=lambda i: data.examples[i].n_tokens)
    items = [data[i] for i in by_length[:6] + by_length[-6:]]  # the 6 shortest texts and 6 full windows
    assert len({len(it["input_ids"]) for it in items}) > 4
    unpacked, packed = collate(items), collate(items, pack_length=96)
    R, T = packed["input_ids"].shape
    assert R < 12 and R * T < unpacked["input_ids"].numel()  # fewer rows, fewer tokens
    assert (packed["position_ids"][packed["token_doc"] >= 0] < 96).all()  # positions restart per text

    monkeypatch.setattr(attention, "VARLEN", attention.VARLEN | {"varlen_reference"})
    monkeypatch.setattr(attention, "_torch_varlen_attn", lambda: torch_varlen_reference)  # the CUDA kernel's CPU stand-in
    torch.manual_seed(0)
    spec = StudentConfig(tokenizer=OFFLINE_TEACHER, attn_implementation="sdpa",
                         config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
                                 "num_attention_heads": 2, "local_attention": 16, "initializer_range": 0.3})
    module = DistillModule(student=spec, teacher_dim=12, projection="linear").eval()
    with torch.no_grad():
        h_un = attention.forward_rows(module.student, unpacked)  # one text per row, transformers' SDPA path
        module.student.config._attn_implementation = impl
        h_pk = attention.forward_rows(module.student, packed)
        module.student.config._attn_implementation = "sdpa"
        assert (h_un - h_un.mean()).abs().max() > 0.1  # the check below is not trivially true
        for head in (CLSPooling(), MeanPooling(), CLSMeanPooling(), ChunkMeanPooling()):
            torch.testing.assert_close(head(h_pk, packed), head(h_un, unpacked), atol=1e-5, rtol=1e-5)
        # a token's state depends on its own text only: each text alone equals its packed copy
        for b in (0, 5):
            alone = collate([items[b]])
            h_alone = attention.forward_rows(module.student, alone)[0]  # no padding at all
            r, s = packed["doc_row"][b], packed["doc_start"][b]
            torch.testing.assert_close(h_pk[r, s:s + len(h_alone)], h_alone, atol=1e-5, rtol=1e-5)
        assert torch.equal(packed["t_chunk"], unpacked["t_chunk"])


def test_packed_attention_needs_a_mask_or_varlen_backend(small_corpus_path, counting_cache):
    dm = _dm(small_corpus_path, counting_cache, CountingTeacher(), max_length=96, batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    batch = collate([dm.datasets["train"][i] for i in range(4)], pack_length=96)
    spec = StudentConfig(tokenizer=OFFLINE_TEACHER, config={"hidden_size": 32, "intermediate_size": 64,
                                                            "num_hidden_layers": 1, "num_attention_heads": 2})
    module = DistillModule(student=spec, teacher_dim=12)
    module.student.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="pack: false"):
        attention.forward_rows(module.student, batch)


def test_datamodule_options_check_the_window(small_corpus_path, tmp_path):
    with pytest.raises(ValueError, match="pack_length"):
        _dm(small_corpus_path, tmp_path, pack=True, pack_length=64, max_length=128)
    with pytest.raises(ValueError, match="batch_tokens"):
        _dm(small_corpus_path, tmp_path, batch_tokens=100, max_length=128)


def test_torch_varlen_on_a_padded_batch_equals_sdpa(monkeypatch):
    """The eval path: a padded (B, L) batch through torch_varlen is unpadded into segments and gives SDPA's
    states on every real token (padding rows 0), ModernBERT's local windows included."""
    monkeypatch.setattr(attention, "_torch_varlen_attn", lambda: torch_varlen_reference)
    torch.manual_seed(0)
    spec = StudentConfig(tokenizer=OFFLINE_TEACHER, attn_implementation="sdpa",
                         config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
                                 "num_attention_heads": 2, "local_attention": 16, "initializer_range": 0.3})
    model = DistillModule(student=spec, teacher_dim=12, projection="linear").eval().student
    lengths = [70, 23, 41]
    ids = torch.randint(1000, 5000, (3, 70))
    mask = (torch.arange(70)[None, :] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        model.config._attn_implementation = attention.TORCH_VARLEN
        try:
            got = model(input_ids=ids, attention_mask=mask).last_hidden_state
        finally:
            model.config._attn_implementation = "sdpa"
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-4, rtol=1e-4)  # fp32 summation order


def test_auto_picks_torch_varlen_on_cuda_without_flash_attn(monkeypatch):
    from dewey_lab.model import student

    monkeypatch.setattr(student.importlib.util, "find_spec", lambda name: None)  # no flash-attn
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert student.pick_attn_implementation("auto") == "sdpa"  # a CPU keeps masked SDPA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention, "_torch_varlen_attn", lambda: torch_varlen_reference)
    assert student.pick_attn_implementation("auto") == attention.TORCH_VARLEN
    monkeypatch.setattr(attention, "_torch_varlen_attn", lambda: None)  # a torch without the kernel
    assert student.pick_attn_implementation("auto") == "sdpa"
    with pytest.raises(RuntimeError, match="attn_implementation: auto"):
        student.pick_attn_implementation(attention.TORCH_VARLEN)


def test_packed_texts_attending_alone_equal_the_unpacked_path(small_corpus_path, counting_cache):
    """The SDPA path runs each packed text on its own (``BANDED_PACKED``, ``row_spans``): global layers one
    unmasked SDPA per text, sliding layers block by block within the text. With 16-query blocks (a 16-token
    window crossing every block edge) each text's states and the gradients equal the unpacked run's."""
    import functools

    from transformers import AttentionInterface

    dm = _dm(small_corpus_path, counting_cache, CountingTeacher(), max_length=96, batch_size=12, prompt="doc: ",
             max_windows_per_doc=None)
    dm.prepare_data()
    dm.setup("fit")
    data = dm.datasets["train"]
    by_length = sorted(range(len(data)), key=lambda i: data.examples[i].n_tokens)
    items = [data[i] for i in by_length[:6] + by_length[-6:]]
    unpacked, packed = collate(items), collate(items, pack_length=96)
    torch.manual_seed(0)
    spec = StudentConfig(tokenizer=OFFLINE_TEACHER, attn_implementation="sdpa",
                         config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
                                 "num_attention_heads": 2, "local_attention": 16, "initializer_range": 0.3})
    module = DistillModule(student=spec, teacher_dim=12, projection="linear").eval()
    AttentionInterface.register(attention.BANDED_PACKED, functools.partial(attention.banded_sdpa, block=16))
    try:
        with torch.no_grad():
            h_un = attention.forward_rows(module.student, unpacked)  # transformers' own SDPA path, one text per row
            h_pk = attention.forward_rows(module.student, packed)
        grads = []  # and the backward: each text attending on its own gives the unpacked path's gradients
        for batch in (unpacked, packed):
            module.zero_grad()
            h = attention.forward_rows(module.student, batch)
            sum(head(h, batch).pow(2).sum() for head in (CLSPooling(), ChunkMeanPooling())).backward()
            grads.append({n: p.grad.clone() for n, p in module.student.named_parameters() if p.grad is not None})
    finally:
        AttentionInterface.register(attention.BANDED_PACKED,
                                    functools.partial(attention.banded_sdpa, block=attention.PACKED_BLOCK))
    assert module.student.config._attn_implementation == "sdpa"  # restored after the pass
    for head in (CLSPooling(), MeanPooling(), ChunkMeanPooling()):
        torch.testing.assert_close(head(h_pk, packed), head(h_un, unpacked), atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-4, rtol=1e-4, msg=name)
