"""compare: two registered models (challenger vs champion by default) or two MLflow runs side by side:
primary metrics, macro-F1, per-class F1, and the params (and lineage) that differ."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune.common import tracking
from finetune.common.config import Config
from finetune.registry.comparison import Side, read_sides

# single-label's, then multi-label's (accuracy = subset accuracy there), then NER's (accuracy = token accuracy,
# macro_f1 = entity macro-F1, per-class F1 = per entity type): a pair shows the rows either side has
PRIMARY = ("accuracy", "macro_f1", "loss", "ece", "n", "micro_f1", "samples_f1", "hamming_loss", "micro_f1_at_0.5",
           "macro_f1_at_0.5", "entity_micro_f1", "entity_micro_precision", "entity_micro_recall", "entity_macro_f1",
           "token_accuracy")


LOWER_IS_BETTER = {"loss", "ece", "hamming_loss"}






@dataclass
class Comparison:
    base: Side
    other: Side
    metrics: list[tuple[str, float | None, float | None]]
    per_class_f1: list[tuple[str, float | None, float | None]]
    differing: list[tuple[str, str | None, str | None]]


def compare(base: Side, other: Side) -> Comparison:
    """``other`` measured against ``base``. Per-class F1 comes from the ``f1_<label>`` metrics the register
    stage logs; lineage tags (``lineage.*``) that differ are listed with the params (weights' hashes are not)."""
    def pair(key):
        return key, base.metrics.get(key), other.metrics.get(key)

    metrics = [pair(k) for k in PRIMARY if k in base.metrics or k in other.metrics]
    classes = sorted({k[3:] for k in (*base.metrics, *other.metrics) if k.startswith("f1_")})
    per_class = [(lab, *pair(f"f1_{lab}")[1:]) for lab in classes]
    a = {**base.params, **{k: v for k, v in base.tags.items() if k.startswith("lineage.")}}
    b = {**other.params, **{k: v for k, v in other.tags.items() if k.startswith("lineage.")}}
    # the weights' hashes always differ between two models: not worth a row
    differing = [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
                 if a.get(k) != b.get(k) and not k.startswith("weights_sha256")]
    return Comparison(base, other, metrics, per_class, differing)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.0f}" if v.is_integer() and abs(v) >= 10 else f"{v:.4f}"
    return str(v).replace("|", "\\|")


def _change(key: str, a: float | None, b: float | None) -> str:
    if a is None or b is None or key == "n":
        return ""
    d = b - a
    if abs(d) < 5e-5:
        return "="
    better = d < 0 if key in LOWER_IS_BETTER else d > 0
    return f"{d:+.4f} ({'better' if better else 'worse'})"


def format_comparison(c: Comparison) -> str:
    """Markdown tables (they read fine in a terminal too)."""
    head = f"| | {c.base.title} | {c.other.title} | change |\n|---|---:|---:|---|"
    lines = [f"{c.other.title} (run {c.other.run_id}) against {c.base.title} (run {c.base.run_id})", "", head]
    lines += [f"| {k} | {_fmt(a)} | {_fmt(b)} | {_change(k, a, b)} |" for k, a, b in c.metrics]
    if c.per_class_f1:
        lines += ["", head.replace("| |", "| F1 per class |", 1)]
        lines += [f"| {lab} | {_fmt(a)} | {_fmt(b)} | {_change('f1', a, b)} |" for lab, a, b in c.per_class_f1]
    lines += [""]
    if c.differing:
        lines += [f"| param | {c.base.title} | {c.other.title} |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(a)} | {_fmt(b)} |" for k, a, b in c.differing]
    else:
        lines.append("Params and lineage: identical.")
    return "\n".join(lines) + "\n"


def run_compare(cfg: Config, model: str | None, aliases: tuple[str, str], runs: tuple[str, str] | None) -> str:
    """`finetune compare`: the comparison of two aliases of ``model`` (default: register.model_name), or of two
    runs, read from the project's tracking store (or MLFLOW_TRACKING_URI)."""
    uri, _ = tracking.configure(".")
    tracking.require_reachable(uri)
    base, other = read_sides(uri, model or cfg.register.model_name, aliases, runs)
    return format_comparison(compare(base, other))
