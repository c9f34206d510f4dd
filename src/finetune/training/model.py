"""Building, loading and running the classifier: device, model + optimizer, inference."""

from __future__ import annotations

import random
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoModelForSequenceClassification

from finetune.common.config import TrainConfig
from finetune.common.tokens import TokenizedSplit
from finetune.tasks import task_for
from finetune.training.batches import collate, sorted_batches


def pick_device(pref: str) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible")
        return torch.device("cuda")
    return torch.device("cpu")


@torch.no_grad()
def predict_logits(model, split: TokenizedSplit, batch_size: int, pad_id: int, device: torch.device) -> np.ndarray:
    """Logits per row: (rows, labels); for a token head (rows, longest sequence, labels), positions past a row's
    end left 0 (their labels are -100)."""
    model.eval()
    out = None
    autocast = device.type == "cuda"
    for idx in sorted_batches(split, batch_size):
        b = collate(split, idx, pad_id)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
        logits = logits.float().cpu().numpy()
        if out is None:
            per_row = (int(split.lengths.max()),) if logits.ndim == 3 else ()
            out = np.zeros((len(split), *per_row, model.config.num_labels), dtype=np.float32)
        out[(idx, slice(0, logits.shape[1])) if logits.ndim == 3 else idx] = logits
    return out if out is not None else np.zeros((0, model.config.num_labels), dtype=np.float32)


def load_classifier(model_dir: str | Path, device: torch.device | None = None):
    """Load a saved classifier from safetensors only (never a pickled checkpoint). A folder without safetensors
    weights, or one transformers cannot read, is refused in one line (MismatchError), not a traceback."""
    folder = Path(model_dir)
    if folder.is_dir() and not list(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        found = f"found {', '.join(pickled)} (pickle: never loaded, it can run code)" if pickled else "found none"
        raise MismatchError(f"model folder {folder}: no safetensors weights ({found}); save the model with "
                            f"save_pretrained(..., safe_serialization=True)")
    try:
        # the head the folder was saved with (sequence or token classification), never silently another
        arch = (AutoConfig.from_pretrained(str(folder), local_files_only=True).architectures or [""])[0]
        auto = (transformers.AutoModelForTokenClassification if arch.endswith("ForTokenClassification")
                else AutoModelForSequenceClassification)
        model = auto.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise MismatchError(f"model folder {folder}: cannot be loaded as a classifier: {str(exc).splitlines()[0]}"
                            ) from None
    return model.to(device or torch.device("cpu"))


def build_model(base: Path, labels: list[str], cfg: TrainConfig, device: torch.device,
                task: ModuleType | None = None):
    """The base encoder with the task's fresh head (and LoRA adapters when enabled), on ``device``."""
    task = task or task_for("single_label")
    mcfg = AutoConfig.from_pretrained(str(base), num_labels=len(labels), id2label=dict(enumerate(labels)),
                                      label2id={lab: i for i, lab in enumerate(labels)}, local_files_only=True,
                                      problem_type=task.PROBLEM_TYPE)
    model = getattr(transformers, task.AUTO_MODEL).from_pretrained(
        str(base), config=mcfg, local_files_only=True, use_safetensors=True,
        attn_implementation=cfg.attn_implementation)
    if cfg.lora.enabled:
        from peft import LoraConfig as PeftLora
        from peft import get_peft_model

        # the task's type (SEQ_CLS, TOKEN_CLS) keeps the new head fully trainable next to the adapters
        model = get_peft_model(model, PeftLora(task_type=task.LORA_TASK_TYPE, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
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


class MismatchError(RuntimeError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
