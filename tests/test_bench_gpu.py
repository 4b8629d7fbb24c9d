"""``make bench-gpu`` in its CPU smoke mode: the same code paths as on a GPU (subprocess per case, the
offline corpus through the shipped tokenizer, padded and packed training steps, a long passage), tiny
shapes; the report is written and every case ran. On CUDA the gpu-marked tests check the kernels."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_bench_gpu_smoke_run(tmp_path):
    out = tmp_path / "bench-gpu.md"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=REPO, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    report = out.read_text()
    assert "failed" not in report and "Not run" not in report
    rows = [line for line in report.splitlines() if line.startswith("| tiny |")]
    assert len(rows) >= 3  # padded and packed training steps, one long passage
    padded, packed = (r for r in rows if "| padded |" in r or "| packed |" in r)
    assert padded.split("|")[-2] == packed.split("|")[-2]  # same texts, same losses: packing changes the layout only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_gpu_full_run(tmp_path):
    out = tmp_path / "bench-gpu.md"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=REPO, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| large |" in out.read_text()
