"""distill: a smaller student of the trained model (the teacher), for cheaper serving.

A stage of its own, between evaluate and compress, not a step inside compress: it trains (minutes, checkpoints,
resume) while compress measures (seconds), so DVC reruns neither for the other's settings, and a failed or killed
student never costs the measured variants. The student keeps ``distill.layers`` of the teacher's encoder (two
of every three by default), its embeddings and head, and learns on the train split from the teacher's soft targets
and hidden states (``training/distill.py``) through train's loop; the best validation weights are exported.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from finetune.common.config import Config
from finetune.common.files import write_json
from finetune.common.outputs import atomic_dir, check_output_dir
from finetune.common.tokens import read_tokens
from finetune.training.distill import SUPPORTED_TASKS, distill, labels_only

log = logging.getLogger("finetune")

SUMMARY = "distill.json"


def run_distill(cfg: Config, model: str | Path, tokens: str | Path, out: str | Path,
                checkpoints: str | Path | None = None) -> dict[str, Any]:
    """Train the student of ``model`` and write it to ``out`` (a model folder, with distill.json: its lineage)."""
    check_output_dir(out, [model, tokens, *([checkpoints] if checkpoints else [])])
    skipped = skip_reason(cfg)
    if skipped:
        if checkpoints:  # dvc's out (persist, not cached): it must exist after the stage, student or not
            Path(checkpoints).mkdir(parents=True, exist_ok=True)
        return _skipped(out, skipped, [model, tokens])
    toks, meta = read_tokens(tokens)
    task = cfg.task
    result, info = distill(toks, meta, model, cfg.train, cfg.distill, out, checkpoints, task)
    summary = {**info, "teacher": str(model), "seconds": result.seconds, "steps": result.steps,
               "stop_reason": result.stop_reason, "val_accuracy": result.val_accuracy,
               "val_macro_f1": result.val_macro_f1, "exported_step": result.exported_step,
               "val_history": result.val_history,
               "made_by": made_by(cfg.distill, info)}
    write_json(Path(out) / SUMMARY, summary)
    log.info("distill: student of %d layers (%d of the teacher's %d parameters) trained %d steps in %.1fs; "
             "soft-target loss %.4f -> %.4f; %s; val accuracy %.4f", len(info["student_layers"]),
             info["student_parameters"], info["teacher_parameters"], result.steps, result.seconds,
             info["soft_loss_first"] or 0.0, info["soft_loss_last"] or 0.0, result.stop_reason,
             result.val_accuracy)
    return summary


def made_by(dcfg, info: dict[str, Any]) -> str:
    """How the student was made, in one line (its lineage in the registry)."""
    hidden = f", hidden-state transfer weight {dcfg.hidden_weight:g}" if dcfg.hidden_weight > 0 else ""
    kind = "layer drop, labels only" if labels_only(dcfg.alpha, dcfg.hidden_weight) else "distilled"
    return (f"{kind}: teacher layers {info['student_layers']} "
            f"of {info['teacher_layers']}, T={dcfg.temperature:g}, alpha={dcfg.alpha:g}{hidden}")


def skip_reason(cfg: Config) -> str | None:
    """Why no student is trained (the stage still writes its folder, so dvc's outs and compress's input exist)."""
    if not cfg.distill.enabled:
        return "distill.enabled is false"
    if cfg.task not in SUPPORTED_TASKS:
        return f"task {cfg.task!r} has no distillation yet (supported: {', '.join(SUPPORTED_TASKS)})"
    return None


def _skipped(out: str | Path, reason: str, inputs: list[str | Path]) -> dict[str, Any]:
    summary = {"skipped": reason}
    with atomic_dir(out, "distill", inputs) as tmp:
        write_json(tmp / SUMMARY, summary)
    log.info("distill: no student (%s); compress measures the teacher's variants", reason)
    return summary
