"""Length-grouped batches with dynamic padding (the padded path; packing.py is the other)."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from finetune.common.tokens import TokenizedSplit


def collate(split: TokenizedSplit, idx: np.ndarray, pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Pad only to the longest sequence in this batch, rounded up to ``multiple`` (bounds the number of shapes)."""
    lens = split.lengths[idx]
    width = -(-int(lens.max()) // multiple) * multiple
    ids = np.full((len(idx), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(idx), width), dtype=np.int64)
    for row, i in enumerate(idx):
        seq = split.sequence(int(i))
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(split.labels[idx])}


def epoch_batches(split: TokenizedSplit, batch_size: int, seed: int, epoch: int, pool: int = 64,
                  max_tokens: int = 0) -> list[np.ndarray]:
    """One epoch's batches: shuffled, then sorted by length inside pools of ``pool`` batches so a batch holds
    similar lengths (little padding), then the batch order shuffled. Deterministic in (seed, epoch).

    ``max_tokens`` > 0: batches are cut by a padded-token budget instead (short texts -> more rows per batch)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(split))
    lens = split.lengths
    batches = []
    step = batch_size * pool
    for start in range(0, len(order), step):
        chunk = order[start:start + step]
        chunk = chunk[np.argsort(lens[chunk], kind="stable")]
        if not max_tokens:
            batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
            continue
        begin = 0
        for end in range(1, len(chunk) + 1):  # sorted ascending: the last row sets the padded width
            if end - begin > 1 and (end - begin) * lens[chunk[end - 1]] > max_tokens:
                batches.append(chunk[begin:end - 1])
                begin = end - 1
        batches.append(chunk[begin:])
    return [batches[i] for i in rng.permutation(len(batches))]


def sorted_batches(split: TokenizedSplit, batch_size: int) -> Iterator[np.ndarray]:
    """Inference order: by length, for minimal padding; callers scatter results back by index."""
    order = np.argsort(split.lengths, kind="stable")
    for i in range(0, len(order), batch_size):
        yield order[i:i + batch_size]
