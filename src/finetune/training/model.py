"""Building, loading and running the classifier: device, model + optimizer, inference."""

from __future__ import annotations

import dataclasses
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
from finetune.training.decoder import add_adapters, base_config, check_options, enable_checkpointing, load_weights


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


def build_model(base: Path, labels: list[str], cfg: TrainConfig, device: torch.device, pad_id: int | None = None,
                task: ModuleType | None = None):
    """The base model with the task's fresh head (and LoRA adapters when enabled), on ``device``. Decoder bases
    (training/decoder.py) get the tokenizer's pad id, their options checked, per-architecture LoRA targets."""
    task = task or task_for("single_label")
    mcfg = base_config(base, labels, pad_id, task)
    check_options(cfg, mcfg, device)
    model = load_weights(base, mcfg, cfg, device, task)
    if cfg.decoder.gradient_checkpointing:
        enable_checkpointing(model)
    if cfg.lora.enabled:
        model = add_adapters(model, cfg, task)  # the task's type (SEQ_CLS, TOKEN_CLS): the head trains in full
    if not getattr(model, "is_loaded_in_4bit", False):  # 4-bit weights are placed on the GPU as they load
        model = model.to(device)
    return model, mcfg


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


def exportable(model, base: Path | None = None, cfg: TrainConfig | None = None, task: ModuleType | None = None):
    """The plain transformers model to save: LoRA merged into full-precision (fp32) base weights, so loading
    needs neither peft nor bitsandbytes. Adapters trained over bf16 or 4-bit weights are first moved onto a fresh
    fp32 copy of the base on the CPU (merging into rounded weights would bake the rounding in)."""
    if not hasattr(model, "merge_and_unload"):
        return model
    low_precision = any(p.dtype != torch.float32 for p in model.parameters()) or getattr(
        model, "is_loaded_in_4bit", False)
    if low_precision and base is not None and cfg is not None:
        model = adapters_on_fp32_base(model, base, cfg, task)
    return model.merge_and_unload()


def adapters_on_fp32_base(model, base: Path, cfg: TrainConfig, task: ModuleType | None = None):
    """The same adapters and head on a fresh fp32 copy of ``base`` on the CPU."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    state = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(model).items()}
    inner = model.get_base_model().config
    labels = [inner.id2label[i] for i in range(inner.num_labels)]
    plain = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, load_in_4bit=False,
                                                                 bf16_weights=False, gradient_checkpointing=False))
    fresh, _ = build_model(base, labels, plain, torch.device("cpu"), getattr(inner, "pad_token_id", None), task)
    set_peft_model_state_dict(fresh, state)
    return fresh


class MismatchError(RuntimeError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
