"""Context-window extensions against independent statements of their definitions (LongEmbed §4),
the s = 1 identity for every method, ModernBERT's local layers left alone, and misfit errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from dewey_lab.eval.embedder import Embedder
from dewey_lab.eval.extension.methods import (
    NTK,
    PCW,
    GroupedPositions,
    PositionInterpolation,
    RecurrentPositions,
    SelfExtend,
    YaRN,
    parse_extension,
)
from dewey_lab.eval.extension.scaling import _scaled_attention, scaled_attention
from dewey_lab.eval.extension.self_extend import relative_positions, self_extend_logits
from dewey_lab.eval.load import extend
from dewey_lab.model.student import StudentConfig, build_student
from dewey_lab.resolve import OFFLINE_TEACHER

LONG = "The grass is green. Mira Holt's pass key is 52817. " + "The sky is blue. Here we go again. " * 120


@pytest.fixture(scope="module")
def minilm():
    from dewey_lab.eval.load import load_embedder

    return load_embedder(OFFLINE_TEACHER, device="cpu")


@pytest.fixture(scope="module")
def modernbert(tokenizer):
    torch.manual_seed(0)
    spec = StudentConfig(tokenizer=OFFLINE_TEACHER, attn_implementation="sdpa",
                         config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                                 "num_attention_heads": 2, "local_attention": 16, "global_attn_every_n_layers": 2,
                                 "max_position_embeddings": 64})
    model = build_student(spec, tokenizer).eval()
    return Embedder(model, tokenizer, max_length=64, chunk_size=16, chunk_overlap=4)


# -- definitions ---------------------------------------------------------------------------------
def test_grouped_and_recurrent_positions_for_ten_tokens(minilm):
    # L_o = 4, L_t = 10 -> s = ceil(10 / 4) = 3; rows of 10, 7 and 4 tokens in one padded batch, by hand:
    # GP's factor is each row's own ceil(length / 4): 3, 2 and 1 (a row of L_o tokens keeps its positions)
    gp = GroupedPositions().bind(minilm.model, 4, 10)
    rp = RecurrentPositions().bind(minilm.model, 4, 10)
    assert gp.s == 3
    assert gp.position_ids(torch.tensor([10, 7, 4])).tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2, 3],
                                                                  [0, 0, 1, 1, 2, 2, 3, 0, 0, 0],
                                                                  [0, 1, 2, 3, 0, 0, 0, 0, 0, 0]]
    assert GroupedPositions(factor=2).bind(minilm.model, 4, 10).position_ids(torch.tensor([10, 4])).tolist() == [
        [0, 0, 1, 1, 2, 2, 3, 3, 4, 4], [0, 1, 2, 3, 0, 0, 0, 0, 0, 0]]
    assert rp.position_ids(10).tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1]]


def test_self_extend_relative_positions_paper_example():
    d = relative_positions(10, g=2, w=4)
    assert d[0].tolist() == [0, 1, 2, 3, 4, 4, 5, 5, 6, 6]  # x0 sees {0,1,2,3,4,4,5,5,6,6}
    assert torch.equal(d, -d.T)  # bidirectional: both triangles, mirrored


def test_self_extend_logits_equal_per_pair_rotations():
    torch.manual_seed(0)
    L, Dh, g, w = 12, 8, 3, 2
    q, k = torch.randn(1, 1, L, Dh, dtype=torch.float64), torch.randn(1, 1, L, Dh, dtype=torch.float64)
    inv = 1.0 / (10000 ** (torch.arange(0, Dh, 2, dtype=torch.float64) / Dh))
    ours = self_extend_logits(q, k, inv, g, w)[0, 0]

    def dist(i, j):  # the method's definition, case by case
        if abs(j - i) <= w:
            return j - i
        shift = w - w // g
        return j // g - i // g + (shift if j > i else -shift)

    half = Dh // 2
    ref = torch.zeros(L, L, dtype=torch.float64)
    for i in range(L):
        for j in range(L):
            # RoPE in ModernBERT's rotate-half layout as complex numbers: dims (m, m + Dh/2) form one pair
            qc = torch.complex(q[0, 0, i, :half], q[0, 0, i, half:])
            kc = torch.complex(k[0, 0, j, :half], k[0, 0, j, half:]) * torch.exp(1j * dist(i, j) * inv)
            ref[i, j] = (qc * kc.conj()).real.sum()
    assert torch.allclose(ours, ref, atol=1e-5)  # RoPE angles are fp32, as ModernBERT computes them


def test_position_interpolation_table_integer_and_half_positions(minilm):
    pi = PositionInterpolation().bind(minilm.model, 512, 1024)
    weight = minilm.model.embeddings.position_embeddings.weight
    table = pi.table(weight, 1024)
    assert torch.allclose(table[0::2], weight)  # E_t[i * s] = E_o[i]
    assert torch.allclose(table[1:-1:2], (weight[:-1] + weight[1:]) / 2)  # halfway: the mean of the neighbours
    assert torch.allclose(table[-1], weight[-1])  # past the last original row: held


def test_ntk_frequencies_on_global_layers_only(modernbert):
    model = modernbert.model
    ntk = NTK(factor=10).bind(model, 64, 256)
    rotary = model.rotary_emb
    d = model.config.hidden_size // model.config.num_attention_heads
    theta = model.config.rope_parameters["full_attention"]["rope_theta"]
    local_before = rotary.sliding_attention_inv_freq.clone()
    with ntk.patched(model, torch.tensor([256]), 256):
        expected = 1.0 / ((theta * 10) ** (torch.arange(0, d, 2).float() / d))
        assert torch.allclose(rotary.full_attention_inv_freq, expected, rtol=1e-5)
        assert torch.equal(rotary.sliding_attention_inv_freq, local_before)
    assert ntk.lam(64) == 10 and NTK().bind(model, 64, 512).lam(64) == pytest.approx(8 ** (64 / 62))


def test_pcw_is_the_mean_of_window_embeddings(minilm):
    e = extend(minilm, "pcw", 2048)
    tok = minilm.tokenizer
    text_ids = tok(LONG, add_special_tokens=False)["input_ids"]
    n = len(text_ids)
    assert 512 < n < 1500
    room = 512 - 2
    starts = [*range(0, n - room, room), n - room]  # no overlap, the last window ends at the end
    vecs = []
    for a in starts:
        ids = torch.tensor([[tok.cls_token_id, *text_ids[a:a + room], tok.sep_token_id]])
        with torch.no_grad():
            h = minilm.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
        vecs.append(h.mean(0))  # MiniLM's raw (unnormalised) vector of the window
    ref = F.normalize(torch.stack(vecs).mean(0), dim=-1)  # raw vectors averaged, then normalised
    assert torch.allclose(e.encode_passages([LONG], chunks=False).single[0], ref, atol=1e-5)


# -- s = 1: every method is the unextended model -------------------------------------------------
@pytest.mark.parametrize("spec", ["pcw", "gp", "rp", "pi", "pi(attention_scaling=true)"])
def test_ape_methods_at_s1_reproduce_the_model(minilm, spec):
    texts = ["a short query", LONG[:1500]]
    base = minilm.encode_passages(texts)
    ext = extend(minilm, spec, 512).encode_passages(texts)
    assert torch.allclose(base.single, ext.single, atol=1e-5) and torch.allclose(base.chunks, ext.chunks, atol=1e-5)


@pytest.mark.parametrize("spec", ["pcw", "pi", "ntk", "yarn", "selfextend", "ntk(attention_scaling=true)"])
def test_rope_methods_at_s1_reproduce_the_model(modernbert, spec):
    texts = ["a short query", LONG[:200]]
    base = modernbert.encode_passages(texts)
    ext = extend(modernbert, spec, 64).encode_passages(texts)
    assert torch.allclose(base.single, ext.single, atol=1e-5) and torch.allclose(base.chunks, ext.chunks, atol=1e-5)


# -- ModernBERT: local layers untouched ----------------------------------------------------------
@pytest.mark.parametrize("spec", ["pi", "ntk", "yarn"])
def test_rope_methods_leave_local_layers_alone(modernbert, spec):
    model = modernbert.model
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault(module.attention_type, []).append(kwargs["position_embeddings"])

    hooks = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in model.layers]
    ids = torch.randint(1000, 2000, (1, 200))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
            ext = parse_extension(spec).bind(model, 64, 256)
            ext.forward(model, ids, torch.ones_like(ids))
    finally:
        for h in hooks:
            h.remove()
    (cos0, sin0), (cos1, sin1) = seen["sliding_attention"][0], seen["sliding_attention"][-1]
    assert torch.equal(cos0, cos1) and torch.equal(sin0, sin1)  # local: the same rotations
    assert not torch.allclose(seen["full_attention"][0][0], seen["full_attention"][-1][0])  # global: changed


def test_self_extend_patches_global_layers_only(modernbert):
    model = modernbert.model
    ext = SelfExtend().bind(model, 64, 256)
    assert (ext.g, ext.w) == (5, 8)  # s = 4 -> g = s + 1; w = L_o / 8
    with ext.patched(model, torch.tensor([256]), 256):
        patched = ["forward" in layer.attn.__dict__ for layer in model.layers]
    assert patched == [layer.attention_type == "full_attention" for layer in model.layers]
    assert not any("forward" in layer.attn.__dict__ for layer in model.layers)  # restored


def test_extended_runs_past_the_window(minilm, modernbert):
    long_minilm = extend(minilm, "gp", 1024).encode_passages([LONG])
    assert long_minilm.single.shape == (1, 384) and torch.isfinite(long_minilm.single).all()
    for spec in ("selfextend", "yarn", "pcw"):
        out = extend(modernbert, spec, 256).encode_passages([LONG[:900]])
        assert torch.isfinite(out.single).all() and len(out.chunks) > 4


def test_attention_scaling_factor_per_sequence():
    calls = {}

    class Module:
        sliding_window = None

    def base(module, q, k, v, mask, scaling=None, **kw):
        calls["q"], calls["scaling"] = q, scaling

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = type("C", (), {"_attn_implementation": "sdpa"})()
    model = type("M", (), {"config": config})()
    saved = ALL_ATTENTION_FUNCTIONS["sdpa"]
    ALL_ATTENTION_FUNCTIONS["sdpa"] = base
    try:  # one batch: a 4,096-token row, a 300-token row (padded to 4,096), a 512-token row
        with scaled_attention(model, torch.tensor([4096, 300, 512]), 512):
            _scaled_attention(Module(), torch.ones(3, 1, 1, 64), None, None, None, scaling=0.125)
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = saved
    # logits x max(1, log L / log 512) with each row's own L: the scale on q is the scale on q.k
    row_scale = calls["q"][:, 0, 0, 0].tolist()
    assert row_scale == pytest.approx([math.log(4096) / math.log(512), 1.0, 1.0])
    assert calls["scaling"] == 0.125 and config._attn_implementation == "sdpa"


# -- misfits: one line ---------------------------------------------------------------------------
def test_misfits_are_one_line(minilm, modernbert):
    cases = [
        (lambda: extend(minilm, "ntk", 1024), "learned absolute"),
        (lambda: extend(minilm, "selfextend", 1024), "learned absolute"),
        (lambda: extend(modernbert, "gp", 256), "RoPE"),
        (lambda: extend(minilm, "pi", 512 * 40), "outside [1, 32]"),
        (lambda: parse_extension("streching"), "unknown extension"),
        (lambda: parse_extension("ntk(lambda=3)"), "unexpected keyword"),
    ]
    for make, expect in cases:
        with pytest.raises(ValueError) as err:
            make()
        assert expect in str(err.value) and "\n" not in str(err.value)


def test_parse_extension_specs():
    assert parse_extension("none") is None
    se = parse_extension("selfextend(group=9, window=64)")
    assert isinstance(se, SelfExtend) and (se.group, se.window) == (9, 64)
    assert isinstance(parse_extension("PCW"), PCW) and isinstance(parse_extension("YaRN"), YaRN)
    assert parse_extension("ntk(factor=10.0)").factor == 10.0
