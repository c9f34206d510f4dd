"""What the monitor needs to know about a task family, in one place: how a label column is read, which prediction
features are profiled, which metrics are bootstrapped. Single-label and multi-label (per-label rates over the
model's thresholds) and NER (per-type entity rates, tag distribution, entity micro-F1; monitoring/ner.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from finetune.monitoring import ner
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


class TokenTask:
    """NER: ``probs`` are tag probabilities per word, (texts, most words, tags) padded with all-zero rows; a
    text's prediction is each word's argmax tag (-100 where there is no word) and the entities of those tags."""
    name = "token"
    metrics = ("entity_micro_f1",)

    def label_ids(self, values: list[Any], labels: list[str], source: str, rows: list[int], separator: str = "|"
                  ) -> np.ndarray:
        """Each row's list of IOB2 tags as tag ids, padded with -100."""
        try:
            return ner.tag_ids(values, labels, source, rows)
        except ValueError as exc:
            raise MonitorInputError(str(exc)) from None

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        z = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return z / z.sum(axis=-1, keepdims=True)

    def prediction_features(self, probs: np.ndarray) -> dict[str, np.ndarray]:
        """Per text: the mean over its words of the top tag probability, their mean entropy, its entities."""
        words = probs.sum(-1) > 0
        n = np.maximum(words.sum(1), 1)
        p = np.clip(probs, 1e-12, 1.0)
        entropy = np.where(words, -(p * np.log(p)).sum(-1), 0.0)
        counts = [len(s) for s in ner.entity_sets(self.predicted(probs), ner.generic_tags(probs.shape[-1]))]
        return {"confidence": probs.max(-1).sum(1) / n, "entropy": entropy.sum(1) / n,
                "entity_count": np.asarray(counts, dtype=np.float64)}

    def predicted(self, probs: np.ndarray, thresholds: list[float] | None = None) -> np.ndarray:
        return np.where(probs.sum(-1) > 0, probs.argmax(-1), ner.IGNORE)

    def counts(self, ids: np.ndarray, k: int) -> np.ndarray:
        """Words per tag (the tag distribution)."""
        return np.bincount(ids[ids >= 0], minlength=k)

    def score(self, y_true: np.ndarray, probs: np.ndarray, labels: list[str], thresholds: list[float] | None = None
              ) -> dict[str, float]:
        from finetune.tasks import token  # imports torch: only when scoring

        metrics, _ = token.scores(y_true, probs, labels, bins=10)
        return {k: float(metrics[k]) for k in self.metrics}

    def resampled_scores(self, y_true: np.ndarray, y_pred: np.ndarray, k: int, idx: np.ndarray
                         ) -> dict[str, np.ndarray]:
        """Entity micro-F1 of each resample of texts, from each text's (exact matches, predicted, true) counts."""
        per_text = ner.entity_match_counts(y_true, y_pred, ner.generic_tags(k))
        tp, n_pred, n_true = (per_text[:, j][idx].sum(1) for j in range(3))
        return {"entity_micro_f1": np.where(n_pred + n_true > 0, 2 * tp / np.maximum(n_pred + n_true, 1), 0.0)}


TASKS = {"single_label": SingleLabelTask(), "multi_label": MultiLabelTask(), "token": TokenTask()}


def task_of(name: str) -> SingleLabelTask | MultiLabelTask | TokenTask:
    if name not in TASKS:
        raise MonitorInputError(f"the monitor does not know task {name!r} yet (known: {sorted(TASKS)})")
    return TASKS[name]
