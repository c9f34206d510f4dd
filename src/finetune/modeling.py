"""Model helpers shared by train and evaluate: batching with dynamic padding, building the model and its
optimizer, loading, inference."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .config import TrainConfig
from .tokenize import TokenizedSplit


def pick_device(pref: str) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible")
        return torch.device("cuda")
    return torch.device("cpu")


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


@torch.no_grad()
def predict_logits(model, split: TokenizedSplit, batch_size: int, pad_id: int, device: torch.device) -> np.ndarray:
    model.eval()
    out = np.zeros((len(split), model.config.num_labels), dtype=np.float32)
    autocast = device.type == "cuda"
    for idx in sorted_batches(split, batch_size):
        b = collate(split, idx, pad_id)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
        out[idx] = logits.float().cpu().numpy()
    return out


def load_classifier(model_dir: str | Path, device: torch.device | None = None):
    """Load a saved classifier from safetensors only (never a pickled checkpoint)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), local_files_only=True,
                                                               use_safetensors=True)
    return model.to(device or torch.device("cpu"))


def build_model(base: Path, labels: list[str], cfg: TrainConfig, device: torch.device):
    """The base encoder with a fresh classification head (and LoRA adapters when enabled), on ``device``."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    mcfg = AutoConfig.from_pretrained(str(base), num_labels=len(labels), id2label=dict(enumerate(labels)),
                                      label2id={lab: i for i, lab in enumerate(labels)}, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base), config=mcfg, local_files_only=True, use_safetensors=True,
        attn_implementation=cfg.attn_implementation)
    if cfg.lora.enabled:
        from peft import LoraConfig as PeftLora
        from peft import get_peft_model

        # SEQ_CLS keeps the new classification head fully trainable next to the adapters.
        model = get_peft_model(model, PeftLora(task_type="SEQ_CLS", r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                               lora_dropout=cfg.lora.dropout,
                                               target_modules=list(cfg.lora.target_modules)))
    return model.to(device), mcfg


def build_optimizer(model, cfg: TrainConfig, total: int, device: torch.device):
    """AdamW (no decay on biases and LayerNorm) and linear warm-up then linear decay to 0 at ``total``."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in n else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate,
                            fused=device.type == "cuda")
    warmup = int(cfg.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    return opt, sched


def exportable(model):
    """The plain transformers model to save: LoRA merged into the base weights, so loading needs no peft."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
