"""The single-label task: one class per text. Softmax over the classes, argmax decides,
accuracy / macro-F1 / per-class scores / calibration measure it."""

from __future__ import annotations

from typing import Any

import numpy as np


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
