"""``make bench``'s logic, never its timings: the MFU arithmetic against a hand count, the peak section's
table on a tiny matmul, and ``--merge`` keeping the sections a run did not redo."""

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
suite = pytest.importorskip("suite")

SMALL = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4}


def test_flops_and_mfu_match_a_hand_count():
    # per layer: Wqkv 256x768 + Wo 256x256 + Wi 256x1024 + Wo(mlp) 512x256 weights, attn and mlp norms (256
    # each, no bias); 4 layers, less layer 0's attention norm (ModernBERT's is an identity there, after the
    # embeddings' norm), plus the final norm (256); embeddings not counted
    layer = 256 * 768 + 256 * 256 + 256 * 1024 + 512 * 256 + 2 * 256
    params = 4 * layer - 256 + 256
    cfg, counted = suite.model_config(SMALL)
    assert counted == params
    assert cfg.layer_types == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    # two texts of 1,000 and 3,000 tokens: global context E[n^2]/E[n] = 2,500, local min(n, 128) = 128
    attention = 12 * 256 * (2 * 2500 + 2 * 128)
    train = 6 * params + attention
    assert suite.flops_per_token(SMALL, [1000, 3000]) == pytest.approx(train)
    assert suite.flops_per_token(SMALL, [1000, 3000], train=False) == pytest.approx(train / 3)
    # 10,000 tokens/s against a 1,000 GFLOP/s peak
    assert suite.mfu(1e4, SMALL, [1000, 3000], 1000.0) == pytest.approx(1e4 * train / 1e12)


def test_student_gemms_are_modernberts_widths():
    assert suite.student_gemms(SMALL) == {"qkv": (8192, 256, 768), "attn out": (8192, 256, 256),
                                          "mlp in (GLU)": (8192, 256, 1024), "mlp out": (8192, 512, 256)}


def test_peak_section_format_on_a_tiny_matmul():
    tiny = {"hidden_size": 16, "intermediate_size": 32}
    pk = suite.bench_peak(tiny, repeats=1, square=32, tokens=64, min_s=0.001)
    names = [r["name"] for r in pk["rows"]]
    assert names == ["qkv", "attn out", "mlp in (GLU)", "mlp out", "square 32"]
    student = [r for r in pk["rows"] if r["name"] != "square 32"]
    assert pk["peak_gflops"] == max(r["bf16"] for r in student) > 0
    assert pk["fp32_peak_gflops"] == max(r["fp32"] for r in student) > 0
    assert pk["threads"] == torch.get_num_threads()
    assert set(pk["units"]) <= {"amx_bf16", "avx512_bf16"}
    lines = suite.peak_lines(pk, 1)
    assert lines[0] == "## Peak: matmul GFLOP/s on this CPU"
    table = [x for x in lines if x.startswith("| ") and "GEMM" not in x]
    assert len(table) == 5 and table[0].startswith("| qkv | 64 x 16 x 48 |")
    assert all(x.count("|") == 6 for x in table)
    assert any(x.startswith("**Peak for MFU:") for x in lines)


def test_merge_rewrites_only_the_sections_run(tmp_path):
    out = tmp_path / "bench.md"
    out.write_text("# Benchmarks\n\n`old command`\non vm.\n\n## Peak: matmul GFLOP/s on this CPU\n\nold peak\n\n"
                   "## Training throughput\n\nold train\n")
    report = suite.Report(out, ["--sections", "peak", "--merge"], merge=True)
    report.add(["## Peak: matmul GFLOP/s on this CPU", "", "new peak"])
    text = out.read_text()
    assert "old peak" not in text and "new peak" in text and "old train" in text
    assert text.index("new peak") < text.index("old train")
    assert "## Peak: matmul GFLOP/s on this CPU *(updated)*" in text and "`old command`" in text


def test_a_second_merge_replaces_the_updated_section_and_line(tmp_path):
    """A section marked *(updated)* by one merge is replaced, not repeated, by the next; the head keeps one
    'Sections marked' line (the newest command's)."""
    out = tmp_path / "bench.md"
    out.write_text("# Benchmarks\n\n`old command`\non vm.\n\n## Peak: matmul GFLOP/s on this CPU\n\nold peak\n")
    for text in ("first", "second"):
        report = suite.Report(out, ["--sections", "peak", "--merge", f"--tag={text}"], merge=True)
        report.add(["## Peak: matmul GFLOP/s on this CPU", "", f"{text} peak"])
    text = out.read_text()
    assert text.count("## Peak: matmul GFLOP/s on this CPU") == 1 and "second peak" in text
    assert "first peak" not in text and "old peak" not in text
    assert text.count("Sections marked *(updated)*") == 1 and "--tag=second" in text
