"""What each rank runs in each optimizer step: padded length-grouped batches or packed streams, and the
forward for them. Packed epochs are built once and kept on the device, so the step loop only indexes them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from finetune.common.config import TrainConfig
from finetune.common.tokens import TokenizedSplit
from finetune.training.batches import collate, epoch_batches
from finetune.training.packing import PackShape, build_pack, epoch_packs, to_tensors


@dataclass
class Step:
    rows: int  # real sequences in the whole step (every rank, every micro-batch): the loss divisor
    micro: list[dict[str, torch.Tensor]]  # this rank's micro-batches, on the device


class StepPlan:
    """Steps of one epoch are ``grad_accum_steps`` micro-batches, each split over the ``world`` ranks."""

    def __init__(self, split: TokenizedSplit, cfg: TrainConfig, world: int, rank: int, pad_id: int,
                 pad_multiple: int, shape: PackShape | None, device: torch.device):
        self.split, self.cfg, self.world, self.rank = split, cfg, world, rank
        self.pad_id, self.mult, self.shape, self.device = pad_id, pad_multiple, shape, device
        self._cached: tuple[int, list] | None = None

    def groups(self, epoch: int) -> list[list[list[np.ndarray]]]:
        """step -> micro-batch -> rank -> row indices; deterministic in (seed, epoch), memoised for one epoch."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self._plan(epoch))
        return self._cached[1]

    def _plan(self, epoch: int) -> list[list[list[np.ndarray]]]:
        k, w, cfg = self.cfg.grad_accum_steps, self.world, self.cfg
        if self.shape is None:
            plan = epoch_batches(self.split, cfg.batch_size, cfg.seed, epoch, max_tokens=cfg.max_tokens)
            micro = [[idx[r::w] for r in range(w)] for idx in plan]
        else:  # one pack per rank per micro-batch; empty packs fill the last step so every rank runs it
            packs = epoch_packs(self.split, self.shape, cfg.seed, epoch)
            packs += [np.zeros(0, dtype=np.int64)] * (-len(packs) % (k * w))
            micro = [packs[i:i + w] for i in range(0, len(packs), w)]
        return [micro[i:i + k] for i in range(0, len(micro), k)]

    def steps(self, epoch: int, skip: int = 0) -> Iterator[Step]:
        groups = self.groups(epoch)[skip:]
        if self.shape is not None:  # the whole epoch's packs for this rank go to the device at once
            arrays = [build_pack(self.split, mb[self.rank], self.shape, self.pad_id) for g in groups for mb in g]
            resident = to_tensors({key: np.stack([a[key] for a in arrays]) for key in arrays[0]}, self.device)
        at = 0
        for g in groups:
            rows = sum(len(idx) for mb in g for idx in mb)
            if self.shape is not None:
                micro = [{key: v[at + j] for key, v in resident.items()} for j in range(len(g))]
                at += len(g)
            else:
                micro = [self._padded(mb[self.rank]) for mb in g]
            yield Step(rows, micro)

    def _padded(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        b = collate(self.split, idx, self.pad_id, self.mult)
        b["index"] = torch.from_numpy(np.asarray(idx, dtype=np.int64))  # rows of the split: cached teacher logits
        if self.device.type == "cuda":
            b = {key: v.pin_memory() for key, v in b.items()}
        return {key: v.to(self.device, non_blocking=True) for key, v in b.items()}

    def forward(self, runner, b: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits, one row per entry of ``b['labels']`` (packed: empty slots have label -100)."""
        if self.shape is None:
            return runner(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return runner(b["input_ids"], b["position_ids"], b["cu_seqlens"], b["starts"])
