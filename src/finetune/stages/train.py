"""train: fine-tune the base model on the tokenized train split.

Plain PyTorch loop, read as setup -> resume -> loop -> export (``training/recipe.py``, ``training/loop.py``).
Batches are length-grouped with dynamic padding, or packed into fixed-size token streams (``train.pack_tokens``:
one shape, so one compiled graph). AdamW, linear warm-up + decay, bf16 autocast on CUDA, fp32 on CPU. The loss
stays on the device and is read every ``log_every`` steps (no host sync per step). Seeded: same params + data give
the same model on CPU. Checkpoints (``training/checkpoint.py``) are written every ``checkpoint_every`` steps; a
rerun resumes its own newest one. Regimes (``training/regimes.py``, ``training/early_stopping.py``): frozen layers,
class-weighted loss, FGM adversarial training, and best-evaluation selection with early stopping (rank 0 decides,
every rank stops at the same step).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from finetune.common.base_model import check_model_limits, resolve_base
from finetune.common.config import Config, TrainConfig
from finetune.common.files import write_json
from finetune.common.outputs import check_output_dir, check_output_place
from finetune.common.tokens import TokenizedSplit, read_tokens
from finetune.training.loop import train_loop
from finetune.training.recipe import TrainResult, export_run, resume_run, setup_run

log = logging.getLogger("finetune")  # the stage's own lines: "INFO finetune: ..."


def train(tokens: dict[str, TokenizedSplit], meta: dict[str, Any], base_model: str | Path, cfg: TrainConfig,
          model_out: str | Path, checkpoint_dir: str | Path | None = None,
          on_step: Callable[[dict[str, float]], None] | None = None,
          on_eval: Callable[[dict[str, float]], None] | None = None) -> TrainResult:
    """Fine-tune ``base_model`` on ``tokens['train']``; write the model folder to ``model_out`` atomically.

    Under torchrun every rank takes an equal share of each global batch; the loss is normalised by the global
    batch, so the update equals a single process's with the same ``batch_size`` (up to dropout noise).
    ``on_step`` gets each step's row when the losses are read (every ``log_every`` steps). ``on_eval`` gets each
    validation row (step, val_loss, val_accuracy) on rank 0; an exception it raises (a pruned trial) ends training.
    """
    run = setup_run(tokens, meta, base_model, cfg)
    state = resume_run(run, meta, checkpoint_dir)
    train_loop(run, state, on_step, on_eval)
    return export_run(run, state, model_out)


def write_history(result: TrainResult, out_dir: str | Path) -> None:
    """Loss curve as CSV (DVC plots) and a JSON summary (DVC metrics), written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".loss.csv.tmp-{os.getpid()}"
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write("step,loss,lr\n")
        fh.writelines(f"{h['step']},{h['loss']:.6f},{h['lr']:.8g}\n" for h in result.history)
    tmp.replace(out / "loss.csv")
    with (out / "val.csv").open("w", encoding="utf-8") as fh:
        fh.write("step,val_loss,val_accuracy,val_macro_f1\n")
        fh.writelines(f"{h['step']},{h['val_loss']:.6f},{h['val_accuracy']:.6f},{h['val_macro_f1']:.6f}\n"
                      for h in result.val_history)
    summary = {k: v for k, v in asdict(result).items() if k not in ("history",)}
    write_json(out / "summary.json", summary)


def run_train(cfg: Config, tokens: str | Path, model: str | Path, logs: str | Path,
              checkpoints: str | Path | None = None) -> dict[str, Any]:
    """The train stage: refuse wrong output folders before the work, train, then (rank 0) write the resolved
    config next to the model, and the loss curves and summary to ``logs``."""
    base = resolve_base(cfg.model.base)
    check_model_limits(cfg, base)
    # train replaces the model folder (atomic_dir) only after training: refuse a wrong --model before it
    check_output_dir(model, [tokens, base, *([checkpoints] if checkpoints else []), logs])
    check_output_place(logs, [tokens, base, model])  # the logs are written by name; still never the project root
    toks, meta = read_tokens(tokens)
    result = train(toks, meta, base, cfg.train, model, checkpoints)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 writes
        return {}
    write_json(Path(model) / "finetune_config.json", cfg.to_dict())  # the resolved config travels with the model
    write_history(result, logs)
    log.info("trained %d steps in this run (steps %d-%d; %d before the resume) in %.1fs (%.1f samples/s), "
             "%d trainable parameters; %s; exported step %d: val accuracy %.4f", result.steps_run,
             result.resumed_from_step + 1, result.steps, result.resumed_from_step, result.seconds,
             result.samples_per_second, result.trainable_parameters, result.stop_reason, result.exported_step,
             result.val_accuracy)
    return {k: v for k, v in asdict(result).items() if k != "history"}
