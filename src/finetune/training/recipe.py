"""The steps a training run is made of: setup, resume, the loop (``loop.py``) and export. stages/train.py's
``train()`` composes them, torchtune-recipe style; each step takes the run it was given and hands on plain state.

setup builds what stays fixed for the run (:class:`TrainRun`: tokenizer, model, step plan, optimizer, regimes);
resume finds the run's own newest checkpoint or starts fresh (:class:`TrainState`: where the run stands); export
writes the weights (the best evaluation's with ``keep_best``) atomically and sums the run up (:class:`TrainResult`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from finetune.common.config import TrainConfig
from finetune.common.files import write_json
from finetune.common.outputs import atomic_dir
from finetune.common.tokens import TokenizedSplit, load_tokenizer, tokenizer_fingerprint
from finetune.tasks import task_for
from finetune.training import checkpoint
from finetune.training.decoder import is_decoder
from finetune.training.decoder_resources import check_fits, footprint
from finetune.training.distributed import Dist
from finetune.training.early_stopping import Selection
from finetune.training.model import build_model, build_optimizer, exportable, predict_logits, seed_everything
from finetune.training.packing import PackShape, can_pack, inner_model, pack_shape
from finetune.training.regimes import FGM, freeze
from finetune.training.step_plan import StepPlan

log = logging.getLogger("finetune")  # the stage's own lines: "INFO finetune: ..."


class TrainingError(RuntimeError):
    pass


@dataclass
class TrainRun:
    """What setup builds: fixed for the whole run."""
    cfg: TrainConfig
    base: Path
    tok: Any  # the base model's tokenizer (saved with the weights)
    dist: Dist
    model: torch.nn.Module
    shape: PackShape | None  # None: padded batches
    plan: StepPlan
    per_epoch: int  # optimizer steps in epoch 0
    total: int  # optimizer steps of the whole run
    opt: torch.optim.Optimizer
    sched: Any
    weights: torch.Tensor | None  # class weights of the loss
    fgm: FGM | None
    val: TokenizedSplit | None
    pad_id: int
    trainable: int  # trainable parameters
    task: Any = None  # the task's module (finetune.tasks): loss, validation scores
    loss_fn: Callable | None = None  # replaces the loop's cross-entropy (distillation's soft targets)


@dataclass
class TrainState:
    """Where the run stands: set by resume, advanced by the loop, read by export."""
    ckpt_root: Path | None
    identity: dict[str, Any]  # checkpoints carry it; a run resumes only its own
    selection: Selection
    start: int = 0  # the step resumed from
    step: int = 0
    epoch: int = 0
    done_before: int = 0  # steps of the epochs before ``epoch``
    samples: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    val_history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, torch.Tensor] | None = None  # rank 0's CPU copy of the best evaluation's weights (keep_best)
    stop: bool = False  # early stopping (or a pruned trial) ended the loop
    seconds: float = 0.0
    stop_reason: str = ""


@dataclass
class TrainResult:
    steps: int
    epochs_run: float
    final_loss: float
    val_loss: float  # val_* : of the exported weights (the best evaluation with keep_best, else the last)
    val_accuracy: float
    device: str
    seconds: float
    samples_per_second: float
    resumed_from_step: int = 0
    steps_run: int = 0  # steps this process ran (steps - resumed_from_step)
    packed: bool = False
    parameters: int = 0
    trainable_parameters: int = 0
    world_size: int = 1
    history: list[dict[str, float]] = field(default_factory=list)  # one row per step: step, loss, lr, rows
    val_history: list[dict[str, float]] = field(default_factory=list)  # one row per evaluation
    val_macro_f1: float = float("nan")
    select_metric: str = "val_loss"
    best_step: int | None = None  # the evaluation with the best select_metric
    best_value: float | None = None
    exported_step: int = 0  # the step whose weights were exported
    stop_reason: str = ""
    freeze: str = "none"


# ---- setup ----

def setup_run(tokens: dict[str, TokenizedSplit], meta: dict[str, Any], base_model: str | Path,
              cfg: TrainConfig, reshape: Callable | None = None) -> TrainRun:
    """Tokenizer check, device and seeds, model (with frozen layers), step plan, optimizer, loss regimes.
    ``reshape`` (distillation: keep some layers) turns the loaded model into the one trained, before the optimizer."""
    base = Path(base_model)
    tok = _checked_tokenizer(base, meta)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = task_for(meta.get("task", "single_label"))  # tokens made before tasks existed are single-label
    refused = task.refused_regime(cfg)
    if refused:
        raise TrainingError(refused)
    dist = Dist(cfg.device)
    seed_everything(cfg.seed)
    fp = footprint(base, meta["labels"], cfg, int(meta.get("max_length") or 512), dist.device, tok.pad_token_id,
                   task)
    check_fits(fp, cfg, dist.device, quiet=not dist.main)  # before any weight is read; every rank refuses alike
    model, mcfg = build_model(base, meta["labels"], cfg, dist.device, tok.pad_token_id, task)
    if reshape is not None:
        model = reshape(model)
    freeze(model, cfg.freeze)  # before the optimizer is built: frozen weights stay out of it
    torch.manual_seed(cfg.seed + dist.rank)  # per-rank dropout streams; weights are synced from rank 0 later
    if mcfg.vocab_size < meta["tokenizer"]["vocab_size"]:
        raise TrainingError(f"model vocab {mcfg.vocab_size} < tokenizer vocab {meta['tokenizer']['vocab_size']}")

    train_split, val = tokens["train"], tokens.get("val")
    shape = _pack_shape(cfg, model, train_split)
    pad_id = tok.pad_token_id or 0
    mult = min(cfg.pad_to_multiple_of, max(1, getattr(mcfg, "max_position_embeddings", 512)))
    plan = StepPlan(train_split, cfg, dist.world, dist.rank, pad_id, mult, shape, dist.device)
    per_epoch = len(plan.groups(0))
    total = math.ceil(cfg.epochs * per_epoch)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    opt, sched = build_optimizer(model, cfg, total, dist.device)
    weights = task.loss_weights(cfg.class_weights, train_split.labels, meta["labels"])
    weights = weights.to(dist.device) if weights is not None else None
    fgm = FGM(model, cfg.adversarial.epsilon) if cfg.adversarial.enabled else None
    if (cfg.keep_best or cfg.patience) and (val is None or len(val) == 0):
        raise TrainingError("train.keep_best / train.patience need a validation split (tokens['val'] is empty)")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("trainable parameters: %d of %d (train.freeze=%s, lora %s)", trainable,
             sum(p.numel() for p in model.parameters()), cfg.freeze, "on" if cfg.lora.enabled else "off")
    return TrainRun(cfg, base, tok, dist, model, shape, plan, per_epoch, total, opt, sched, weights, fgm, val,
                    pad_id, trainable, task)


def _checked_tokenizer(base: Path, meta: dict[str, Any]):
    """The base model's tokenizer, refused unless it is the one the tokens were made with."""
    tok = load_tokenizer(base)
    if tokenizer_fingerprint(tok) != meta["tokenizer"]:
        raise TrainingError(f"tokens were made with a different tokenizer ({meta['tokenizer']}) than the base "
                            f"model's ({tokenizer_fingerprint(tok)}): rerun tokenize")
    return tok


def _pack_shape(cfg: TrainConfig, model, split: TokenizedSplit) -> PackShape | None:
    """The packed shape, or None for padded batches (packing off, or a model type it cannot pack)."""
    if not cfg.pack_tokens:
        return None
    if not can_pack(model):
        log.info("train.pack_tokens=%d: model type %r cannot be packed; training on padded batches",
                 cfg.pack_tokens, getattr(model.config, "model_type", None))
        return None
    try:
        return pack_shape(split, cfg.pack_tokens)
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc


# ---- resume ----

def resume_run(run: TrainRun, meta: dict[str, Any], checkpoint_dir: str | Path | None) -> TrainState:
    """The run's own newest checkpoint restored into model, optimizer and scheduler, or a fresh start (which
    clears checkpoints of another config or data: never resume from them)."""
    cfg, dist = run.cfg, run.dist
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir else None
    state = TrainState(ckpt_root, checkpoint.run_identity(cfg, meta, run.base),
                       Selection(cfg.select_metric, cfg.patience, cfg.min_delta))
    latest = checkpoint.find(ckpt_root, state.identity)
    if latest is not None:
        state.start, state.history = checkpoint.load(latest, run.model, run.opt, run.sched)
        extra, state.best = checkpoint.load_extra(latest)
        state.val_history = extra.get("val_history", [])
        state.selection = Selection(cfg.select_metric, cfg.patience, cfg.min_delta, extra.get("selection"))
        log.info("resuming from checkpoint %s (step %d of %d)", latest, state.start, run.total)
    elif dist.main:
        checkpoint.clear(ckpt_root)
    if ckpt_root is not None and dist.main:
        ckpt_root.mkdir(parents=True, exist_ok=True)  # a DVC output: exists even when no checkpoint is written
    dist.barrier()
    state.step = state.start
    state.epoch, state.done_before = _locate(run.plan, state.start, run.total)
    return state


def _locate(plan: StepPlan, start: int, total: int) -> tuple[int, int]:
    """The epoch holding step ``start`` and the steps before it (epochs can differ in length)."""
    epoch, done_before = 0, 0
    while done_before + len(plan.groups(epoch)) <= start and done_before + len(plan.groups(epoch)) < total:
        done_before += len(plan.groups(epoch))
        epoch += 1
    return epoch, done_before


# ---- export ----

def export_run(run: TrainRun, state: TrainState, model_out: str | Path) -> TrainResult:
    """Write the exported weights and the tokenizer to ``model_out`` atomically (rank 0); the run's summary."""
    exported_step = state.step
    if run.cfg.keep_best and state.best is not None:  # rank 0 only holds (and exports) it
        run.model.load_state_dict(state.best)
        exported_step = state.selection.best_step
    log.info("%s; exporting the weights of step %d", state.stop_reason, exported_step)
    if run.dist.main:
        # what the task stores beside the weights (multi-label: thresholds tuned on the validation split)
        labels = [run.model.config.id2label[i] for i in range(run.model.config.num_labels)]
        decision = run.task.decision_files(lambda: predict_logits(run.model, run.val, 128, run.pad_id, run.dist.device),
                                           run.val.labels if run.val is not None else None, labels)
        with atomic_dir(model_out, "train") as tmp:
            exportable(run.model, run.base, run.cfg, run.task).save_pretrained(tmp, safe_serialization=True)
            if is_decoder(inner_model(run.model).config):
                run.tok.padding_side = "right"  # the pipeline pads on the right (absolute positions: GPT-2)
            run.tok.save_pretrained(tmp)
            for name, content in decision.items():
                write_json(tmp / name, content)
        checkpoint.clear(state.ckpt_root)  # the finished model supersedes them; they only serve a killed run
    run.dist.barrier()
    return _result(run, state, exported_step)


def _result(run: TrainRun, state: TrainState, exported_step: int) -> TrainResult:
    nan = float("nan")
    shown = next((r for r in state.val_history if r["step"] == exported_step),
                 {"val_loss": nan, "val_accuracy": nan, "val_macro_f1": nan})
    history, step, seconds = state.history, state.step, state.seconds
    tail = [h["loss"] for h in history[-max(1, min(20, len(history))):]]
    return TrainResult(steps=step, epochs_run=round(step / run.per_epoch, 3), final_loss=float(np.mean(tail)),
                       val_loss=shown["val_loss"], val_accuracy=shown["val_accuracy"], device=str(run.dist.device),
                       seconds=round(seconds, 2), samples_per_second=round(state.samples / max(seconds, 1e-9), 2),
                       resumed_from_step=state.start, steps_run=step - state.start, packed=run.shape is not None,
                       parameters=sum(p.numel() for p in run.model.parameters()), trainable_parameters=run.trainable,
                       world_size=run.dist.world, history=history, val_history=state.val_history,
                       val_macro_f1=shown["val_macro_f1"], select_metric=run.cfg.select_metric,
                       best_step=state.selection.best_step, best_value=state.selection.best_value,
                       exported_step=exported_step, stop_reason=state.stop_reason, freeze=run.cfg.freeze)
