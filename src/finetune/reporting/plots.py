"""PNG plots drawn at report time from the stages' CSV/JSON outputs (so restyling a plot reruns no training).

Each function takes plain data and returns PNG bytes.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any

import matplotlib
import matplotlib.pyplot as plt


def _pyplot():
    os.environ.setdefault("MPLBACKEND", "Agg")

    matplotlib.use("Agg")

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    _pyplot().close(fig)
    return buf.getvalue()


def training_curves(loss: list[dict[str, float]], val_history: list[dict[str, Any]] | None = None) -> bytes:
    """Training loss per step (raw and smoothed); validation loss and accuracy at each evaluation, if any."""
    plt = _pyplot()
    val = [v for v in (val_history or []) if math.isfinite(float(v.get("val_loss", math.nan)))]
    fig, axes = plt.subplots(1, 2 if val else 1, figsize=(10 if val else 6, 3.6), squeeze=False)
    ax = axes[0][0]
    steps = [r["step"] for r in loss]
    values = [r["loss"] for r in loss]
    ax.plot(steps, values, color="#9ecae1", linewidth=0.8, label="train loss")
    window = max(1, len(values) // 25)
    if window > 1:  # trailing mean over `window` steps (fewer at the start)
        import numpy as np

        csum = np.r_[0.0, np.cumsum(values)]
        ends = np.arange(1, len(values) + 1)
        starts = np.maximum(0, ends - window)
        smooth = (csum[ends] - csum[starts]) / (ends - starts)
        ax.plot(steps, smooth, color="#08519c", linewidth=1.6, label=f"train loss, mean of {window} steps")
    if val:
        ax.plot([v["step"] for v in val], [v["val_loss"] for v in val], "o-", color="#e6550d", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title("loss")
    ax.legend(fontsize="small")
    if val:
        ax = axes[0][1]
        ax.plot([v["step"] for v in val], [v["val_accuracy"] for v in val], "o-", color="#31a354")
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy")
        ax.set_title("validation accuracy")
    return _png(fig)


def length_distribution(rows: list[dict[str, float]], max_length: int | None = None) -> bytes:
    """Share of texts per token length, one line per split (rows as in tokenize's lengths.csv)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    splits = [k for k in (rows[0] if rows else {}) if k != "length"]
    for name in splits:
        ax.plot([r["length"] for r in rows], [r[name] for r in rows], label=name, linewidth=1.2)
    if max_length:
        ax.axvline(max_length, color="grey", linestyle="--", linewidth=0.8, label=f"max_length {max_length}")
    ax.set_xlabel("tokens per text")
    ax.set_ylabel("share of texts")
    ax.set_title("token length per split")
    ax.legend(fontsize="small")
    return _png(fig)


def search(trials: list[dict[str, Any]], importances: dict[str, float], metric: str, direction: str) -> bytes:
    """A hyperparameter search: each finished trial's value (pruned ones at their last validation value) with the
    best so far, and the parameters' importance (PED-ANOVA) when there were enough trials to compute it."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 if importances else 1, figsize=(10 if importances else 6, 3.6), squeeze=False)
    ax = axes[0][0]
    best, best_line = None, []
    for t in trials:
        if t["state"] == "COMPLETE":
            better = max if direction == "maximize" else min
            best = t["value"] if best is None else better(best, t["value"])
        best_line.append(best)
    for state, style in (("COMPLETE", dict(color="#08519c", marker="o")), ("PRUNED", dict(color="#bdbdbd", marker="x")),
                         ("FAIL", dict(color="#de2d26", marker="v"))):
        points = [(t["number"], t["value"]) for t in trials if t["state"] == state and t["value"] is not None]
        if points:
            ax.scatter([p[0] for p in points], [p[1] for p in points], label=state.lower(), **style)
    ax.step([t["number"] for t in trials], [float("nan") if b is None else b for b in best_line], where="post",
            color="#e6550d", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{metric} (validation)")
    ax.set_title("trials")
    ax.legend(fontsize="small")
    if importances:
        ax = axes[0][1]
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="#31a354")
        ax.set_xlabel("importance (PED-ANOVA)")
        ax.set_title("parameter importance")
    return _png(fig)


def per_type_f1(per_type: dict[str, dict[str, Any]], micro_f1: float) -> bytes:
    """NER: entity F1 per type (exact span and type), with each type's support, and the micro-F1 as a line."""
    plt = _pyplot()
    types = sorted(per_type)
    fig, ax = plt.subplots(figsize=(4 + 0.45 * len(types), 3.6))
    bars = ax.bar(types, [per_type[t]["f1"] for t in types], color="#0969da")
    for bar, t in zip(bars, types):
        ax.annotate(f"n={per_type[t]['support']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize="small")
    ax.axhline(micro_f1, color="grey", linestyle="--", label=f"micro-F1 {micro_f1:.3f}")
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("entity F1")
    ax.set_title("per-type F1 (exact span and type)")
    ax.tick_params(axis="x", labelrotation=45)
    ax.legend(loc="upper right", fontsize="small")
    return _png(fig)


def span_errors(table: dict[str, dict[str, int]]) -> bytes:
    """NER: per entity type, its entities found exactly and each kind of span error, as a heat map."""
    plt = _pyplot()
    types = sorted(table)
    kinds = ["correct", "missed", "wrong_type", "wrong_boundary", "spurious"]
    cells = [[table[t].get(k, 0) for k in kinds] for t in types]
    fig, ax = plt.subplots(figsize=(6, 2 + 0.4 * max(1, len(types))))
    top = max((v for row in cells for v in row), default=0) or 1
    ax.imshow(cells or [[0] * len(kinds)], cmap="Blues", vmin=0, vmax=top, aspect="auto")
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
    ax.set_yticks(range(len(types)), types)
    for i, row in enumerate(cells):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    ax.set_title("span errors per entity type (test split)")
    return _png(fig)


def serving_front(variants: dict[str, dict[str, Any]], chosen: str | None) -> bytes:
    """Test accuracy against texts/s at the measured batch, one numbered point per variant (names in the legend:
    the fp32 variants crowd one corner, where names beside the points overlapped); the served one starred."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for number, (name, v) in enumerate(variants.items(), 1):
        served = name == chosen
        ax.scatter(v["texts_per_s"], v["accuracy"], marker="*" if served else "o", s=160 if served else 40,
                   label=f"{number}  {name}{'  (served)' if served else ''}")
        ax.annotate(str(number), (v["texts_per_s"], v["accuracy"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_xlabel("texts/s (higher is cheaper)")
    ax.set_ylabel("test accuracy")
    ax.set_title("serving variants: accuracy against throughput (star: served)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _png(fig)
