"""Distributed training under ``torchrun`` (WORLD_SIZE > 1): process group, reductions, the DDP wrapper.

Every global batch is split over the ranks; each image's loss is weighted by 1 / global batch (the reported loss
is the sum over ranks) and the backward pass is scaled by the number of ranks, because DDP averages gradients:
1 and N processes compute the same gradient (:class:`peft_export.train.step.TrainStep`). Rank 0 validates and
writes files. One process is the same object with ``world == 1``, whose operations do nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in DistributedDataParallel when distributed (gradients averaged over the ranks)."""
        if not self.active:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=None, broadcast_buffers=False)

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owns_group = False


def init_distributed(device_kind: str) -> Dist:
    """The process group of a ``torchrun`` launch (nccl on CUDA, gloo on CPU); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
        owns = True
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)
