"""The serving choice on compress's measured front: of the variants within the budget (the drop on the task's
primary metric against the fp32 teacher, optionally a p50 target), the one with the most texts/s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune.common.outputs import ONNX_FP32, ONNX_INT8


@dataclass(frozen=True)
class ServeBudget:
    """What the served variant may cost in accuracy (and take per text): params.yaml serve."""
    max_accuracy_drop: float = 0.01
    max_latency_ms: float = 0.0  # p50 at batch 1; 0: no target


FALLBACK = "pytorch_fp32"


def choose_serving(variants: dict[str, dict[str, Any]], budget: ServeBudget, metric: str = "accuracy",
                   refused_by_gate: tuple[str, ...] = ()) -> dict[str, Any]:
    """The cheapest variant (most texts/s at the measured batch) whose drop on ``metric`` (the task's primary
    one) is within ``budget``, never one the int8 gate refused; none: the fp32 model, and why."""
    base = variants[FALLBACK]
    fits, refused = [], []
    for name, v in variants.items():
        if name == FALLBACK:
            continue
        drop = base[metric] - v[metric]
        if name in refused_by_gate:
            refused.append(f"{name}: refused by compress.max_accuracy_drop")
        elif drop > budget.max_accuracy_drop + 1e-12:
            refused.append(f"{name}: {metric} drop {drop:.4f} > serve.max_accuracy_drop {budget.max_accuracy_drop}")
        elif budget.max_latency_ms and v["latency_ms_p50"] > budget.max_latency_ms:
            refused.append(f"{name}: p50 {v['latency_ms_p50']} ms > serve.max_latency_ms {budget.max_latency_ms}")
        else:
            fits.append(name)
    if not fits:
        return {"variant": FALLBACK, "file": None, "made_by": base.get("made_by", "the teacher as trained"),
                "reason": "no variant within the budget, the fp32 model is served: " + "; ".join(refused)}
    best = max(fits, key=lambda n: variants[n]["texts_per_s"])
    v = variants[best]
    return {"variant": best, "file": variant_file(best), "made_by": v.get("made_by", ""),
            "reason": (f"{best}: the most texts/s ({v['texts_per_s']}, {v.get('speedup')}x fp32 PyTorch) of the "
                       f"{len(fits)} variant(s) within serve.max_accuracy_drop {budget.max_accuracy_drop} "
                       f"(its {metric} drop {base[metric] - v[metric]:.4f})"
                       + (f" and serve.max_latency_ms {budget.max_latency_ms}" if budget.max_latency_ms else ""))}


def variant_file(variant: str) -> str:
    """The ONNX file of a variant inside the compress folder."""
    if variant == "onnx_fp32":
        return ONNX_FP32
    if variant == "onnx_int8":
        return ONNX_INT8
    student, kind = variant.rsplit("_onnx_", 1)
    return f"{student}.onnx" if kind == "fp32" else f"{student}.int8.onnx"
