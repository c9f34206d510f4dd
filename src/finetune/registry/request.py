"""What a registration asks for and what it returns; the registry's errors and names."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

from finetune.common import row_parallel
from finetune.common.config import RegisterConfig
from finetune.common.outputs import MARKER
from finetune.registry import integrity
from finetune.registry.gate import ModelKind, kind_from_config
from finetune.tasks import TASKS, task_for

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


ONNX_PYFUNC_CODE = Path(__file__).with_name("onnx_pyfunc_model.py")


def pyfunc_code_paths() -> list[str]:
    """What the pyfunc models may import besides their own file (MLflow code_paths): every task's PYFUNC_CODE and
    the ONNX session (row_parallel.py). All of them, whatever the model: the pyfunc picks what its model needs
    (config.json's architecture), so a version never lacks a file because its task was recorded wrongly; they are
    a few kB."""
    tasks = {path for name, module in TASKS.items() if module for path in task_for(name).PYFUNC_CODE}
    return sorted(tasks | {row_parallel.__file__})


INT8_SUFFIX = "-int8"  # the int8 variant is a registered model of its own: <register.model_name>-int8
STUDENT_SUFFIX = "-student"  # the serving choice when it is a student (or pruned) ONNX file: <name>-student
ONNX_SUFFIX = "-onnx"  # the serving choice when it is the teacher's fp32 ONNX file
VARIANT_SUFFIXES = (INT8_SUFFIX, STUDENT_SUFFIX, ONNX_SUFFIX)  # each a registered model whose aliases follow <name>'s
SERVING_TAG = "serving_model"  # on the fp32 version: <model>/<version> of what serves it (itself when fp32 serves)
SERVING_SUFFIX = "-serving"  # no registered model: models:/<name>-serving@champion resolves to what serves <name>@champion


CHAMPION, CHALLENGER = "champion", "challenger"


# files of a model folder that record how it was made, not what it computes: the resolved config (register
# settings included) and the stage's ownership marker
NOT_THE_MODEL = ("finetune_config.json", MARKER)


class RegistryError(RuntimeError):
    pass


class RegistryUnavailable(RegistryError):
    """The tracking server or its artifact store failed: worth retrying."""


class LineageRefused(RegistryError):
    """The champion has another label set or task (gate.LineageMismatch): nothing may be registered."""


@dataclass(frozen=True)
class RegistrationRequest:
    """Everything one registration needs, built once by stages.run_register.

    ``artifacts`` maps artifact sub-folder -> local file or folder; ``test`` is (texts, labels) of this run's
    test split, used to re-score a champion evaluated on other data; ``model_card(version, run_id)`` returns
    the Markdown logged as ``model_card.md`` and set as the version's description."""
    model_dir: Path
    metrics: dict[str, Any]
    cfg: RegisterConfig
    tracking_uri: str
    kind: ModelKind
    artifact_location: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    loss_history: list[dict[str, float]] = field(default_factory=list)
    training: dict[str, Any] | None = None  # train's summary.json: its selection facts go on the run
    artifacts: dict[str, str | Path] = field(default_factory=dict)
    test_hash: str | None = None
    test: tuple[list[str], list[str]] | None = None
    max_length: int = 512
    model_card: Callable[[str, str], str] | None = None
    reference_profile: Path | None = None  # monitoring's profile of the test split: logged inside the model

    @classmethod
    def for_model(cls, model_dir: str | Path, metrics: dict[str, Any], cfg: RegisterConfig, tracking_uri: str,
                  **fields: Any) -> "RegistrationRequest":
        """A request for the classifier saved in ``model_dir``, its label set read from its config.json."""
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        return cls(Path(model_dir), metrics, cfg, tracking_uri, kind_from_config(config), **fields)

    @property
    def value(self) -> float:
        return float(self.metrics[self.cfg.metric])

    def run_key(self) -> str:
        """Idempotency key: hash of only what defines the model and the data it was measured on: the model's
        files (weights, config with its labels, tokenizer), the test data, the metrics measured on it and the
        length the served model truncates at. Not the register settings (retries, gate, experiment) nor the
        pipeline run: changing those and rerunning must not register the same model again."""
        files = {k: v for k, v in integrity.folder_digests(self.model_dir).items() if k not in NOT_THE_MODEL}
        values = {k: self.metrics.get(k) for k in ("accuracy", "macro_f1", "loss")}
        return hashlib.sha256(json.dumps([files, self.test_hash, values, self.max_length],
                                         sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class Registration:
    model_name: str
    version: str
    alias: str
    promoted: bool
    reason: str
    metric: str
    value: float
    champion_before: dict[str, Any] | None
    run_id: str
    tracking_uri: str  # redacted
    model_uri: str = ""
    lineage: dict[str, Any] = field(default_factory=dict)
    int8_aliases: dict[str, Any] = field(default_factory=dict)  # what the leased step did to <name>-int8's aliases


def experiment_id(client, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name`` (register.experiment), created on first use."""
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(name, artifact_location)


def training_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The training facts a run compares by: which step was exported and why, how much of the model trained."""
    keys = ("best_step", "best_value", "exported_step", "steps", "trainable_parameters", "parameters")
    return {f"train_{k}": float(summary[k]) for k in keys if isinstance(summary.get(k), (int, float))}


def pip_requirements() -> list[str]:
    # Explicit, so MLflow does not infer requirements by importing around (which fails offline).

    return [f"mlflow=={version('mlflow')}", f"torch=={version('torch').split('+')[0]}",
            f"transformers=={version('transformers')}", f"safetensors=={version('safetensors')}"]
