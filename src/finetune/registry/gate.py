"""gate: may a new model version become ``champion``? Pure: numbers and label sets in, a decision out.

Two questions, in this order: is the champion a model of the same task with the same labels (else there is
nothing to compare), and does the new model clear the floors and beat the champion by the margin. Scores of a
re-scored champion come from evaluate's metric function, so the gate and the evaluate stage cannot disagree
on what "accuracy" or "macro-F1" means.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from finetune.common.config import RegisterConfig
from finetune.tasks import task_for

# A model's task as recorded with its version: the head the train stage built, from its config's problem_type
# (models saved before problem_type was set are single-label), and the finetune task that scores it.
TASK = "text-classification/single-label"
KINDS = {"single_label_classification": TASK, "multi_label_classification": "text-classification/multi-label"}
# a token head keeps problem_type single_label_classification (softmax per token): its architecture tells it apart
NER = "token-classification/ner"
TASK_OF_KIND = {TASK: "single_label", "text-classification/multi-label": "multi_label", NER: "token"}


class LineageMismatch(ValueError):
    """The champion under this model name classifies other labels or another task: comparing is meaningless."""


@dataclass(frozen=True)
class ModelKind:
    """What a version predicts: its task and its labels in the order of the model's outputs."""
    task: str
    labels: tuple[str, ...]


@dataclass
class Decision:
    promote: bool
    reason: str


def gate(value: float, champion_value: float | None, cfg: RegisterConfig, macro_f1: float | None = None) -> Decision:
    """Promote when the metric clears the floor and beats the champion by more than min_improvement.

    A model whose macro-F1 is under ``min_macro_f1`` is refused whatever its primary metric: on a skewed test
    set a model that predicts one class only can have high accuracy.
    """
    m = cfg.metric
    if macro_f1 is not None and macro_f1 < cfg.min_macro_f1:
        return Decision(False, f"macro_f1={macro_f1:.4f} is below min_macro_f1 {cfg.min_macro_f1} "
                               f"(the model ignores some classes)")
    if value < cfg.floor:
        return Decision(False, f"{m}={value:.4f} is below the floor {cfg.floor}")
    if champion_value is None:
        return Decision(True, f"no champion yet and {m}={value:.4f} clears the floor {cfg.floor}")
    if value > champion_value + cfg.min_improvement:
        return Decision(True, f"{m}={value:.4f} beats the champion's {champion_value:.4f} by more than "
                              f"{cfg.min_improvement}")
    return Decision(False, f"{m}={value:.4f} does not beat the champion's {champion_value:.4f} by more than "
                           f"{cfg.min_improvement}")


def same_lineage(ours: ModelKind, champion: ModelKind | None, champion_version: str, cfg: RegisterConfig) -> bool:
    """True when the champion is comparable (same task, same labels in the same order). When it is not: False if
    ``register.new_lineage`` allows starting a new lineage under this name, else LineageMismatch naming both."""
    if champion == ours:
        return True
    if cfg.new_lineage:
        return False
    theirs = (f"task {champion.task}, labels {list(champion.labels)}" if champion else
              "no recorded task and labels (registered before they were recorded)")
    raise LineageMismatch(
        f"{cfg.model_name}@champion (v{champion_version}) has {theirs}; this model has task {ours.task}, labels "
        f"{list(ours.labels)}. Nothing was registered. Set register.model_name to a new name for a different "
        f"task or label set, or set register.new_lineage: true to start a new lineage under "
        f"'{cfg.model_name}' (the old champion then loses @champion, which the registration records).")


def score_predictions(metric: str, texts: Sequence[str], y_true: Sequence, y_pred: Sequence,
                      labels: Sequence[str], kind: str = TASK) -> float:
    """``metric`` of a pyfunc's predictions on ``texts`` (a name per text, a list of names for multi-label,
    entity records for NER), computed by the task's own metric function (evaluate's)."""
    return task_for(TASK_OF_KIND.get(kind, "single_label")).score_decisions(metric, texts, y_true, y_pred, labels)


def kind_from_config(config: dict) -> ModelKind:
    """The kind of a saved transformers classifier, from its config.json (id2label keys are strings there)."""
    id2label = {int(i): str(lab) for i, lab in (config.get("id2label") or {}).items()}
    token_head = any(str(a).endswith("ForTokenClassification") for a in config.get("architectures") or [])
    task = NER if token_head else KINDS.get(config.get("problem_type") or "", TASK)
    return ModelKind(task, tuple(id2label[i] for i in sorted(id2label)))
