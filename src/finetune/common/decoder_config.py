"""Settings for decoder LLM bases (params.yaml ``train.decoder:``), a section of the one config
(config.TrainConfig.decoder). They matter for decoders; encoders ignore them except gradient checkpointing and
the memory check, which apply to any base."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field


@dataclass
class DecoderConfig:
    SECTION: typing.ClassVar[str] = "train.decoder"
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward "
                                                                          "pass: less memory, ~30% more time"})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: 4-bit base weights (bitsandbytes, CUDA "
                                                                "only) under LoRA adapters"})
    bf16_weights: bool = field(default=True, metadata={"help": "with LoRA on CUDA: frozen base weights in bf16, "
                                                               "adapters, head and optimizer state in fp32"})
    check_memory: bool = field(default=True, metadata={"help": "refuse a run whose estimated memory exceeds the "
                                                               "device's (CPU: available RAM)"})
