"""Decoder embedders (E5-Mistral / Linq-Embed-Mistral / Qwen3-Embedding style) on a tiny random Mistral built
here: last-token pooling over an appended EOS with right padding, an instruction on queries only, the RoPE
extensions on decoder layers (s = 1 identity; long inputs changed), and `dewey-lab eval` end to end."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import processors
from transformers import MistralConfig, MistralModel, PreTrainedTokenizerFast

from dewey_lab.cli import main
from dewey_lab.eval.load import DECODER_INSTRUCTION, extend, is_decoder, load_embedder
from dewey_lab.model.student import load_tokenizer
from dewey_lab.resolve import OFFLINE_TEACHER

WINDOW = 64


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    """A Mistral of 2 layers (GQA: 4 query heads, 2 key/value heads) and a Llama-style tokenizer: MiniLM's
    vocabulary with a BOS in front and no EOS at the end (the Embedder must append it)."""
    folder = tmp_path_factory.mktemp("tiny-mistral")
    base = load_tokenizer(OFFLINE_TEACHER)
    backend = base.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", base.cls_token_id)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="[CLS]", eos_token="[SEP]", unk_token="[UNK]",
                                  pad_token="[PAD]", model_max_length=WINDOW)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=WINDOW,
                           rope_theta=100.0, sliding_window=None, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = MistralModel(config)
    with torch.no_grad():  # sharper attention than a fresh init, so positions move the output visibly
        for layer in model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def decoder(decoder_dir):
    return load_embedder(str(decoder_dir), device="cpu")


def test_loads_as_a_decoder_embedder(decoder):
    assert is_decoder(decoder.model.config) and decoder.pooling == "last"
    assert decoder.query_prompt == DECODER_INSTRUCTION and decoder.passage_prompt == ""
    assert decoder.max_length == WINDOW


def test_last_token_pooling_over_an_appended_eos_with_right_padding(decoder):
    texts = ["the sky is blue", "the grass is green and the river runs past the old stone house"]
    items = decoder.tokenize(texts, decoder.passage_prompt)
    eos, bos = decoder.tokenizer.eos_token_id, decoder.tokenizer.bos_token_id
    assert all(it.input_ids[0] == bos and it.input_ids[-1] == eos for it in items)
    assert sum(it.input_ids.count(eos) for it in items) == 2  # exactly one EOS each
    got = decoder.encode_passages(texts, chunks=False).single  # one right-padded batch of two lengths
    for it, vec in zip(items, got):  # by hand: the hidden state at the EOS, alone (no padding), normalised
        ids = torch.tensor([it.input_ids])
        with torch.no_grad():
            h = decoder.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0, -1]
        assert torch.allclose(vec, F.normalize(h, dim=-1), atol=1e-5)


def test_eos_is_kept_when_the_text_fills_the_window(decoder):
    (item,) = decoder.tokenize(["stone " * 200], "")
    assert len(item.input_ids) == WINDOW and item.input_ids[-1] == decoder.tokenizer.eos_token_id and item.truncated


def test_instruction_on_queries_only(decoder):
    q = decoder.tokenize(["which river?"], decoder.query_prompt)[0]
    p = decoder.tokenize(["which river?"], decoder.passage_prompt)[0]
    assert len(q.input_ids) > len(p.input_ids) + 10
    plain = load_embedder(str(decoder.model.name_or_path), device="cpu", query_prompt="")
    assert not torch.allclose(decoder.encode_queries(["which river?"]), plain.encode_queries(["which river?"]))


@pytest.mark.parametrize("spec", ["pi", "ntk", "yarn"])
def test_rope_extensions_on_decoder_layers(decoder, spec):
    texts = ["a short query", "the river runs past the old stone house " * 20]  # ~9 and ~160 tokens
    base = decoder.encode_passages(texts, chunks=False).single
    same = extend(decoder, spec, WINDOW).encode_passages(texts, chunks=False).single  # s = 1
    assert torch.allclose(same, base, atol=1e-5)
    long = extend(decoder, spec, 4 * WINDOW)  # s = 4
    assert long.max_length == 4 * WINDOW
    wide = load_embedder(str(decoder.model.name_or_path), device="cpu", max_length=4 * WINDOW)  # no extension
    plain = wide.encode_passages(texts, chunks=False).single
    ext = long.encode_passages(texts, chunks=False).single
    assert (ext[1] - plain[1]).abs().max() > 1e-3  # the long input reads differently
    if spec == "pi":  # per input: a short input is the unextended model's
        assert torch.allclose(ext[0], plain[0], atol=1e-5)
    else:  # model level: every input changes (rope_theta / frequencies of the whole model)
        assert (ext[0] - plain[0]).abs().max() > 1e-4


def test_selfextend_on_decoder_layers_equals_per_pair_distances(decoder):
    import copy

    from tests.longembed_reference import causal_self_extend_attention, self_extend_distance

    model, L, g, w = decoder.model, 150, 3, 8
    ids = torch.randint(1000, 5000, (1, L), generator=torch.Generator().manual_seed(4))
    ext = extend(decoder, f"selfextend(group={g},window={w})", 4 * WINDOW)
    ours = ext._hidden(ids, torch.ones_like(ids))
    ref_model = copy.deepcopy(model)
    distance, inv = self_extend_distance(L, g, w), ref_model.rotary_emb.inv_freq
    for layer in ref_model.layers:
        attn = layer.self_attn
        attn.forward = lambda *a, _m=attn, **k: (causal_self_extend_attention(_m, k.get("hidden_states", a[0] if a
                                                                                        else None), inv, distance), None)
    with torch.no_grad():
        ref = ref_model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        plain = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert torch.allclose(ours, ref, atol=1e-4), f"max diff {(ours - ref).abs().max():.2e}"
    assert (ours - plain).abs().max() > 1e-2  # not a no-op
    # padded rows: a batch of this input and a shorter one gives each its own vector
    texts = ["the river runs past the old stone house " * 15, "a short query"]
    both = ext.encode_passages(texts, chunks=False).single
    alone = torch.cat([ext.encode_passages([t], chunks=False).single for t in texts])
    assert torch.allclose(both, alone, atol=1e-5)


def test_eval_cli_scores_a_tiny_decoder(decoder_dir, tmp_path):
    out = tmp_path / "results"
    main(["eval", "--model", str(decoder_dir), "--tasks", "passkey", "--lengths", "64,160", "--n_queries", "3",
          "--n_docs", "5", "--extension", "none,ntk", "--mode", "both", "--out_dir", str(out), "--cache_dir",
          str(tmp_path / "ec"), "--progress", "false"])
    (found,) = sorted(Path(out).rglob("*.json"))
    payload = json.loads(found.read_text())
    rows = {(r["length"], r["mode"], r["extension"]) for r in payload["rows"]}
    assert rows == {(n, m, e) for n in (64, 160) for m in ("single", "multi") for e in ("none", "ntk")}
    assert payload["settings"]["pooling"] == "last"
    assert all(0 <= r["main"] <= 1 for r in payload["rows"])
