"""What training on several processes needs beyond Lightning's strategies: the global batch.

The similarity-matrix loss compares every pair of texts (and of chunks) in a batch, so with DDP
each rank must see the embeddings of the whole global batch, not only its own. ``gather_rows``
concatenates every rank's rows (their counts may differ) with gradients: the backward pass sums
each rank's gradient for the gathered copy and hands every rank the slice of its own rows. Every
rank then computes the same global loss; DDP averages the parameter gradients over ranks, which
gives exactly the single-process gradient of that loss (the ``world_size`` factor from the sum
cancels the average). Only ``all_gather`` and ``all_reduce`` are used, so gloo (CPU) works too.

FSDP needs nothing more from the loss: its gradient reduce-scatter averages over ranks as DDP's
all-reduce does, and ``gather_rows`` runs inside the sharded forward and backward like any other op.
FSDP2 is Lightning's ``ModelParallelStrategy`` with ``DistillModule.configure_model`` sharding the
student (``experiments/dewey_fsdp.yaml``); FSDP1 is ``FSDPStrategy`` below, Lightning's with a CPU
path. Both run on CPU with gloo (``tests/test_distributed.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy as _LightningFSDP
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


def all_ranks(flag: bool, device: torch.device | str = "cpu") -> bool:
    """``flag`` and-ed over ranks: every rank takes the same branch (``flag`` itself alone)."""
    if world()[1] == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


class FSDPStrategy(_LightningFSDP):
    """Lightning's ``FSDPStrategy`` (``FullyShardedDataParallel``), also on CPU with gloo.

    On a GPU this is Lightning's strategy unchanged. Lightning 2.6 refuses FSDP without a GPU in two
    places: the Trainer rejects the exact class ``FSDPStrategy`` (or ``strategy: fsdp``) with
    ``accelerator: cpu``, and the strategy passes ``device_id=root_device.index``, None on CPU, with
    which torch's FSDP looks for an accelerator ("FSDP needs a non-CPU accelerator device"). torch's
    FSDP itself runs on CPU when given ``device_id=torch.device("cpu")``, which is what this does.
    And on CPU, full state dicts (checkpoints) are gathered without ``offload_to_cpu``: Lightning
    always asks for it, and torch's ``FlatParamHandle.to_cpu`` then "moves" the gathered parameter
    to the device it is already on (the same storage) and frees it, so the state dict reads freed
    memory (a segfault in ``_full_post_state_dict_hook``).
    """

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        from lightning.pytorch.strategies.fsdp import (
            _move_torchmetrics_to_device,
            _setup_activation_checkpointing,
        )
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            model = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                             mixed_precision=self.mixed_precision_config,
                                             sharding_strategy=self.sharding_strategy,
                                             device_id=torch.device("cpu"), **self.kwargs)
        _move_torchmetrics_to_device(model, self.root_device)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    @contextmanager
    def _full_state_dicts_in_place(self) -> Iterator[None]:
        """Lightning's full-state-dict context, without ``offload_to_cpu`` when the compute device is the CPU."""
        if self.root_device.type != "cpu":
            yield
            return
        import lightning.fabric.strategies.model_parallel as fabric_mp
        import lightning.pytorch.strategies.fsdp as pl_fsdp
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        def context(module, world_size: int, rank0_only: bool = True):
            return FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT,
                                        FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
                                        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))

        saved = pl_fsdp._get_full_state_dict_context, fabric_mp._get_full_state_dict_context
        pl_fsdp._get_full_state_dict_context = fabric_mp._get_full_state_dict_context = context
        try:
            yield
        finally:
            pl_fsdp._get_full_state_dict_context, fabric_mp._get_full_state_dict_context = saved

    def lightning_module_state_dict(self) -> dict[str, Any]:
        with self._full_state_dicts_in_place():
            return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        with self._full_state_dicts_in_place():
            return super().optimizer_state(optimizer)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        with self._full_state_dicts_in_place():
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)


def balance(lengths: list[int], world_size: int) -> list[list[int]]:
    """Indices of one global batch split over ranks by token count: longest first, each to the rank
    with the fewest tokens so far (LPT; within 4/3 of the best split). Every rank gets >= 1 text."""
    if len(lengths) < world_size:
        raise ValueError(f"a batch of {len(lengths)} texts cannot feed {world_size} ranks; raise "
                         "data.batching.batch_size (it counts texts per step over all ranks)")
    parts: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = min(range(world_size), key=lambda r: (len(parts[r]) > 0, load[r]))  # empty ranks first
        parts[r].append(i)
        load[r] += lengths[i]
    return [sorted(p) for p in parts]
