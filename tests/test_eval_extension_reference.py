"""Extensions against a second implementation written from LongEmbed's reference code
(``tests/longembed_reference.py``), on the packaged MiniLM (512 learned positions) at 128, 512 and
2,048 tokens in one padded batch; queries untouched; and, for each RoPE method above s = 1, a
reference that changes ModernBERT's global layers only, so a no-op or a change to the local layers
fails."""

import copy

import pytest
import torch
from transformers import ModernBertModel

from dewey_lab.eval.embedder import Embedder
from dewey_lab.eval.load import extend
from dewey_lab.model.student import StudentConfig, build_student
from dewey_lab.resolve import OFFLINE_TEACHER
from tests.longembed_reference import (
    reference_encode,
    reference_pcw,
    self_extend_attention,
    self_extend_distance,
)

WORDS = ["green", "blue", "sky", "grass", "river", "stone", "house", "garden", "yellow", "red", "old", "new", "city", "road", "light", "night", "day", "water", "tree", "bird"]
LENGTHS = (128, 512, 1000, 2048)  # tokens with [CLS] and [SEP]; 1000 gets GP factor 2 next to 2048's 4
TARGET = 2048


def text_of(n_tokens: int, seed: int) -> str:
    """n_tokens - 2 one-token words (checked below), seeded: MiniLM reads it as exactly n_tokens."""
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (n_tokens - 2,), generator=g).tolist())


@pytest.fixture(scope="module")
def minilm():
    from dewey_lab.eval.load import load_embedder

    return load_embedder(OFFLINE_TEACHER, device="cpu")


@pytest.fixture(scope="module")
def texts(minilm):
    out = [text_of(n, seed=n) for n in LENGTHS]
    assert [len(minilm.tokenizer(t)["input_ids"]) for t in out] == list(LENGTHS)
    return out


@pytest.fixture(scope="module")
def unextended(minilm, texts):
    """The reference's vectors without an extension (each text cut at the 512-token window)."""
    return [reference_encode(minilm.model, minilm.tokenizer, t, "original", 512, 512) for t in texts]


@pytest.mark.parametrize("spec, mode", [("gp", "group"), ("rp", "recurrent"), ("pi", "interpolate"), ("pcw", "chunk")])
def test_minilm_extensions_equal_the_reference(minilm, texts, unextended, spec, mode):
    e = extend(minilm, spec, TARGET)
    assert minilm.mean_over == "all"  # sentence-transformers' mean: the reference's "avg" pooling
    ours = e.encode_passages(texts, chunks=False).single  # one padded batch of all four lengths
    assert len(e.batches(e.tokenize(texts, ""))) == 1
    for text, n, vec, plain in zip(texts, LENGTHS, ours, unextended):
        if mode == "chunk":
            ref = reference_pcw(minilm.model, minilm.tokenizer, text, 512, TARGET)
        else:
            ref = reference_encode(minilm.model, minilm.tokenizer, text, mode, 512, TARGET)
        assert torch.allclose(vec, ref, atol=2e-5), f"{spec} at {n} tokens: max diff {(vec - ref).abs().max():.2e}"
        if n <= 512:  # L_o tokens or fewer: the unextended model's vector
            assert torch.allclose(vec, plain, atol=2e-5)
        else:  # and the method does something past the window
            assert not torch.allclose(vec, plain, atol=1e-3)


@pytest.mark.parametrize("spec", ["gp", "rp", "pi", "pcw", "gp(attention_scaling=true)", "pi(attention_scaling=true)"])
def test_queries_are_the_unextended_vectors(minilm, spec):
    queries = ["What is the pass key for Mira Holt?", "a", "Which river runs past the old stone house?"]
    base = minilm.encode_queries(queries)
    ext = extend(minilm, spec, 4096)  # s = 8
    assert torch.equal(ext.encode_queries(queries), base) or torch.allclose(ext.encode_queries(queries), base, atol=1e-6)


# -- RoPE: ModernBERT, global layers only ---------------------------------------------------------
@pytest.fixture(scope="module")
def modernbert():
    torch.manual_seed(0)
    spec = StudentConfig(tokenizer=OFFLINE_TEACHER, attn_implementation="sdpa", global_rope_theta=1000.0,
                         config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                                 "num_attention_heads": 2, "local_attention": 16, "global_attn_every_n_layers": 2,
                                 "max_position_embeddings": 64})
    from dewey_lab.model.student import load_tokenizer

    tok = load_tokenizer(OFFLINE_TEACHER)
    model = build_student(spec, tok).eval()
    with torch.no_grad():  # sharper attention than a fresh init: positions then move the output visibly
        for layer in model.layers:
            layer.attn.Wqkv.weight.mul_(8)
    return model, tok


def _with_global_rope(model, **params):
    """A copy of ``model`` built by transformers from a config whose global layers' rope_parameters get
    ``params`` (the local layers' are untouched); same weights."""
    config = copy.deepcopy(model.config)
    config.rope_parameters["full_attention"] = {**config.rope_parameters["full_attention"], **params}
    ref = ModernBertModel(config).eval()
    ref.load_state_dict(model.state_dict())
    return ref


def _states(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state


@pytest.mark.parametrize("spec", ["pi", "ntk", "yarn"])
def test_rope_methods_change_exactly_the_global_layers(modernbert, spec):
    model, tok = modernbert
    L_o, target, L = 64, 256, 200  # s = 4
    ids = torch.randint(1000, 5000, (1, L), generator=torch.Generator().manual_seed(1))
    theta = model.config.rope_parameters["full_attention"]["rope_theta"]
    d = model.config.hidden_size // model.config.num_attention_heads
    ref_model = {
        "pi": lambda: _with_global_rope(model, rope_type="linear", factor=4.0),  # positions / s
        "ntk": lambda: _with_global_rope(model, rope_theta=theta * 4 ** (d / (d - 2))),  # theta x s^(d/(d-2))
        "yarn": lambda: _with_global_rope(model, rope_type="yarn", factor=4.0, original_max_position_embeddings=L_o,
                                          beta_fast=32.0, beta_slow=1.0),
    }[spec]()
    e = extend(Embedder(model, tok, max_length=L_o), spec, target)
    ours = e._hidden(ids, torch.ones_like(ids))
    ref = _states(ref_model, ids)
    assert torch.allclose(ours, ref, atol=1e-5), f"{spec}: max diff {(ours - ref).abs().max():.2e}"
    assert (ours - _states(model, ids)).abs().max() > 1e-2  # not a no-op


def test_self_extend_equals_per_pair_distances_on_global_layers(modernbert):
    model, tok = modernbert
    L, g, w = 120, 3, 6  # local layers attend +-8: SelfExtend there (w = 6) would regroup their keys
    ids = torch.randint(1000, 5000, (1, L), generator=torch.Generator().manual_seed(2))
    e = extend(Embedder(model, tok, max_length=32), f"selfextend(group={g},window={w})", 128)
    ours = e._hidden(ids, torch.ones_like(ids))

    ref_model = copy.deepcopy(model)
    distance = self_extend_distance(L, g, w)
    inv = ref_model.rotary_emb.full_attention_inv_freq
    for layer in ref_model.layers:
        if layer.attn.sliding_window is None:  # global layers only
            attn = layer.attn
            attn.forward = lambda h, *a, _m=attn, **k: (self_extend_attention(_m, h, inv, distance), None)
    ref = _states(ref_model, ids)
    assert torch.allclose(ours, ref, atol=1e-4), f"max diff {(ours - ref).abs().max():.2e}"
    assert (ours - _states(model, ids)).abs().max() > 1e-2  # not a no-op
