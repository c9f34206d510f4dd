"""The dry run before training: parameters, trainable parameters, estimated memory and tokens per step, from the
base's config alone (the model is built on the meta device: no weight is read), and a refusal when the estimate
does not fit the device (CUDA: free GPU memory; CPU: available RAM).

The estimate is deliberately simple and stated as such: weights at their load dtype, gradients + AdamW's two
moments in fp32 for trainable parameters only, and activations of one micro-batch at ~34 values per token, layer and
hidden unit (Korthikanti et al., 2022, without the attention matrix: SDPA does not store it), one layer's worth
plus the layer inputs with gradient checkpointing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import transformers

from finetune.common.coercion import ConfigError
from finetune.common.config import TrainConfig
from finetune.tasks import task_for
from finetune.training.decoder import HEADS, base_config, is_decoder, lora_targets

log = logging.getLogger("finetune")

GIB = 2 ** 30


@dataclass(frozen=True)
class Footprint:
    parameters: int
    trainable: int
    weight_bytes: int
    optimizer_bytes: int  # gradients + AdamW moments of the trainable parameters, fp32
    activation_bytes: int
    tokens_per_step: int
    decoder: bool

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.optimizer_bytes + self.activation_bytes

    def line(self, device: torch.device, available: int) -> str:
        return (f"dry run: {self.parameters:,} parameters, {self.trainable:,} trainable; estimated memory "
                f"{self.total_bytes / GIB:.2f} GiB (weights {self.weight_bytes / GIB:.2f}, gradients+optimizer "
                f"{self.optimizer_bytes / GIB:.2f}, activations {self.activation_bytes / GIB:.2f}) of "
                f"{available / GIB:.1f} GiB available on {device.type}; {self.tokens_per_step:,} tokens per step")


def micro_batch_tokens(cfg: TrainConfig, max_length: int) -> int:
    """Upper bound of the tokens one forward pass holds."""
    if cfg.pack_tokens:
        return cfg.pack_tokens
    if cfg.max_tokens:
        return cfg.max_tokens
    return cfg.batch_size * max_length


def _trainable(model, cfg: TrainConfig) -> int:
    if not cfg.lora.enabled:
        return sum(p.numel() for p in model.parameters())
    targets = set(lora_targets(model, cfg.lora.target_modules))
    total = 0
    for name, mod in model.named_modules():
        parts = name.split(".")
        if any(h in parts for h in HEADS):
            total += sum(p.numel() for p in mod.parameters(recurse=False))
        elif parts[-1] in targets and hasattr(mod, "weight") and mod.weight.ndim == 2:
            total += cfg.lora.r * sum(mod.weight.shape)  # A (r x in) + B (out x r)
    return total


def footprint(base: str | Path, labels: list[str], cfg: TrainConfig, max_length: int, device: torch.device,
              pad_id: int | None = None, task: ModuleType | None = None) -> Footprint:
    task = task or task_for("single_label")
    mcfg = base_config(base, labels, pad_id, task)
    with torch.device("meta"):
        model = getattr(transformers, task.AUTO_MODEL).from_config(mcfg)
    params = sum(p.numel() for p in model.parameters())
    trainable = _trainable(model, cfg)
    on_gpu_lora = device.type == "cuda" and cfg.lora.enabled
    weight_bytes = params // 2 if on_gpu_lora and cfg.decoder.load_in_4bit else \
        params * (2 if on_gpu_lora and cfg.decoder.bf16_weights else 4)
    hidden = getattr(mcfg, "hidden_size", None) or getattr(mcfg, "n_embd", 768)
    layers = getattr(mcfg, "num_hidden_layers", None) or getattr(mcfg, "n_layer", 12)
    tokens = micro_batch_tokens(cfg, max_length)
    act_bytes = 2 if device.type == "cuda" else 4  # bf16 autocast on CUDA
    per_layer = 34 * tokens * hidden * act_bytes
    acts = (tokens * hidden * act_bytes * layers + per_layer) if cfg.decoder.gradient_checkpointing \
        else per_layer * layers
    return Footprint(params, trainable, weight_bytes, trainable * 16, acts, tokens * cfg.grad_accum_steps,
                     is_decoder(mcfg))


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # MemAvailable: what the kernel can hand out without swapping (free + reclaimable caches)
        with open("/proc/meminfo", encoding="ascii") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(fp: Footprint, cfg: TrainConfig, device: torch.device, available: int | None = None,
               quiet: bool = False) -> str:
    """The dry-run line (logged unless ``quiet``), or a refusal naming the settings that lower the estimate."""
    available = available_bytes(device) if available is None else available
    line = fp.line(device, available)
    if not quiet:
        log.info("%s", line)
    if cfg.decoder.check_memory and fp.total_bytes > available:
        knobs = ["train.batch_size / train.max_tokens / train.pack_tokens (activations)"]
        if not cfg.lora.enabled:
            knobs.append("train.lora.enabled: true (gradients+optimizer)")
        if not cfg.decoder.gradient_checkpointing:
            knobs.append("train.decoder.gradient_checkpointing: true")
        if device.type == "cuda" and not cfg.decoder.load_in_4bit:
            knobs.append("train.decoder.load_in_4bit: true (weights)")
        raise ConfigError(f"train: the run does not fit: estimated {fp.total_bytes / GIB:.2f} GiB > "
                          f"{available / GIB:.2f} GiB available on {device.type}; lower it with "
                          f"{'; '.join(knobs)} (or train.decoder.check_memory: false to try anyway)")
    return line
