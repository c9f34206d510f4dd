"""`finetune monitor`'s settings (params.yaml ``monitor:``), a section of the one config (config.Config.monitor)."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from finetune.common.coercion import rule


@dataclass
class MonitorConfig:
    """The reference profile register stores with each version, and the thresholds `finetune monitor` applies."""
    SECTION: typing.ClassVar[str] = "monitor"
    reference_rows: int = field(default=2000, metadata={"help": "test-split rows (and float16 embeddings) kept in "
                                                                "the reference profile"})
    max_batch_rows: int = field(default=20000, metadata={"help": "a larger batch is sampled down to this many rows "
                                                                 "while it is streamed"})
    embedding_rows: int = field(default=1000, metadata={"help": "batch rows whose embeddings enter the MMD test"})
    psi_threshold: float = field(default=0.2, metadata={"help": "a text feature whose PSI exceeds this drifted"})
    alpha: float = field(default=0.01, metadata={"help": "false-alarm rate of each statistical test (MMD "
                                                         "permutation test, chi-square of predicted labels)"})
    permutations: int = field(default=200, metadata={"help": "permutations of the MMD test"})
    min_label_shift: float = field(default=0.1, metadata={"help": "predicted-label drift also needs this total "
                                                                  "variation distance"})
    confidence_drop: float = field(default=0.05, metadata={"help": "a mean-confidence drop beyond this drifted"})
    metric_drop: float = field(default=0.02, metadata={"help": "with labels: drift when the bootstrap upper bound "
                                                               "is this far below the version's test metric"})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples of the batch metric"})
    seed: int = field(default=0, metadata={"help": "seed of sampling, permutations and bootstrap"})
    experiment: str = field(default="finetune-monitor", metadata={"help": "MLflow experiment of monitor runs"})

    def __post_init__(self) -> None:
        for name in ("reference_rows", "max_batch_rows", "embedding_rows", "permutations", "bootstrap"):
            rule(self, name, getattr(self, name) >= 10, ">= 10")
        rule(self, "psi_threshold", self.psi_threshold > 0, "> 0")
        rule(self, "alpha", 0 < self.alpha < 0.5, "in (0, 0.5)")
        for name in ("min_label_shift", "confidence_drop", "metric_drop"):
            rule(self, name, 0 <= getattr(self, name) <= 1, "in [0, 1]")
        # the smallest p-value a permutation test can give is 1 / (permutations + 1): it must be able to go below alpha
        rule(self, "permutations", self.permutations + 1 > 1 / self.alpha, f"> 1/alpha - 1 = {1 / self.alpha - 1:.0f}")
        rule(self, "seed", self.seed >= 0, ">= 0")
        rule(self, "experiment", bool(self.experiment.strip()), "a non-empty name")
