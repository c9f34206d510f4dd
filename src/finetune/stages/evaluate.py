"""evaluate: score the fine-tuned model on the held-out test split.

Metrics: accuracy, macro-F1, per-class precision/recall/F1, cross-entropy loss, expected calibration
error (ECE), confusion matrix, one-vs-rest ROC AUC per class. metrics.json keeps ``accuracy`` and
``macro_f1`` at top level for `dvc metrics` and KFP; predictions.csv, calibration.csv and roc.csv feed
`dvc plots`.

Memory stays bounded with many classes: the confusion-matrix image, roc.csv and roc.png cover at most
``PLOT_CLASSES`` classes (the most frequent in the test split); every class keeps its ROC AUC in metrics.json,
and metrics.json keeps the full confusion matrix (the KFP component logs it).

Task token (NER): predictions.jsonl (one record per sentence: words, tags, entities) and one line per word in
predictions.csv; roc.png holds the per-type F1 bars and confusion_matrix.png the span-error table (dvc.yaml's names).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from finetune.common.config import Config, EvaluateConfig
from finetune.common.digests import MODEL_DIGEST, model_digest
from finetune.common.files import write_json
from finetune.common.outputs import atomic_dir, check_output_dir
from finetune.common.progress import Progress
from finetune.common.tokens import TokenizedSplit, load_tokenizer, read_tokens, tokenizer_fingerprint
from finetune.reporting import plots
from finetune.tasks import task_for
from finetune.training.model import MismatchError, load_classifier, pick_device, predict_logits

log = logging.getLogger("finetune")  # the stage's own lines: "INFO finetune: ..."

# The plots draw one text per confusion cell and one curve per class: unbounded, 500 classes drove evaluate
# to ~12 GB resident. Beyond this many classes, plots and roc.csv keep the most frequent ones only.
PLOT_CLASSES = 20


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    labels: list[str]
    y_true: np.ndarray
    y_pred: np.ndarray
    confidence: np.ndarray
    calibration: list[dict[str, float]]
    roc: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> the task's curve (ROC: fpr, tpr, ...)
    curve_axes: tuple[str, ...] = ("fpr", "tpr", "auc", "roc_auc")  # the task's CURVE_AXES: x, y, area, per-class key
    sentences: list[dict[str, Any]] | None = None  # per-text records (token: words, tags, entities), else None


def top_classes(y_true: np.ndarray, n_classes: int, k: int = PLOT_CLASSES) -> np.ndarray:
    """Indices of the ``k`` most frequent classes in ``y_true`` (ties: lower index first), in index order
    (class ids, or multi-hot rows: each label's positives)."""
    counts = y_true.sum(axis=0) if y_true.ndim == 2 else np.bincount(y_true, minlength=n_classes)
    return np.sort(np.argsort(-counts, kind="stable")[:k])


def subset(split: TokenizedSplit, idx: np.ndarray) -> TokenizedSplit:
    """The sequences ``idx`` of ``split``, in that order."""
    lengths = split.lengths[idx]
    offsets = np.zeros(len(idx) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate([split.sequence(int(i)) for i in idx]) if len(idx) else split.ids[:0]
    return TokenizedSplit(ids, offsets, split.labels[idx])


def logits_with_progress(model, split: TokenizedSplit, batch_size: int, pad_id: int, device, every: float = 10.0,
                         stream=None, batches_per_update: int = 4) -> np.ndarray:
    """``predict_logits`` with progress: the split is cut, in length order, into runs of a few batches, so
    every batch holds the same texts as one unprogressed pass would, and so gives the same logits."""
    order = np.argsort(split.lengths, kind="stable")
    out = None
    chunk = batch_size * batches_per_update
    with Progress(len(split), "evaluate", "texts", every=every, stream=stream) as progress:
        for start in range(0, len(order), chunk):
            idx = order[start:start + chunk]
            logits = predict_logits(model, subset(split, idx), batch_size, pad_id, device)
            if out is None:  # (rows, labels), or (rows, longest sequence, labels) for a token head
                per_row = (int(split.lengths.max()),) if logits.ndim == 3 else ()
                out = np.zeros((len(split), *per_row, logits.shape[-1]), dtype=logits.dtype)
            out[(idx, slice(0, logits.shape[1])) if logits.ndim == 3 else idx] = logits
            progress.update(len(idx))
    return out if out is not None else np.zeros((0, model.config.num_labels), dtype=np.float32)


def evaluate(model_dir: str | Path, test: TokenizedSplit, meta: dict[str, Any], cfg: EvaluateConfig,
             device: str = "auto") -> EvalResult:
    """Score ``model_dir`` on ``test``. Refuses a model whose labels or tokenizer differ from the data's."""
    model_dir = Path(model_dir)
    digest = model_digest(model_dir)  # binds these figures to these files: register checks it
    labels = meta["labels"]
    tok = load_tokenizer(model_dir)
    if tokenizer_fingerprint(tok) != meta["tokenizer"]:
        raise MismatchError(f"model {model_dir} has tokenizer {tokenizer_fingerprint(tok)}, test data was "
                            f"tokenized with {meta['tokenizer']}")
    dev = pick_device(device)
    model = load_classifier(model_dir, dev)
    model_labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if model_labels != labels:
        raise MismatchError(f"model {model_dir} predicts labels {model_labels}, test data has {labels}")
    task = task_for(meta.get("task", "single_label"))
    thresholds = task.read_thresholds(model_dir, labels)  # stored with the model (multi-label), else None
    probs = task.probabilities(logits_with_progress(model, test, cfg.batch_size, tok.pad_token_id or 0, dev))
    metrics, calib = task.scores(test.labels, probs, labels, cfg.calibration_bins, thresholds)
    if thresholds is not None:  # the figures at the default rule beside the tuned ones
        default, _ = task.scores(test.labels, probs, labels, cfg.calibration_bins)
        metrics["at_default_threshold"] = {m: default[m] for m in task.GATE_METRICS}
        metrics.update({f"{m}_at_0.5": default[m] for m in ("micro_f1", "macro_f1") if m in default})  # MLflow
        metrics["thresholds"] = dict(zip(labels, thresholds.tolist()))
    metrics[MODEL_DIGEST] = digest
    sentences = task.sentence_records(test, probs, labels, tok)
    if sentences is not None:  # per-word tags (NER): entity scores and per-sentence records, no per-text curves
        return EvalResult(metrics, labels, test.labels, probs.argmax(-1), probs.max(-1), calib, {}, task.CURVE_AXES,
                          sentences)
    x, _, area, key = task.CURVE_AXES
    curves = task.curves(test.labels, probs, labels, curves_for=top_classes(test.labels, len(labels)))
    for lab, curve in curves.items():
        metrics["per_class"][lab][key] = curve[area]
    curves = {lab: c for lab, c in curves.items() if x in c}  # curves of the plotted classes only
    decided = probs >= thresholds if thresholds is not None else probs.argmax(1)
    confidence = probs if thresholds is not None else probs.max(1)
    return EvalResult(metrics, labels, test.labels, decided, confidence, calib, curves, task.CURVE_AXES)


def write_evaluation(result: EvalResult, out_dir: str | Path, inputs: Iterable[str | Path] = ()) -> None:
    """metrics.json, predictions.csv, calibration.csv, roc.csv and PNG plots, replacing ``out_dir`` as a whole
    (io.atomic_dir: never a folder another tool wrote, never a half-written one)."""
    with atomic_dir(out_dir, "evaluate", inputs) as tmp:
        _write_files(result, tmp)


def _write_files(result: EvalResult, out: Path) -> None:
    names = result.labels
    with (out / "predictions.csv").open("w", encoding="utf-8") as fh:
        if result.sentences is not None:  # one line per word (dvc's confusion template over the tags)
            _write_sentences(result.sentences, out, fh)
        elif result.y_true.ndim == 2:  # multi-hot rows: the label sets (| between labels), each label's probability
            fh.write(",".join(["actual", "predicted", *(_csv_field(f"p_{n}") for n in names)]) + "\n")
            fh.writelines(f"{_label_set(names, a)},{_label_set(names, p)},{','.join(f'{x:.6f}' for x in c)}\n"
                          for a, p, c in zip(result.y_true, result.y_pred, result.confidence))
        else:
            fh.write("actual,predicted,confidence\n")
            fh.writelines(f"{names[a]},{names[p]},{c:.6f}\n" for a, p, c in
                          zip(result.y_true, result.y_pred, result.confidence))
    with (out / "calibration.csv").open("w", encoding="utf-8") as fh:
        fh.write("confidence,accuracy,count\n")
        fh.writelines(f"{r['confidence']},{r['accuracy']},{r['count']}\n" for r in result.calibration if r["count"])
    x, y = result.curve_axes[:2]
    with (out / "roc.csv").open("w", encoding="utf-8") as fh:  # long format: one line per class (dvc plots template)
        fh.write(f"class,{x},{y},threshold\n")
        for lab, c in result.roc.items():
            fh.writelines(f"{_csv_field(lab)},{f:.6f},{t:.6f},{th:.6f}\n"
                          for f, t, th in zip(c[x], c[y], c["threshold"]))
    _plots(result, out)
    write_json(out / "metrics.json", result.metrics)


def _write_sentences(sentences: list[dict[str, Any]], out: Path, fh) -> None:
    """predictions.jsonl: one record per sentence; predictions.csv (``fh``): one line per word."""
    with (out / "predictions.jsonl").open("w", encoding="utf-8") as jl:
        jl.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in sentences)
    fh.write("sentence,word,actual,predicted\n")
    fh.writelines(f"{i},{_csv_field(w)},{a},{p}\n" for i, r in enumerate(sentences)
                  for w, a, p in zip(r["words"], r["true"], r["predicted"]))


def _label_set(names: list[str], row: np.ndarray) -> str:
    return _csv_field("|".join(n for n, on in zip(names, row) if on))


def _csv_field(value: str) -> str:
    return '"' + value.replace('"', '""') + '"' if any(ch in value for ch in ',"\n') else value


def _plots(result: EvalResult, out: Path) -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")

    matplotlib.use("Agg")

    if result.sentences is not None:  # NER: the span-error table and the per-type F1 bars
        _calibration_plot(result, out)
        (out / "confusion_matrix.png").write_bytes(plots.span_errors(result.metrics["span_errors"]))
        (out / "roc.png").write_bytes(plots.per_type_f1(result.metrics["per_class"], result.metrics["entity_micro_f1"]))
        return
    top = top_classes(np.asarray(result.y_true), len(result.labels))
    names = [result.labels[i] for i in top]
    if "confusion_matrix" in result.metrics:
        cm, xs, title = np.array(result.metrics["confusion_matrix"])[np.ix_(top, top)], names, \
            f"confusion matrix (accuracy {result.metrics['accuracy']:.3f})"
    else:  # multi-label: one row per label, its tp / fp / fn / tn on the test split
        cm, xs, title = np.array([[result.metrics["label_confusion"][n][k] for k in ("tp", "fp", "fn", "tn")]
                                  for n in names]), ["tp", "fp", "fn", "tn"], \
            f"per-label confusion (micro-F1 {result.metrics['micro_f1']:.3f})"
    fig, ax = plt.subplots(figsize=(4 + 0.4 * len(xs), 3.5 + 0.4 * len(names)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(xs)), xs, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    if len(names) < len(result.labels):
        title += f"\n{len(names)} most frequent of {len(result.labels)} classes; full counts in metrics.json"
    ax.set_title(title, fontsize="small" if len(names) < len(result.labels) else None)
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png", dpi=100)
    plt.close(fig)
    _calibration_plot(result, out)
    _curves_plot(result, out)


def _calibration_plot(result: EvalResult, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    pts = [r for r in result.calibration if r["count"]]
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect")
    ax.plot([r["confidence"] for r in pts], [r["accuracy"] for r in pts], "o-", label="model")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {result.metrics['ece']:.3f})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "calibration.png", dpi=100)
    plt.close(fig)


def _curves_plot(result: EvalResult, out: Path) -> None:
    """The task's per-class curves: ROC (one class vs the rest) or precision-recall (per label)."""
    x, y, area = result.curve_axes[:3]
    roc = x == "fpr"
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if roc:
        ax.plot([0, 1], [0, 1], "--", color="grey", label="chance")
    for lab, c in result.roc.items():
        ax.plot(c[x], c[y], label=f"{lab} ({area.upper()} {c[area]:.3f})")
    ax.set_xlabel("false positive rate" if roc else "recall")
    ax.set_ylabel("true positive rate" if roc else "precision")
    shown = f", {len(result.roc)} most frequent of {len(result.labels)} classes" \
        if len(result.labels) > PLOT_CLASSES else ""
    ax.set_title(f"{'ROC, one class vs the rest' if roc else 'precision-recall per label'}{shown}",
                 fontsize="small" if shown else None)
    ax.legend(loc="lower right" if roc else "lower left", fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=100)
    plt.close(fig)


def scalar_scores(result: dict[str, Any]) -> dict[str, float]:
    """The task's single-number scores in ``result`` (metrics.json), for a dashboard: its floats; counts, tables
    and per-class blocks are not single scores."""
    return {key: value for key, value in result.items() if isinstance(value, float)}


def run_evaluate(cfg: Config, model: str | Path, tokens: str | Path, out: str | Path) -> dict[str, Any]:

    check_output_dir(out, [model, tokens])  # before the work, not after it
    toks, meta = read_tokens(tokens, names=("test",))
    result = evaluate(model, toks["test"], meta, cfg.evaluate, device=cfg.train.device)
    write_evaluation(result, out, [model, tokens])
    log.info("test %s", ", ".join(f"{m} {result.metrics[m]:.4f}" for m in task_for(cfg.task).GATE_METRICS))
    return result.metrics
