"""What the monitor needs to know about a task family, in one place: how a label column is read, which prediction
features are profiled, which metrics are bootstrapped. Single-label and multi-label (per-label rates over the
model's thresholds); NER is still to add (per-type rates)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from finetune.tasks import multi_label
from finetune.tasks.single_label import classification_metrics


class MonitorInputError(ValueError):
    """A batch the monitor cannot read: one line naming the file, the row and the rule."""


class SingleLabelTask:
    name = "single_label"
    metrics = ("accuracy", "macro_f1")

    def label_ids(self, values: list[Any], labels: list[str], source: str, rows: list[int], separator: str = "|"
                  ) -> np.ndarray:
        """Each label's index in the version's label set; a label outside it is another task's or data set's."""
        index = {lab: i for i, lab in enumerate(labels)}
        out = np.empty(len(values), dtype=np.int64)
        for i, value in enumerate(values):
            if str(value) not in index:
                raise MonitorInputError(f"{source}: row {rows[i]}: label {str(value)[:80]!r} is not one of the "
                                        f"model's labels {labels} (a batch of another task or label set?)")
            out[i] = index[str(value)]
        return out

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def prediction_features(self, probs: np.ndarray) -> dict[str, np.ndarray]:
        """Per text: the top probability and the entropy of the predicted distribution."""
        p = np.clip(probs, 1e-12, 1.0)
        return {"confidence": probs.max(axis=1), "entropy": -(p * np.log(p)).sum(axis=1)}

    def predicted(self, probs: np.ndarray, thresholds: list[float] | None = None) -> np.ndarray:
        return probs.argmax(axis=1)

    def counts(self, ids: np.ndarray, k: int) -> np.ndarray:
        """Texts per label of predicted or true label ids."""
        return np.bincount(ids, minlength=k)

    def score(self, y_true: np.ndarray, probs: np.ndarray, labels: list[str], thresholds: list[float] | None = None
              ) -> dict[str, float]:
        metrics, _ = classification_metrics(y_true, probs, labels, bins=10)
        return {k: float(metrics[k]) for k in self.metrics}

    def resampled_scores(self, y_true: np.ndarray, y_pred: np.ndarray, k: int, idx: np.ndarray
                         ) -> dict[str, np.ndarray]:
        """Accuracy and macro-F1 of each bootstrap resample (rows of ``idx``), vectorised."""
        t, p = y_true[idx], y_pred[idx]
        acc = (t == p).mean(axis=1)
        f1s = []
        for c in range(k):
            tp = ((t == c) & (p == c)).sum(axis=1)
            denom = (t == c).sum(axis=1) + (p == c).sum(axis=1)
            f1s.append(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0))
        return {"accuracy": acc, "macro_f1": np.mean(f1s, axis=0)}


class MultiLabelTask:
    """Labels are multi-hot rows; a text's decision is every label at or over its threshold (thresholds.json)."""
    name = "multi_label"
    metrics = ("micro_f1", "macro_f1")

    def label_ids(self, values: list[Any], labels: list[str], source: str, rows: list[int], separator: str = "|"
                  ) -> np.ndarray:
        """Multi-hot rows of each text's labels (a CSV string split on ``separator``, or a list)."""
        known = set(labels)
        lists = multi_label.read_labels(pd.Series(values, dtype=object), separator)
        for row, names in zip(rows, lists):
            unknown = [n for n in (names or []) if n not in known]
            if names is None or unknown:
                raise MonitorInputError(f"{source}: row {row}: label {str(unknown[:1] or None)[:80]} is not one of "
                                        f"the model's labels {labels} (a batch of another task or label set?)")
        return multi_label.encode_labels(list(lists), labels)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return multi_label.probabilities(logits)

    def prediction_features(self, probs: np.ndarray) -> dict[str, np.ndarray]:
        """Per text: the mean over labels of max(p, 1-p) (how sure each yes/no is) and the mean binary entropy."""
        p = np.clip(probs, 1e-12, 1 - 1e-12)
        return {"confidence": np.maximum(probs, 1 - probs).mean(axis=1),
                "entropy": -(p * np.log(p) + (1 - p) * np.log(1 - p)).mean(axis=1)}

    def predicted(self, probs: np.ndarray, thresholds: list[float] | None = None) -> np.ndarray:
        cut = multi_label.DEFAULT_THRESHOLD if thresholds is None else np.asarray(thresholds)
        return (probs >= cut).astype(np.int64)

    def counts(self, ids: np.ndarray, k: int) -> np.ndarray:
        return ids.sum(axis=0)

    def score(self, y_true: np.ndarray, probs: np.ndarray, labels: list[str], thresholds: list[float] | None = None
              ) -> dict[str, float]:
        metrics, _ = multi_label.scores(y_true, probs, labels, bins=10,
                                        thresholds=None if thresholds is None else np.asarray(thresholds))
        return {k: float(metrics[k]) for k in self.metrics}

    def resampled_scores(self, y_true: np.ndarray, y_pred: np.ndarray, k: int, idx: np.ndarray
                         ) -> dict[str, np.ndarray]:
        """Micro- and macro-F1 of each bootstrap resample, from per-label counts of one gather per resample."""
        t, p = y_true[idx].astype(bool), y_pred[idx].astype(bool)  # (resamples, rows, labels)
        tp, fp, fn = (t & p).sum(1), (~t & p).sum(1), (t & ~p).sum(1)
        micro_den = (2 * tp + fp + fn).sum(1)
        micro = np.where(micro_den > 0, 2 * tp.sum(1) / np.maximum(micro_den, 1), 0.0)
        den = 2 * tp + fp + fn
        macro = np.where(den > 0, 2 * tp / np.maximum(den, 1), 0.0).mean(1)
        return {"micro_f1": micro, "macro_f1": macro}


TASKS = {"single_label": SingleLabelTask(), "multi_label": MultiLabelTask()}


def task_of(name: str) -> SingleLabelTask | MultiLabelTask:
    if name not in TASKS:
        raise MonitorInputError(f"the monitor does not know task {name!r} yet (known: {sorted(TASKS)})")
    return TASKS[name]
