"""Task families: what a task means for the labels, the head and its loss, the metrics, the decision rule and
the predictions.

``task:`` in params.yaml names the task; every stage calls :func:`task_for` and uses the module it returns. A
stage never branches on the task's name: what differs between tasks lives in the task's module. A task is ONE
module in this package exporting the names below (plain functions and constants, no class hierarchy); a new task
is a new module plus its entry in ``TASKS``.

The contract (every task module exports all of these):

Constants
    NAME: str                       the ``task:`` value (``single_label``, ``multi_label``, ``token``)
    PROBLEM_TYPE: str               transformers' ``config.problem_type`` of the head
    LORA_TASK_TYPE: str             peft's ``task_type`` (keeps the fresh head trainable next to the adapters)
    AUTO_MODEL: str                 the transformers Auto class name of the head
                                    (``AutoModelForSequenceClassification``, ``AutoModelForTokenClassification``)
    GATE_METRICS: tuple[str, ...]   values ``register.metric`` may take for this task (higher is better); the
                                    first is the task's primary metric (compress's deltas, the report's headline)
    SELECT_METRICS: tuple[str, ...] values ``train.select_metric`` may take (``val_loss`` always among them)
    CURVE_AXES: tuple[str, str, str, str]
                                    evaluate's per-class curves: x key, y key, area key, the per-class metric name
                                    (single-label: fpr, tpr, auc, roc_auc; multi-label: recall, precision, ap,
                                    average_precision)
    PYFUNC_CODE: tuple[str, ...]    files the registry logs beside the pyfunc models (MLflow ``code_paths``),
                                    which they import where the finetune package is not installed (token:
                                    tasks/ner_decode.py, entities with character offsets; others: none)

validate / tokenize
    prepare_labels(df: pandas.DataFrame, column: str, separator: str, cfg: ValidateConfig)
            -> tuple[pandas.DataFrame, list[dict], list[str]]
        the label column read and checked by the task (rules in validate's report format: rule, column, success,
        source, message, unexpected_count, examples [{row, value}]), and the label set validate's generic
        ``label_in_set`` rule checks (empty: the task checked it). The returned column must be hashable per row
        (multi-label: the sorted labels joined by an internal separator)
    label_counts(values: pandas.Series) -> pandas.Series
        rows per class / label name, from the prepared label column
    split_rows(df: pandas.DataFrame, cfg: ValidateConfig) -> dict[str, pandas.DataFrame]
        the seeded train/val/test split, stable under row reordering, stratified as the task needs
    class_balance(splits: dict[str, pandas.DataFrame], label_names: list[str]) -> dict
        the report's label statistics (shares, the majority baseline; multi-label: per-label counts, cardinality,
        top co-occurring pairs)
    balance_warnings(balance: dict, min_fraction: float) -> list[str]
        the report's warnings about rare classes / labels
    floor_warning(balance: dict | None, floor: float, metric: str) -> str | None
        a warning when register.floor does not beat a trivial baseline of ``metric``
    read_labels(values: pandas.Series, separator: str) -> pandas.Series
        the raw label column as the task's label values (single-label: the value itself; multi-label: a list of
        label names per row, CSV strings split on ``data.label_separator``)
    encode_labels(values: Sequence, label_names: list[str]) -> numpy.ndarray
        the label array stored in the tokens (int64). single-label: 1-D class ids ``(n,)``; multi-label: 2-D
        multi-hot ``(n, k)``; token: 2-D per-token ids, -100 = ignored in the loss (common/tokens.py stores any
        shape: axis 0 is always the row)

train
    refused_regime(cfg: TrainConfig) -> str | None
        a one-line reason when a training regime of ``cfg`` does not apply to the task, else None
    loss_weights(spec: str | list[float], train_labels: numpy.ndarray, label_names: list[str])
            -> torch.Tensor | None
        ``train.class_weights`` as the loss's weight tensor (per-class weights, or per-label pos_weight)
    loss_sum(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor
        the SUM of the loss over the rows of a batch (the loop divides by the step's rows); rows whose labels are
        all -100 (empty packed slots) add nothing
    validation_scores(logits: numpy.ndarray, labels: numpy.ndarray) -> dict[str, float]
        ``val_loss`` plus the task's validation metrics: every name of SELECT_METRICS, and ``val_accuracy`` /
        ``val_macro_f1`` (the train summary's columns)

evaluate / compress / register / predict / serve
    probabilities(logits: numpy.ndarray) -> numpy.ndarray
        logits -> the probabilities the decision rule reads (softmax over classes, sigmoid per label)
    scores(y_true: numpy.ndarray, probs: numpy.ndarray, label_names: list[str], bins: int,
           thresholds: numpy.ndarray | None = None) -> tuple[dict, list]
        the metrics dict (every GATE_METRICS name, ``per_class``, ``labels``, ``n``, ``loss``) and calibration
        rows; ``thresholds``: per-label decision thresholds where the task has them (None = the default rule)
    decide(probs: numpy.ndarray, label_names: list[str], thresholds: numpy.ndarray | None = None) -> list
        one prediction per row as predict and the server return it (single-label: the label name)
    score_decisions(metric: str, texts: Sequence[str], y_true: Sequence, predictions: Sequence,
                    labels: Sequence[str]) -> float
        ``metric`` of a registered pyfunc's predictions on validate's test texts (label names, label lists, entity
        records) against the true labels: how register re-scores a champion evaluated on other test data
    decision_files(val_logits: Callable[[], numpy.ndarray], val_labels: numpy.ndarray | None,
                   label_names: list[str]) -> dict[str, Any]
        JSON files train writes into the model folder beside the weights (multi-label: thresholds.json tuned on
        the validation split; call ``val_logits`` only when needed); {} when the rule needs nothing stored
    read_thresholds(model_dir: str | Path, label_names: list[str]) -> numpy.ndarray | None
        the stored decision thresholds evaluate scores with (None: the task's default rule)
    curves(y_true, probs, label_names, max_points: int = 1000, curves_for: Iterable[int] | None = None) -> dict
        per class, the curve named by CURVE_AXES and its area (only ``curves_for`` keep the points)
    agreement(probs, reference, y_true, label_names) -> float
        compress: the share of decisions two variants share (texts; token: words, i.e. first sub-tokens)
    sentence_records(split: TokenizedSplit, probs, label_names, tok) -> list[dict] | None
        evaluate's predictions.jsonl, one record per text (token: words, true and predicted tags and entities);
        None: the task's predictions are one row per text in predictions.csv
"""

from __future__ import annotations

import importlib
from types import ModuleType

# name -> module under finetune.tasks, or None: known but not implemented yet (refused in one line)
TASKS: dict[str, str | None] = {"single_label": "single_label", "multi_label": "multi_label", "token": "token"}


class TaskError(ValueError):
    pass


def task_for(name: str) -> ModuleType:
    """The module of the task ``name`` (params.yaml ``task:``); unknown or unimplemented tasks are one line."""
    if name not in TASKS:
        raise TaskError(f"task = {name!r}: must be one of {', '.join(TASKS)}")
    module = TASKS[name]
    if module is None:
        raise TaskError(f"task = {name!r}: known but not implemented yet (src/finetune/tasks/{name}.py is to "
                        f"come); use single_label or multi_label")
    return importlib.import_module(f"finetune.tasks.{module}")
