"""What the monitor needs to know about a task family, in one place: how a label column is read, which prediction
features are profiled, which metrics are bootstrapped. Single-label today; NER and multi-label add an entry to
TASKS (per-type / per-label rates instead of one predicted class)."""

from __future__ import annotations

from typing import Any

import numpy as np

from finetune.tasks.single_label import classification_metrics


class MonitorInputError(ValueError):
    """A batch the monitor cannot read: one line naming the file, the row and the rule."""


class SingleLabelTask:
    name = "single_label"
    metrics = ("accuracy", "macro_f1")

    def label_ids(self, values: list[Any], labels: list[str], source: str, rows: list[int]) -> np.ndarray:
        """Each label's index in the version's label set; a label outside it is another task's or data set's."""
        index = {lab: i for i, lab in enumerate(labels)}
        out = np.empty(len(values), dtype=np.int64)
        for i, value in enumerate(values):
            if str(value) not in index:
                raise MonitorInputError(f"{source}: row {rows[i]}: label {str(value)[:80]!r} is not one of the "
                                        f"model's labels {labels} (a batch of another task or label set?)")
            out[i] = index[str(value)]
        return out

    def prediction_features(self, probs: np.ndarray) -> dict[str, np.ndarray]:
        """Per text: the top probability and the entropy of the predicted distribution."""
        p = np.clip(probs, 1e-12, 1.0)
        return {"confidence": probs.max(axis=1), "entropy": -(p * np.log(p)).sum(axis=1)}

    def predicted(self, probs: np.ndarray) -> np.ndarray:
        return probs.argmax(axis=1)

    def score(self, y_true: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict[str, float]:
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


TASKS = {"single_label": SingleLabelTask()}


def task_of(name: str) -> SingleLabelTask:
    if name not in TASKS:
        raise MonitorInputError(f"the monitor does not know task {name!r} yet (known: {sorted(TASKS)})")
    return TASKS[name]
