"""torchrun's environment (WORLD_SIZE/RANK/LOCAL_RANK): data-parallel training, or a no-op for one process."""

from __future__ import annotations

import os

import torch
from torch.nn.parallel import DistributedDataParallel

from finetune.training.model import pick_device


class Dist:
    def __init__(self, device_pref: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = pick_device(device_pref)
        if self.world > 1 and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def from_main(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (a decision only rank 0 can take, e.g. early stopping)."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        torch.distributed.broadcast(t, src=0)
        return bool(t.item())

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(value)
        return value

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world == 1:
            return model

        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
