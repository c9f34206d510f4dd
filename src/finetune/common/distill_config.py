"""`finetune distill`'s settings (params.yaml ``distill:``), a section of the one config (config.Config.distill)."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from finetune.common.coercion import rule


@dataclass
class DistillConfig:
    """The student: which teacher layers it keeps, and how it learns from the teacher's soft targets."""
    SECTION: typing.ClassVar[str] = "distill"
    enabled: bool = field(default=False, metadata={"help": "train a student (off: the stage writes only why, and "
                                                           "compress measures the teacher's variants)"})
    layers: list[int] = field(default_factory=list, metadata={"help": "teacher encoder layers the student keeps "
                                                                      "(0-based); [] = two of every three, the first kept"})
    temperature: float = field(default=2.0, metadata={"help": "softmax temperature of the soft targets"})
    alpha: float = field(default=0.5, metadata={"help": "weight of the soft-target KL; 1 - alpha: hard-label CE"})
    epochs: float = field(default=2.0, metadata={"help": "student training epochs"})
    hidden_weight: float = field(default=1.0, metadata={"help": "weight of the hidden-state transfer (MSE between "
                                                                "each student block and the teacher block it came "
                                                                "from); > 0 runs the teacher live every step"})
    mask_rate: float = field(default=0.15, metadata={"help": "augmentation: share of each train row's tokens the "
                                                           "student sees masked (afresh each step), the live teacher "
                                                           "labelling the same text; 0 = off"})
    learning_rate: float = field(default=1.0e-4, metadata={"help": "student AdamW learning rate"})
    patience: int = field(default=2, metadata={"help": "early stop after N evaluations without val improvement"})
    eval_every: int = field(default=100, metadata={"help": "validation every N steps (0 = each epoch end)"})

    def __post_init__(self) -> None:
        rule(self, "layers", all(isinstance(i, int) and i >= 0 for i in self.layers) and
             len(set(self.layers)) == len(self.layers), "distinct layer indices >= 0")
        rule(self, "temperature", self.temperature > 0, "> 0")
        rule(self, "alpha", 0 <= self.alpha <= 1, "in [0, 1]")
        rule(self, "hidden_weight", self.hidden_weight >= 0, ">= 0")
        rule(self, "mask_rate", 0 <= self.mask_rate < 1, "in [0, 1)")
        rule(self, "epochs", self.epochs > 0, "> 0")
        rule(self, "learning_rate", self.learning_rate > 0, "> 0")
        rule(self, "patience", self.patience >= 0, ">= 0")
        rule(self, "eval_every", self.eval_every >= 0, ">= 0")
