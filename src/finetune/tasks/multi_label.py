"""The multi-label task: any number of labels per text (topics, tags, moderation categories). One sigmoid per
label, BCE with logits, a label is predicted when its probability reaches its threshold (0.5, or tuned per label
on the validation split by evaluate). Exports the contract of finetune.tasks."""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from finetune.common.coercion import ConfigError
from finetune.common.config import TrainConfig, ValidateConfig
from finetune.tasks import single_label

NAME = "multi_label"
PROBLEM_TYPE = "multi_label_classification"
LORA_TASK_TYPE = "SEQ_CLS"
AUTO_MODEL = "AutoModelForSequenceClassification"
PYFUNC_CODE: tuple[str, ...] = ()  # the pyfunc models decide with their own code only
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
    """2-D int64 multi-hot ``(n, k)``, from label lists or the splits' joined strings."""
    index = {lab: i for i, lab in enumerate(label_names)}
    out = np.zeros((len(values), len(label_names)), dtype=np.int64)
    for row, labels in enumerate(values):
        for lab in (labels.split(JOIN) if isinstance(labels, str) else labels):
            if not lab:
                continue
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
               "accuracy": round(float((pred == y).all(1).mean()), 6) if n else 0.0,  # = subset (exact match)
               "hamming_loss": round(float((pred != y).mean()), 6) if n else 0.0,
               "loss": round(float(bce), 6), "n": int(n), "per_class": per_class, "labels": list(label_names),
               "label_cardinality": round(float(y.sum(1).mean()), 6) if n else 0.0,
               "label_confusion": {lab: {"tp": int(tp[i]), "fp": int(fp[i]), "fn": int(fn[i]),
                                         "tn": int(n - tp[i] - fp[i] - fn[i])} for i, lab in enumerate(label_names)}}
    calib, metrics["ece"] = _reliability(y.ravel(), probs.ravel(), bins)
    return metrics, calib


def _reliability(y: np.ndarray, p: np.ndarray, bins: int) -> tuple[list[dict], float]:
    """Every (row, label) probability as one binary forecast: per bin the mean probability ("confidence") and
    the share of positives ("accuracy"); ECE the count-weighted gap."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=True), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        m = which == b
        k = int(m.sum())
        hit, conf = (float(y[m].mean()), float(p[m].mean())) if k else (0.0, 0.0)
        ece += k / max(1, len(p)) * abs(hit - conf)
        rows.append({"bin": b, "lower": float(edges[b]), "upper": float(edges[b + 1]), "count": k,
                     "accuracy": round(hit, 6), "confidence": round(conf, 6)})
    return rows, round(float(ece), 6)


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


# ---- validate: a list of labels per row; the splits store them joined by JOIN (sorted), tokens multi-hot ----

JOIN = "\x1f"  # ASCII unit separator: a row's labels in the splits' label column (never inside a label)


def _rule(name: str, column: str, ok: bool, message: str, rows: list, values: list, max_examples: int) -> dict:
    """A validation rule's result in validate's report format."""
    return {"rule": name, "column": column, "success": ok, "source": "finetune", "message": message,
            "unexpected_count": len(rows),
            "examples": [{"row": int(r), "value": v} for r, v in zip(rows[:max_examples], values[:max_examples])]}


def prepare_labels(df: pd.DataFrame, column: str, separator: str, cfg: ValidateConfig
                   ) -> tuple[pd.DataFrame, list[dict], list[str]]:
    """Each row's labels read (JSON list, or a CSV string split on ``separator``), checked (rows with no label per
    ``validate.empty_labels``, labels outside ``validate.labels``) and joined, sorted, into one string per row;
    the rules; and the label set the generic ``label_in_set`` rule checks (none: checked here, per label)."""
    bad = [i for i, v in df[column].items() if isinstance(v, dict)]
    rules = [_rule("label_is_list", column, not bad, "each row's labels are a JSON list or a string split on "
                   f"data.label_separator {separator!r}" + ("; got objects" if bad else ""), bad,
                   [str(df.at[i, column]) for i in bad], cfg.max_examples)]
    if bad:
        return df, rules, []
    lists = read_labels(df[column], separator)
    empty = [i for i, v in lists.items() if v is not None and not v]
    refuse_empty = cfg.empty_labels == "refuse" and bool(empty)
    rules.append(_rule("labels_not_empty", column, not refuse_empty,
                       f"{len(empty)} row(s) with no label (validate.empty_labels: {cfg.empty_labels})", empty,
                       [str(df.at[i, column]) for i in empty], cfg.max_examples))
    if cfg.labels:
        allowed = set(cfg.labels)
        unknown = [i for i, v in lists.items() if v and not set(v) <= allowed]
        rules.append(_rule("label_in_set", column, not unknown, f"every label must be one of {list(cfg.labels)} "
                           f"(validate.labels)", unknown, [sorted(set(lists[i]) - allowed) for i in unknown],
                           cfg.max_examples))
    joined = lists.map(lambda v: v if v is None else JOIN.join(sorted(set(v))))
    return df.assign(**{column: joined}), rules, []


def label_lists(joined: pd.Series) -> pd.Series:
    return joined.map(lambda s: [x for x in s.split(JOIN) if x] if isinstance(s, str) else list(s))


def label_counts(joined: pd.Series) -> pd.Series:
    """Rows per label (a row counts once for each of its labels), by label name."""
    exploded = label_lists(joined).explode().dropna()
    return exploded.value_counts().sort_index().rename_axis(None).astype(int)


def split_rows(df: pd.DataFrame, cfg: ValidateConfig) -> dict[str, pd.DataFrame]:
    """Seeded iterative stratification (Sechidis et al. 2011, package iterative-stratification): test, then val
    from the rest, each label's rows spread over the splits in proportion. Rows are first ordered by a seeded
    hash of their text, so the result does not depend on the file's row order."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    order = df.assign(_k=df["text"].map(lambda t: hash_order(t, cfg.seed))).sort_values("_k").drop(columns="_k")
    names = sorted(set(label_counts(order["label"]).index))
    y = encode_labels(order["label"].tolist(), names)

    def cut(frame: pd.DataFrame, y: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        msss = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=cfg.seed % 2 ** 32)
        return next(msss.split(np.zeros(len(frame)), y))

    rest, test = cut(order, y, cfg.test_fraction)
    train, val = cut(order.iloc[rest], y[rest], cfg.val_fraction / (1 - cfg.test_fraction))
    return {"train": order.iloc[rest].iloc[train].sort_index(), "val": order.iloc[rest].iloc[val].sort_index(),
            "test": order.iloc[test].sort_index()}


def hash_order(text: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\x00{text}".encode()).hexdigest()


def class_balance(splits: dict[str, pd.DataFrame], labels: list[str]) -> dict[str, Any]:
    """Per-label counts and shares of rows, label cardinality (mean labels per row), the 10 most frequent
    co-occurring pairs, and the baseline of always predicting the train split's most frequent label set."""
    every = pd.concat([f["label"] for f in splits.values()])
    counts = label_counts(every).reindex(labels, fill_value=0)
    rows = max(1, len(every))
    lists = label_lists(every)
    pairs: dict[tuple[str, str], int] = {}
    for row in lists:
        for a, b in itertools.combinations(sorted(row), 2):
            pairs[(a, b)] = pairs.get((a, b), 0) + 1
    top = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    majority = splits["train"]["label"].value_counts().sort_index().idxmax() if len(splits["train"]) else ""
    test = encode_labels(splits["test"]["label"].tolist(), labels)
    guess = np.repeat(encode_labels([majority], labels).astype(np.float64), len(test), axis=0)
    base, _ = scores(test, guess, labels, bins=1)
    shares = {lab: round(int(c) / rows, 6) for lab, c in counts.items()}
    return {"label_counts": {lab: int(c) for lab, c in counts.items()}, "shares": shares,
            "label_cardinality": round(float(lists.map(len).mean()), 6) if len(lists) else 0.0,
            "rows_without_label": int((lists.map(len) == 0).sum()),
            "top_pairs": [{"labels": list(p), "rows": n} for p, n in top],
            "minority": min(labels, key=lambda lab: (shares[lab], lab)),
            "majority": ", ".join(label_lists(pd.Series([majority]))[0]) or "(no label)",
            "baseline": {m: base[m] for m in ("micro_f1", "macro_f1")} | {"accuracy": base["subset_accuracy"]}}


def balance_warnings(balance: dict[str, Any], min_fraction: float) -> list[str]:
    return [f"label '{lab}' is on {share:.1%} of the rows, under validate.min_class_fraction ({min_fraction:.1%}): "
            f"consider train.class_weights: balanced (per-label pos_weight) and register.metric: macro_f1"
            for lab, share in balance["shares"].items() if share < min_fraction]


def floor_warning(balance: dict[str, Any] | None, floor: float, metric: str) -> str | None:
    base = ((balance or {}).get("baseline") or {}).get(metric)
    if base is None or floor > base:
        return None
    return (f"register.floor = {floor} is not above the baseline of always predicting the most frequent label set "
            f"('{balance['majority']}'): it scores {metric} {base:.4f} on the test split")


# ---- decision thresholds, stored with the model; curves for evaluate ----

CURVE_AXES = ("recall", "precision", "ap", "average_precision")  # evaluate's curves: x, y, area, per-label key


def decision_files(val_logits: Callable[[], np.ndarray], val_labels: np.ndarray | None,
                   label_names: list[str]) -> dict[str, Any]:
    """thresholds.json for the model folder: per label, the threshold maximising its F1 on the validation split
    (0.5 where the split has no positive or there is no split)."""
    if val_labels is None or not len(val_labels):
        th, tuned_on = np.full(len(label_names), DEFAULT_THRESHOLD), "none (no validation split): 0.5"
    else:
        th, tuned_on = tune_thresholds(val_labels, probabilities(val_logits())), f"val ({len(val_labels)} rows)"
    return {THRESHOLDS_FILE: {"labels": list(label_names), "thresholds": [round(float(t), 6) for t in th],
                              "tuned_on": tuned_on, "rule": "a label is predicted when its probability >= its "
                                                            "threshold"}}


def read_thresholds(model_dir: str | Path, label_names: list[str]) -> np.ndarray:
    """The model folder's per-label thresholds; a folder without thresholds.json decides at 0.5."""
    path = Path(model_dir) / THRESHOLDS_FILE
    if not path.is_file():
        return np.full(len(label_names), DEFAULT_THRESHOLD)
    stored = json.loads(path.read_text(encoding="utf-8"))
    if stored.get("labels") != list(label_names) or len(stored.get("thresholds", [])) != len(label_names):
        raise ValueError(f"{path}: thresholds for labels {stored.get('labels')}, the model predicts {label_names}")
    return np.asarray(stored["thresholds"], dtype=np.float64)


def curves(y_true: np.ndarray, probs: np.ndarray, label_names: list[str], max_points: int = 1000,
           curves_for: Sequence[int] | None = None) -> dict[str, dict[str, Any]]:
    """Per label, the precision-recall curve (one point per distinct probability, descending) and its average
    precision (sklearn's step-wise definition); a label without positives has none."""
    y = np.asarray(y_true, dtype=bool)
    keep_curve = set(range(len(label_names)) if curves_for is None else (int(i) for i in curves_for))
    out = {}
    for k, lab in enumerate(label_names):
        n_pos = int(y[:, k].sum())
        if not n_pos:
            continue
        order = np.argsort(-probs[:, k], kind="stable")
        scores_k, hits = probs[order, k], y[order, k]
        last = np.r_[np.flatnonzero(np.diff(scores_k)), len(scores_k) - 1]
        tp = np.cumsum(hits)[last]
        precision, recall = tp / (last + 1), tp / n_pos
        ap = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
        if k not in keep_curve:
            out[lab] = {"ap": round(ap, 6)}
            continue
        keep = np.unique(np.linspace(0, len(recall) - 1, min(len(recall), max_points)).round().astype(int))
        out[lab] = {"recall": recall[keep].tolist(), "precision": precision[keep].tolist(),
                    "threshold": scores_k[last][keep].tolist(), "ap": round(ap, 6)}
    return out


def agreement(probs: np.ndarray, reference: np.ndarray, y_true: np.ndarray, label_names: list[str]) -> float:
    """The share of texts given the same label set by ``probs`` and ``reference`` (compress's variants)."""
    same = [a == b for a, b in zip(decide(probs, label_names), decide(reference, label_names))]
    return float(np.mean(same)) if same else 1.0


def sentence_records(split: Any, probs: np.ndarray, label_names: list[str], tok: Any) -> None:
    """None: one prediction per text, written as predictions.csv rows (evaluate)."""


def score_decisions(metric: str, texts: Sequence[str], y_true: Sequence, predictions: Sequence,
                    labels: Sequence[str]) -> float:
    """``metric`` of a pyfunc's predictions (a list of label names per text) against the true label lists."""
    return single_label.score_hard_decisions(sys.modules[__name__], metric, y_true,
                                             [list(p) for p in predictions], labels)

