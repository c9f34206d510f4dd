"""The multi-label task: any number of labels per text (topics, tags, moderation categories). One sigmoid per
label, BCE with logits, a label is predicted when its probability reaches its threshold (0.5, or tuned per label
on the validation split by evaluate). Exports the contract of finetune.tasks."""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from finetune.common.coercion import ConfigError
from finetune.common.config import TrainConfig

NAME = "multi_label"
PROBLEM_TYPE = "multi_label_classification"
LORA_TASK_TYPE = "SEQ_CLS"
AUTO_MODEL = "AutoModelForSequenceClassification"
GATE_METRICS = ("micro_f1", "macro_f1", "samples_f1", "subset_accuracy")
SELECT_METRICS = ("val_loss", "val_micro_f1", "val_macro_f1")
THRESHOLDS_FILE = "thresholds.json"  # per-label thresholds, in the model folder: predict, pyfunc, server read it
DEFAULT_THRESHOLD = 0.5


def read_labels(values: pd.Series, separator: str) -> pd.Series:
    """A list of label names per row: JSON lists (JSONL, Parquet) as they are, strings (CSV) split on
    ``separator`` (a string that is itself a JSON list, '["a", "b"]', is read as the list). Empty = no label;
    None/NaN stays None (the missing-label rule names the row)."""
    def one(v: Any) -> list[str] | None:
        if isinstance(v, (list, tuple, np.ndarray)):
            return [str(x).strip() for x in v if str(x).strip()]
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return None
        text = str(v).strip()
        if text.startswith("[") and text.endswith("]"):
            try:
                return [str(x).strip() for x in json.loads(text) if str(x).strip()]
            except ValueError:
                pass
        return [p.strip() for p in text.split(separator) if p.strip()] if text else []
    return values.map(one).astype(object)


def encode_labels(values: Sequence, label_names: list[str]) -> np.ndarray:
    """2-D int64 multi-hot ``(n, k)``."""
    index = {lab: i for i, lab in enumerate(label_names)}
    out = np.zeros((len(values), len(label_names)), dtype=np.int64)
    for row, labels in enumerate(values):
        for lab in labels:
            out[row, index[lab]] = 1
    return out


def refused_regime(cfg: TrainConfig) -> str | None:
    if cfg.pack_tokens:
        return ("train.pack_tokens > 0: packing is for single-label and token tasks (its slots carry one class id "
                "per text); set train.pack_tokens: 0 for task: multi_label")
    if cfg.select_metric not in SELECT_METRICS:
        return (f"train.select_metric = {cfg.select_metric!r}: task multi_label selects by one of "
                f"{', '.join(SELECT_METRICS)}")
    return None


def loss_weights(spec: str | list[float], train_labels: np.ndarray, label_names: list[str]) -> torch.Tensor | None:
    """``train.class_weights`` as BCE's per-label pos_weight: ``balanced`` = negatives / positives of each label
    on the train split (a rare label's positives weigh as much as its negatives); a list: one per label."""
    if spec == "none":
        return None
    k = len(label_names)
    if spec == "balanced":
        pos = train_labels.sum(axis=0)
        if (pos == 0).any():
            missing = [lab for lab, c in zip(label_names, pos) if c == 0]
            raise ConfigError(f"train.class_weights = 'balanced': label(s) {missing} have no train rows")
        weights = (len(train_labels) - pos) / pos
    else:
        if len(spec) != k:
            raise ConfigError(f"train.class_weights = {list(spec)}: must hold one pos_weight per label, {k} "
                              f"({', '.join(label_names)})")
        weights = np.asarray(spec, dtype=np.float64)
    return torch.tensor(weights, dtype=torch.float32)


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """BCE with logits summed over labels and rows: each row's loss is the sum over its labels."""
    return torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=weight,
                                                                reduction="sum")


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))


def probabilities(logits: np.ndarray) -> np.ndarray:
    return sigmoid(logits)


def validation_scores(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Mean BCE per row (summed over labels, as the training loss), micro/macro-F1 at 0.5, subset accuracy as
    val_accuracy (the train summary's column)."""
    loss = torch.nn.functional.binary_cross_entropy_with_logits(torch.from_numpy(logits).float(),
                                                                torch.from_numpy(labels).float(), reduction="sum")
    m, _ = scores(labels, probabilities(logits), [str(i) for i in range(logits.shape[1])], bins=2)
    return {"val_loss": float(loss) / max(1, len(labels)), "val_accuracy": m["subset_accuracy"],
            "val_micro_f1": m["micro_f1"], "val_macro_f1": m["macro_f1"]}


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros(np.shape(tp), dtype=np.float64), where=denom > 0)


def scores(y_true: np.ndarray, probs: np.ndarray, label_names: list[str], bins: int,
           thresholds: np.ndarray | None = None) -> tuple[dict, list]:
    """micro/macro/samples F1, subset accuracy, Hamming loss, per-label P/R/F1/support (sklearn's definitions; a
    row with no true and no predicted label scores samples-F1 1), at ``thresholds`` (default 0.5 each)."""
    y = np.asarray(y_true, dtype=bool)
    pred = probs >= (DEFAULT_THRESHOLD if thresholds is None else np.asarray(thresholds))
    tp, fp, fn = (y & pred).sum(0), (~y & pred).sum(0), (y & ~pred).sum(0)
    per_label_f1 = _f1(tp, fp, fn)
    per_class = {}
    for i, lab in enumerate(label_names):
        prec = tp[i] / (tp[i] + fp[i]) if tp[i] + fp[i] else 0.0
        rec = tp[i] / (tp[i] + fn[i]) if tp[i] + fn[i] else 0.0
        per_class[lab] = {"precision": round(float(prec), 6), "recall": round(float(rec), 6),
                          "f1": round(float(per_label_f1[i]), 6), "support": int(y[:, i].sum())}
    row_tp, row_fp, row_fn = (y & pred).sum(1), (~y & pred).sum(1), (y & ~pred).sum(1)
    row_f1 = np.where(row_tp + row_fp + row_fn == 0, 1.0, _f1(row_tp, row_fp, row_fn))
    p = np.clip(probs, 1e-12, 1 - 1e-12)
    bce = -(y * np.log(p) + (~y) * np.log(1 - p)).sum(1).mean() if len(y) else 0.0
    n = len(y)
    metrics = {"micro_f1": round(float(_f1(tp.sum(), fp.sum(), fn.sum())), 6),
               "macro_f1": round(float(per_label_f1.mean()), 6) if len(label_names) else 0.0,
               "samples_f1": round(float(row_f1.mean()), 6) if n else 0.0,
               "subset_accuracy": round(float((pred == y).all(1).mean()), 6) if n else 0.0,
               "hamming_loss": round(float((pred != y).mean()), 6) if n else 0.0,
               "loss": round(float(bce), 6), "n": int(n), "per_class": per_class, "labels": list(label_names),
               "label_cardinality": round(float(y.sum(1).mean()), 6) if n else 0.0}
    return metrics, []


def decide(probs: np.ndarray, label_names: list[str], thresholds: np.ndarray | None = None) -> list[list[str]]:
    """The labels whose probability reaches their threshold, per row (possibly none)."""
    cut = DEFAULT_THRESHOLD if thresholds is None else np.asarray(thresholds)
    return [[lab for lab, on in zip(label_names, row) if on] for row in probs >= cut]


def tune_thresholds(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per label, the threshold that maximises that label's F1 on these (validation) rows: candidates are the
    midpoints between the label's sorted distinct probabilities; ties keep the one closest to 0.5; a label
    without positives keeps 0.5."""
    y = np.asarray(y_true, dtype=bool)
    out = np.full(probs.shape[1], DEFAULT_THRESHOLD)
    for j in range(probs.shape[1]):
        if not y[:, j].any():
            continue
        values = np.unique(probs[:, j])
        cands = np.concatenate([[DEFAULT_THRESHOLD], (values[:-1] + values[1:]) / 2, values[:1]])
        pred = probs[:, j][None, :] >= cands[:, None]
        tp = (pred & y[:, j]).sum(1)
        f1 = _f1(tp, (pred & ~y[:, j]).sum(1), (~pred & y[:, j]).sum(1))
        best = np.flatnonzero(f1 >= f1.max() - 1e-12)
        out[j] = float(cands[best[np.argmin(np.abs(cands[best] - DEFAULT_THRESHOLD))]])
    return out
