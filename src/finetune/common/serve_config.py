"""`finetune serve`'s settings (params.yaml ``serve:``), a section of the one config (config.Config.serve)."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from finetune.common.coercion import rule

SERVE_LOG_TEXT = ("keep", "sha256", "drop")


@dataclass
class ServeConfig:
    """`finetune serve`: batching, request bounds and the sampled request log (no dvc stage reads these)."""
    SECTION: typing.ClassVar[str] = "serve"
    max_batch_size: int = field(default=64, metadata={"help": "texts per model call when requests are batched"})
    batch_window_ms: float = field(default=5.0, metadata={"help": "how long the first request of a batch waits "
                                                                  "for others; 0 = no batching (one call each)"})
    max_texts_per_request: int = field(default=64, metadata={"help": "more texts in one request: 413"})
    max_chars_per_text: int = field(default=5000, metadata={"help": "a longer text in a request: 413"})
    log_sample_rate: float = field(default=0.0, metadata={"help": "share of requests written to the request "
                                                                  "log (0 = no log)"})
    log_folder: str = field(default="out/serve/requests", metadata={"help": "folder (or s3://bucket/prefix) of the "
                                                                            "request log's JSONL files"})
    log_text: str = field(default="sha256", metadata={"help": "the text in the request log: keep, sha256 or drop"})
    log_flush_records: int = field(default=100, metadata={"help": "records per request-log file write"})
    graceful_timeout_s: float = field(default=30.0, metadata={"help": "on SIGTERM, how long in-flight requests "
                                                                      "may take to finish"})
    model_workers: int = field(default=1, metadata={"help": "model calls at once (threads), each on a batch of "
                                                            "its own"})
    torch_threads: int = field(default=0, metadata={"help": "PyTorch intra-op threads per model call; 0 = "
                                                            "PyTorch's default (one per core)"})
    max_accuracy_drop: float = field(default=0.01, metadata={"help": "the served variant may lose at most this "
                                                                      "test accuracy vs the fp32 teacher (compress)"})
    max_latency_ms: float = field(default=0.0, metadata={"help": "and must answer one text within this p50 "
                                                                 "(ms); 0 = no latency target"})

    def __post_init__(self) -> None:
        rule(self, "max_batch_size", self.max_batch_size >= 1, ">= 1")
        rule(self, "batch_window_ms", 0 <= self.batch_window_ms <= 1000, "in [0, 1000]")
        rule(self, "max_texts_per_request", self.max_texts_per_request >= 1, ">= 1")
        rule(self, "max_chars_per_text", self.max_chars_per_text >= 1, ">= 1")
        rule(self, "log_sample_rate", 0 <= self.log_sample_rate <= 1, "in [0, 1]")
        rule(self, "log_folder", bool(self.log_folder) and ("://" not in self.log_folder or (
            self.log_folder.startswith("s3://") and len(self.log_folder) > 5)), "a local folder or s3://bucket/prefix")
        rule(self, "log_text", self.log_text in SERVE_LOG_TEXT, " or ".join(SERVE_LOG_TEXT))
        rule(self, "log_flush_records", self.log_flush_records >= 1, ">= 1")
        rule(self, "graceful_timeout_s", self.graceful_timeout_s > 0, "> 0")
        rule(self, "model_workers", self.model_workers >= 1, ">= 1")
        rule(self, "torch_threads", self.torch_threads >= 0, ">= 0")
        rule(self, "max_accuracy_drop", 0 <= self.max_accuracy_drop <= 1, "in [0, 1]")
        rule(self, "max_latency_ms", self.max_latency_ms >= 0, ">= 0 (0 = no target)")
