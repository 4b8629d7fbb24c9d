"""What training on several processes needs beyond Lightning's strategies: the global batch.

The similarity-matrix loss compares every pair of texts (and of chunks) in a batch, so with DDP
each rank must see the embeddings of the whole global batch, not only its own. ``gather_rows``
concatenates every rank's rows (their counts may differ) with gradients: the backward pass sums
each rank's gradient for the gathered copy and hands every rank the slice of its own rows. Every
rank then computes the same global loss; DDP averages the parameter gradients over ranks, which
gives exactly the single-process gradient of that loss (the ``world_size`` factor from the sum
cancels the average). Only ``all_gather`` and ``all_reduce`` are used, so gloo (CPU) works too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, rank: int, world_size: int) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's gradient for every gathered row, summed
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None, None


def gather_rows(x: Tensor) -> Tensor:
    """Every rank's ``x`` (n_r, ...) concatenated in rank order, differentiable; ``x`` itself alone."""
    rank, size = world()
    if size == 1:
        return x
    counts = torch.tensor([x.shape[0]], device=x.device)
    all_counts = [torch.zeros_like(counts) for _ in range(size)]
    dist.all_gather(all_counts, counts)
    rows = [int(c) for c in all_counts]
    padded = torch.cat([x, x.new_zeros(max(rows) - x.shape[0], *x.shape[1:])])
    gathered = _GatherRows.apply(padded, rank, size)
    m = max(rows)
    return torch.cat([gathered[r * m:r * m + n] for r, n in enumerate(rows)])


def balance(lengths: list[int], world_size: int) -> list[list[int]]:
    """Indices of one global batch split over ranks by token count: longest first, each to the rank
    with the fewest tokens so far (LPT; within 4/3 of the best split). Every rank gets >= 1 text."""
    if len(lengths) < world_size:
        raise ValueError(f"a batch of {len(lengths)} texts cannot feed {world_size} ranks; raise data.batch_size "
                         "(it counts texts per step over all ranks)")
    parts: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = min(range(world_size), key=lambda r: (len(parts[r]) > 0, load[r]))  # empty ranks first
        parts[r].append(i)
        load[r] += lengths[i]
    return [sorted(p) for p in parts]
