"""The single-label task: one class per text. Softmax over the classes, argmax decides,
accuracy / macro-F1 / per-class scores / calibration measure it. Exports the contract of finetune.tasks."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from finetune.common.coercion import ConfigError
from finetune.common.config import TrainConfig, ValidateConfig

NAME = "single_label"
PROBLEM_TYPE = "single_label_classification"
LORA_TASK_TYPE = "SEQ_CLS"
AUTO_MODEL = "AutoModelForSequenceClassification"
PYFUNC_CODE: tuple[str, ...] = ()  # the pyfunc models decide with their own code only
GATE_METRICS = ("accuracy", "macro_f1")
SELECT_METRICS = ("val_loss", "val_accuracy", "val_macro_f1")


def read_labels(values: pd.Series, separator: str) -> pd.Series:
    return values


def prepare_labels(df: pd.DataFrame, column: str, separator: str, cfg: ValidateConfig
                   ) -> tuple[pd.DataFrame, list[dict], list[str]]:
    """One value per row, checked by validate's own rules (label_is_scalar, label_in_set against
    ``validate.labels``, which is returned for that rule)."""
    return df, [], list(cfg.labels)


def label_counts(values: pd.Series) -> pd.Series:
    """Rows per class, by class name."""
    return values.value_counts().sort_index()


def hash_order(text: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\x00{text}".encode()).hexdigest()


def split_rows(df: pd.DataFrame, cfg: ValidateConfig) -> dict[str, pd.DataFrame]:
    """Stratified split, stable under row reordering: inside each class rows are ordered by a seeded
    hash of their text, then cut by the configured fractions."""
    parts: dict[str, list[pd.DataFrame]] = {s: [] for s in ("train", "val", "test")}
    for _, grp in df.groupby("label", sort=True):
        grp = grp.assign(_k=grp["text"].map(lambda t: hash_order(t, cfg.seed))).sort_values("_k")
        n = len(grp)
        n_test = max(1, round(n * cfg.test_fraction))
        n_val = max(1, round(n * cfg.val_fraction))
        parts["test"].append(grp.iloc[:n_test])
        parts["val"].append(grp.iloc[n_test:n_test + n_val])
        parts["train"].append(grp.iloc[n_test + n_val:])
    return {s: pd.concat(p).sort_index().drop(columns="_k") for s, p in parts.items()}


def encode_labels(values: Sequence, label_names: list[str]) -> np.ndarray:
    """1-D int64 class ids."""
    index = {lab: i for i, lab in enumerate(label_names)}
    return np.array([index[lab] for lab in values], dtype=np.int64)


def refused_regime(cfg: TrainConfig) -> str | None:
    if cfg.select_metric not in SELECT_METRICS:
        return (f"train.select_metric = {cfg.select_metric!r}: task single_label selects by one of "
                f"{', '.join(SELECT_METRICS)}")
    return None  # every regime of the loop applies


def loss_weights(spec: str | list[float], train_labels: np.ndarray, label_names: list[str]) -> torch.Tensor | None:
    """Per-class loss weights, or None for the plain loss. ``balanced``: n / (classes * n_class) on the train
    split, so the weights average 1 over its rows and the loss keeps its scale."""
    if spec == "none":
        return None
    k = len(label_names)
    if spec == "balanced":
        counts = np.bincount(train_labels, minlength=k)
        if (counts == 0).any():
            missing = [lab for lab, c in zip(label_names, counts) if c == 0]
            raise ConfigError(f"train.class_weights = 'balanced': class(es) {missing} have no train rows")
        weights = len(train_labels) / (k * counts)
    else:
        if len(spec) != k:
            raise ConfigError(f"train.class_weights = {list(spec)}: must hold one weight per label, {k} "
                              f"({', '.join(label_names)})")
        weights = np.asarray(spec, dtype=np.float64)
    return torch.tensor(weights, dtype=torch.float32)


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy summed over rows (label -100: an empty packed slot, no loss). Class weights scale each row's
    loss: sum(w_y * ce) (torch's weighted mean would divide by sum(w) instead)."""
    return torch.nn.functional.cross_entropy(logits.float(), labels, weight=weight, reduction="sum",
                                             ignore_index=-100)


def validation_scores(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Unweighted loss, accuracy and macro-F1 (evaluate's arithmetic)."""
    scores, _ = classification_metrics(labels, softmax(logits), [str(i) for i in range(logits.shape[1])], bins=2)
    loss = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels))
    return {"val_loss": float(loss), "val_accuracy": float((logits.argmax(-1) == labels).mean()),
            "val_macro_f1": scores["macro_f1"]}


def probabilities(logits: np.ndarray) -> np.ndarray:
    return softmax(logits)


def scores(y_true: np.ndarray, probs: np.ndarray, label_names: list[str], bins: int,
           thresholds: np.ndarray | None = None) -> tuple[dict, list]:
    return classification_metrics(y_true, probs, label_names, bins)


def decide(probs: np.ndarray, label_names: list[str], thresholds: np.ndarray | None = None) -> list[str]:
    return [label_names[i] for i in probs.argmax(axis=1)]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, labels: list[str], bins: int) -> tuple[dict, list]:
    """Pure metric arithmetic on integer labels and class probabilities."""
    k = len(labels)
    y_pred = probs.argmax(axis=1)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    per_class = {}
    f1s = []
    for i, lab in enumerate(labels):
        tp = cm[i, i]
        prec = tp / cm[:, i].sum() if cm[:, i].sum() else 0.0
        rec = tp / cm[i, :].sum() if cm[i, :].sum() else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        f1s.append(f1)
        per_class[lab] = {"precision": round(float(prec), 6), "recall": round(float(rec), 6),
                          "f1": round(float(f1), 6), "support": int(cm[i, :].sum())}
    conf = probs.max(axis=1)
    correct = (y_pred == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    calib, ece = [], 0.0
    for b in range(bins):
        m = which == b
        n = int(m.sum())
        acc = float(correct[m].mean()) if n else 0.0
        avg_conf = float(conf[m].mean()) if n else 0.0
        ece += n / len(y_true) * abs(acc - avg_conf)
        calib.append({"bin": b, "lower": float(edges[b]), "upper": float(edges[b + 1]), "count": n,
                      "accuracy": round(acc, 6), "confidence": round(avg_conf, 6)})
    nll = -np.log(np.clip(probs[np.arange(len(y_true)), y_true], 1e-12, None)).mean()
    metrics = {"accuracy": round(float(correct.mean()), 6), "macro_f1": round(float(np.mean(f1s)), 6),
               "loss": round(float(nll), 6), "ece": round(float(ece), 6), "n": int(len(y_true)),
               "per_class": per_class, "labels": labels, "confusion_matrix": cm.tolist()}
    return metrics, calib


def floor_warning(balance: dict[str, Any] | None, floor: float, metric: str) -> str | None:
    """A warning when register.floor does not exceed the majority-class baseline of the gate's metric."""
    base = ((balance or {}).get("baseline") or {}).get(metric)
    if base is None or floor > base:
        return None
    return (f"register.floor = {floor} is not above the majority-class baseline: always predicting "
            f"'{balance['majority']}' scores {metric} {base:.4f} on the test split, so it would clear the floor")


def class_balance(splits: dict[str, pd.DataFrame], labels: list[str]) -> dict[str, Any]:
    """Each class's share of all rows, and the majority-class baseline: what a model that always predicts the
    train split's most frequent class scores on the test split (accuracy, and macro-F1 as evaluate computes it:
    that class's F1 2p/(1+p), the others 0, averaged)."""
    counts = {lab: sum(int((f["label"] == lab).sum()) for f in splits.values()) for lab in labels}
    total = sum(counts.values()) or 1
    shares = {lab: round(c / total, 6) for lab, c in counts.items()}
    train = splits["train"]["label"].value_counts()
    majority = min(labels, key=lambda lab: (-int(train.get(lab, 0)), lab))
    p = float((splits["test"]["label"] == majority).mean()) if len(splits["test"]) else 0.0
    return {"shares": shares, "minority": min(labels, key=lambda lab: (shares[lab], lab)), "majority": majority,
            "baseline": {"accuracy": round(p, 6), "macro_f1": round(2 * p / (1 + p) / len(labels), 6)}}


def balance_warnings(balance: dict[str, Any], min_fraction: float) -> list[str]:
    minority = balance["minority"]
    share = balance["shares"][minority]
    if share >= min_fraction:
        return []
    return [f"class '{minority}' holds {share:.1%} of the rows, under validate.min_class_fraction "
            f"({min_fraction:.1%}): consider train.class_weights: balanced and register.metric: macro_f1"]


# ---- decisions and curves: argmax needs no stored thresholds; one-vs-rest ROC per class ----

CURVE_AXES = ("fpr", "tpr", "auc", "roc_auc")  # evaluate's per-class curves: x, y, area, per-class key (ROC)


def decision_files(val_logits: Callable[[], np.ndarray], val_labels: np.ndarray | None,
                   label_names: list[str]) -> dict[str, Any]:
    return {}  # argmax: nothing to store with the model


def read_thresholds(model_dir: str | Path, label_names: list[str]) -> None:
    return None


def curves(y_true: np.ndarray, probs: np.ndarray, labels: list[str], max_points: int = 1000,
               curves_for: Iterable[int] | None = None) -> dict[str, dict[str, Any]]:
    """One-vs-rest ROC curve and its area per class (a class absent from, or alone in, ``y_true`` has none).

    Points are (false positive rate, true positive rate) at each distinct score threshold, from (0, 0); the
    AUC is computed on all of them, the curve kept for plotting is thinned to about ``max_points``. With
    ``curves_for``, only those class indices keep their curve (the others their AUC only): bounded memory.
    """
    out = {}
    keep_curve = set(range(len(labels)) if curves_for is None else (int(i) for i in curves_for))
    for k, lab in enumerate(labels):
        pos = y_true == k
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if not n_pos or not n_neg:
            continue
        order = np.argsort(-probs[:, k], kind="stable")
        scores, hits = probs[order, k], pos[order]
        last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # last index of each distinct score
        tpr = np.r_[0.0, np.cumsum(hits)[last] / n_pos]
        fpr = np.r_[0.0, np.cumsum(~hits)[last] / n_neg]
        thr = np.r_[1.0, scores[last]]
        auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
        if k not in keep_curve:
            out[lab] = {"auc": round(auc, 6)}
            continue
        keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), max_points)).round().astype(int))
        out[lab] = {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist(), "threshold": thr[keep].tolist(),
                    "auc": round(auc, 6)}
    return out


def agreement(probs: np.ndarray, reference: np.ndarray, y_true: np.ndarray, label_names: list[str]) -> float:
    """The share of texts given the same class by ``probs`` and ``reference`` (compress's variants)."""
    same = [a == b for a, b in zip(decide(probs, label_names), decide(reference, label_names))]
    return float(np.mean(same)) if same else 1.0


def sentence_records(split: Any, probs: np.ndarray, label_names: list[str], tok: Any) -> None:
    """None: one prediction per text, written as predictions.csv rows (evaluate)."""


def score_hard_decisions(task: Any, metric: str, y_true: Sequence, y_pred: Sequence, labels: Sequence[str]) -> float:
    """``metric`` of decided label values (no probabilities: each decision as a one-hot / multi-hot row), computed
    by ``task``'s own ``scores`` (evaluate's); a true label the model lacks counts as missed."""
    seen = task.label_counts(pd.Series(list(y_true), dtype=object)).index
    names = list(labels) + sorted(set(seen) - set(labels))
    truth = task.encode_labels(list(y_true), names)
    hard = task.encode_labels(list(y_pred), names)
    probs = hard.astype(np.float64) if hard.ndim == 2 else np.eye(len(names))[hard]
    metrics, _ = task.scores(truth, probs, names, bins=1)
    return float(metrics[metric])


def score_decisions(metric: str, texts: Sequence[str], y_true: Sequence, predictions: Sequence,
                    labels: Sequence[str]) -> float:
    """``metric`` of a pyfunc's predictions (a class name per text) against the true labels."""
    return score_hard_decisions(sys.modules[__name__], metric, y_true, [str(p) for p in predictions], labels)

