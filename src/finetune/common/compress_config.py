"""compress: the ONNX export, int8 quantization and the measurement of every variant (params.yaml compress:)."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from finetune.common.coercion import rule


@dataclass
class CompressConfig:
    SECTION: typing.ClassVar[str] = "compress"
    max_accuracy_drop: float = field(default=0.01, metadata={"help": "int8 accuracy may fall at most this much "
                                                                      "below fp32 PyTorch on the test split"})
    per_channel: bool = field(default=True, metadata={"help": "int8 weights quantized per output channel (else "
                                                                     "one scale per tensor)"})
    opset: int = field(default=17, metadata={"help": "ONNX opset of the export"})
    batch_size: int = field(default=32, metadata={"help": "texts per call when measuring throughput"})
    latency_requests: int = field(default=200, metadata={"help": "single-text requests timed for p50/p95"})
    threads: int = field(default=0, metadata={"help": "CPU threads for PyTorch and ONNX Runtime; 0 = all cores"})

    def __post_init__(self) -> None:
        rule(self, "max_accuracy_drop", 0 <= self.max_accuracy_drop <= 1, "in [0, 1]")
        rule(self, "opset", 11 <= self.opset <= 21, "in [11, 21]")
        rule(self, "batch_size", self.batch_size >= 1, ">= 1")
        rule(self, "latency_requests", self.latency_requests >= 1, ">= 1")
        rule(self, "threads", self.threads >= 0, ">= 0 (0 = all cores)")
