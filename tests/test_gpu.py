"""On CUDA (``pytest -m gpu``): packed rows through torch's varlen kernels give the unpacked embeddings
(bf16 tolerance), and a packed fit follows the padded loss curve for 20 steps. Skipped without a GPU."""

import pytest
import torch

from dewey_lab.data.items import collate
from dewey_lab.model import attention
from dewey_lab.model.module import DistillModule
from dewey_lab.model.student import StudentConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
TOKENIZER = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks" / "tokenizer")
BASE = {"hidden_size": 768, "intermediate_size": 1152, "num_hidden_layers": 22, "num_attention_heads": 12,
        "max_position_embeddings": 8192}  # ModernBERT-base


def _items(n: int, seed: int, dim: int = 64) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for length in torch.randint(40, 1500, (n,), generator=g).tolist():
        ids = [101, *torch.randint(1000, 29000, (length - 2,), generator=g).tolist(), 102]
        spans = [(a, min(a + 256, length - 1)) for a in range(1, length - 1, 256)]
        t = torch.nn.functional.normalize(torch.randn(1 + len(spans), dim, generator=g), dim=-1).numpy()
        items.append({"input_ids": ids, "content_mask": [False] + [True] * (length - 2) + [False], "spans": spans,
                      "t_whole": t[0], "t_chunk": t[1:]})
    return items


def _module(attn: str, seed: int = 0) -> DistillModule:
    torch.manual_seed(seed)
    spec = StudentConfig(tokenizer=TOKENIZER, attn_implementation=attn, config=BASE)
    return DistillModule(student=spec, teacher_dim=64, projection="linear").cuda()


def _cuda(batch: dict) -> dict:
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}


@pytest.mark.skipif(not attention.has_torch_varlen(), reason="this torch has no varlen_attn with window_size")
def test_torch_varlen_packed_equals_unpacked_in_bf16():
    module = _module(attention.TORCH_VARLEN).eval()
    items = _items(12, seed=1)
    unpacked, packed = _cuda(collate(items)), _cuda(collate(items, pack_length=2048))
    assert packed["input_ids"].shape[0] < 12
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a = module(packed)
        module.student.config._attn_implementation = "sdpa"
        b = module(unpacked)  # one text per row, padded, transformers' SDPA path
    for key in a:
        cos = torch.nn.functional.cosine_similarity(a[key].float(), b[key].float(), dim=-1)
        assert cos.min() > 0.995, (key, float(cos.min()))  # bf16: the two paths round differently


@pytest.mark.parametrize("attn", [attention.TORCH_VARLEN, "sdpa"])
def test_packed_fit_follows_the_padded_loss_curve_for_20_steps(attn):
    if attn == attention.TORCH_VARLEN and not attention.has_torch_varlen():
        pytest.skip("this torch has no varlen_attn with window_size")
    batches = [_items(8, seed=s % 2) for s in range(20)]  # two batches in turn: a loss that can fall
    curves = {}
    for layout in ("padded", "packed"):
        module = _module(attn if layout == "packed" else "sdpa", seed=0)
        opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
        curves[layout] = []
        for items in batches:
            batch = _cuda(collate(items, pack_length=2048 if layout == "packed" else None))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = module.compute_losses(batch, module(batch))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            curves[layout].append(float(loss))
    padded, packed = curves["padded"], curves["packed"]
    assert all(map(torch.isfinite, torch.tensor(packed)))
    for a, b in zip(padded, packed, strict=True):
        assert abs(a - b) <= 0.02 * abs(a), (a, b)  # bf16 kernels differ; the curve is the same
    assert packed[-2] < packed[0] and packed[-1] < packed[1]  # it learns
