"""train: fine-tune the base model on the tokenized train split.

Plain PyTorch loop, read as setup -> resume -> loop -> export. Batches are length-grouped with dynamic padding,
or packed into fixed-size token streams (``train.pack_tokens``: one shape, so one compiled graph). AdamW, linear
warm-up + decay, bf16 autocast on CUDA, fp32 on CPU. The loss stays on the device and is read every
``log_every`` steps (no host sync per step). Seeded: same params + data give the same model on CPU.
Checkpoints (``checkpoint.py``) are written every ``checkpoint_every`` steps; a rerun resumes its own newest one.
Regimes (``regimes.py``, ``selection.py``): frozen layers, class-weighted loss, FGM adversarial training, and
best-evaluation selection with early stopping (rank 0 decides, every rank stops at the same step).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from finetune.common.base_model import check_model_limits, resolve_base
from finetune.common.config import Config, TrainConfig
from finetune.common.files import write_json
from finetune.common.outputs import atomic_dir, check_output_dir, check_output_place
from finetune.common.progress import Progress
from finetune.common.tokens import TokenizedSplit, load_tokenizer, read_tokens, tokenizer_fingerprint
from finetune.tasks.single_label import classification_metrics, softmax
from finetune.training import checkpoint
from finetune.training.distributed import Dist
from finetune.training.early_stopping import Selection
from finetune.training.model import build_model, build_optimizer, exportable, predict_logits, seed_everything
from finetune.training.packing import PackedClassifier, PackShape, can_pack, pack_shape
from finetune.training.regimes import FGM, class_weights, freeze
from finetune.training.step_plan import Step, StepPlan

log = logging.getLogger("finetune")  # the stage's own lines: "INFO finetune: ..."


class TrainingError(RuntimeError):
    pass


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


class _LossLog:
    """Per-step losses kept on the device; :meth:`flush` reads them in one transfer (the only host sync of the
    loop), checks them, and hands the rows to history, callback and progress."""

    def __init__(self, dist: Dist, history: list, on_step, progress: Progress | None, learning_rate: float):
        self.dist, self.history, self.on_step, self.progress = dist, history, on_step, progress
        self.lr_hint = learning_rate
        self.pending: list[tuple[int, torch.Tensor, int, float]] = []  # step, local loss sum, rows, lr

    def add(self, step: int, loss_sum: torch.Tensor, rows: int, lr: float) -> None:
        self.pending.append((step, loss_sum, rows, lr))

    def flush(self) -> None:
        if not self.pending:
            return
        sums = self.dist.sum(torch.stack([p[1] for p in self.pending])).tolist()
        pending, self.pending = self.pending, []
        for (step, _, rows, lr), total in zip(pending, sums):
            loss = total / rows
            if not math.isfinite(loss):
                raise TrainingError(f"loss became {loss} at step {step}: training diverged "
                                    f"(try a lower train.learning_rate, now {self.lr_hint})")
            row = {"step": step, "loss": loss, "lr": lr, "rows": rows}
            self.history.append(row)
            if self.on_step:
                self.on_step(row)
        if self.progress:
            self.progress.update(len(pending), note=f"loss {self.history[-1]['loss']:.4f}")


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
    # ---- setup ----
    base = Path(base_model)
    tok = load_tokenizer(base)
    if tokenizer_fingerprint(tok) != meta["tokenizer"]:
        raise TrainingError(f"tokens were made with a different tokenizer ({meta['tokenizer']}) than the base "
                            f"model's ({tokenizer_fingerprint(tok)}): rerun tokenize")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = Dist(cfg.device)
    device = dist.device
    seed_everything(cfg.seed)
    model, mcfg = build_model(base, meta["labels"], cfg, device)
    freeze(model, cfg.freeze)  # before the optimizer is built: frozen weights stay out of it
    torch.manual_seed(cfg.seed + dist.rank)  # per-rank dropout streams; weights are synced from rank 0 below
    if mcfg.vocab_size < meta["tokenizer"]["vocab_size"]:
        raise TrainingError(f"model vocab {mcfg.vocab_size} < tokenizer vocab {meta['tokenizer']['vocab_size']}")

    train_split = tokens["train"]
    shape = _pack_shape(cfg, model, train_split)
    pad_id = tok.pad_token_id or 0
    mult = min(cfg.pad_to_multiple_of, max(1, getattr(mcfg, "max_position_embeddings", 512)))
    plan = StepPlan(train_split, cfg, dist.world, dist.rank, pad_id, mult, shape, device)
    per_epoch = len(plan.groups(0))
    total = math.ceil(cfg.epochs * per_epoch)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    opt, sched = build_optimizer(model, cfg, total, device)
    weights = class_weights(cfg.class_weights, train_split.labels, meta["labels"])
    weights = weights.to(device) if weights is not None else None
    fgm = FGM(model, cfg.adversarial.epsilon) if cfg.adversarial.enabled else None
    if (cfg.keep_best or cfg.patience) and (tokens.get("val") is None or len(tokens["val"]) == 0):
        raise TrainingError("train.keep_best / train.patience need a validation split (tokens['val'] is empty)")
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("trainable parameters: %d of %d (train.freeze=%s, lora %s)", n_trainable,
             sum(p.numel() for p in model.parameters()), cfg.freeze, "on" if cfg.lora.enabled else "off")

    # ---- resume ----
    identity = checkpoint.run_identity(cfg, meta, base)
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir else None
    start, history, val_history = 0, [], []
    selection = Selection(cfg.select_metric, cfg.patience, cfg.min_delta)
    best: dict[str, torch.Tensor] | None = None  # rank 0's CPU copy of the best evaluation's weights (keep_best)
    latest = checkpoint.find(ckpt_root, identity)
    if latest is not None:
        start, history = checkpoint.load(latest, model, opt, sched)
        extra, best = checkpoint.load_extra(latest)
        val_history = extra.get("val_history", [])
        selection = Selection(cfg.select_metric, cfg.patience, cfg.min_delta, extra.get("selection"))
        log.info("resuming from checkpoint %s (step %d of %d)", latest, start, total)
    elif dist.main:
        checkpoint.clear(ckpt_root)  # checkpoints of another config/data: never resume from them
    if ckpt_root is not None and dist.main:
        ckpt_root.mkdir(parents=True, exist_ok=True)  # a DVC output: exists even when no checkpoint is written
    dist.barrier()
    epoch, done_before = _locate(plan, start, total)

    # ---- loop ----
    packed = PackedClassifier(model, shape) if shape is not None else None
    runner = dist.wrap(packed if packed is not None else model)
    if cfg.compile:
        runner = torch.compile(runner)
    use_bf16 = device.type == "cuda"
    progress = Progress(total - start, "train", "steps", stream=None) if dist.main else None
    losses = _LossLog(dist, history, on_step, progress, cfg.learning_rate)
    t0 = time.perf_counter()
    samples, step, stop = 0, start, False
    runner.train()
    try:
        while step < total and not stop:
            n_steps = len(plan.groups(epoch))
            for batch in plan.steps(epoch, skip=step - done_before):
                loss_sum = _forward_backward(runner, plan, batch, dist, use_bf16, weights, fgm)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                samples += batch.rows
                losses.add(step, loss_sum, batch.rows, sched.get_last_lr()[0])
                save_now = ckpt_root is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 \
                    and step < total
                end_of_epoch = step - done_before == n_steps
                val_now = (cfg.eval_every and step % cfg.eval_every == 0) or (not cfg.eval_every and end_of_epoch) \
                    or step == total
                if step % cfg.log_every == 0 or save_now or val_now:
                    losses.flush()  # before a checkpoint: never save weights a non-finite loss produced
                if val_now:
                    if dist.main:
                        row = {"step": step, **_val_metrics(model, tokens.get("val"), pad_id, device)}
                        val_history.append(row)
                        if on_eval:  # tune's pruner: an exception from it ends training
                            on_eval(row)
                        stop = selection.update(row)
                        if cfg.keep_best and selection.improved:
                            best = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                    stop = dist.from_main(stop)  # every rank stops at the same step
                    runner.train()
                if save_now and not stop:  # after validation: the checkpoint holds its result
                    if dist.main:
                        checkpoint.save(ckpt_root, step, identity, model, opt, sched, history,
                                        extra={"val_history": val_history, "selection": selection.state()}, best=best)
                    dist.barrier()
                if step >= total or stop:
                    break
            done_before += n_steps
            epoch += 1
        losses.flush()
    finally:
        if progress:
            progress.close()
    seconds = time.perf_counter() - t0
    if stop:
        reason = selection.stop_reason(step)
    elif cfg.max_steps and step == cfg.max_steps:
        reason = f"reached train.max_steps ({step})"
    else:
        reason = f"completed train.epochs ({cfg.epochs:g}: {step} steps)"

    # ---- export ----
    if packed is not None:
        packed.release(cfg.attn_implementation)
    exported_step = step
    if cfg.keep_best and best is not None:  # rank 0 only holds (and exports) it
        model.load_state_dict(best)
        exported_step = selection.best_step
    log.info("%s; exporting the weights of step %d", reason, exported_step)
    if dist.main:
        with atomic_dir(model_out, "train") as tmp:
            exportable(model).save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        checkpoint.clear(ckpt_root)  # the finished model supersedes them; they only serve a killed run
    dist.barrier()
    nan = float("nan")
    shown = next((r for r in val_history if r["step"] == exported_step),
                 {"val_loss": nan, "val_accuracy": nan, "val_macro_f1": nan})
    tail = [h["loss"] for h in history[-max(1, min(20, len(history))):]]
    return TrainResult(steps=step, epochs_run=round(step / per_epoch, 3), final_loss=float(np.mean(tail)),
                       val_loss=shown["val_loss"], val_accuracy=shown["val_accuracy"], device=str(device),
                       seconds=round(seconds, 2), samples_per_second=round(samples / max(seconds, 1e-9), 2),
                       resumed_from_step=start, steps_run=step - start, packed=shape is not None,
                       parameters=sum(p.numel() for p in model.parameters()), trainable_parameters=n_trainable,
                       world_size=dist.world, history=history, val_history=val_history,
                       val_macro_f1=shown["val_macro_f1"], select_metric=cfg.select_metric,
                       best_step=selection.best_step, best_value=selection.best_value, exported_step=exported_step,
                       stop_reason=reason, freeze=cfg.freeze)


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


def _locate(plan: StepPlan, start: int, total: int) -> tuple[int, int]:
    """The epoch holding step ``start`` and the steps before it (epochs can differ in length)."""
    epoch, done_before = 0, 0
    while done_before + len(plan.groups(epoch)) <= start and done_before + len(plan.groups(epoch)) < total:
        done_before += len(plan.groups(epoch))
        epoch += 1
    return epoch, done_before


def _forward_backward(runner, plan: StepPlan, batch: Step, dist: Dist, use_bf16: bool,
                      weight: torch.Tensor | None = None, fgm: FGM | None = None) -> torch.Tensor:
    """Gradients of one optimizer step (all its micro-batches); returns this rank's (clean) loss sum, on the device.
    With ``fgm`` a second pass on perturbed embeddings adds its gradients (DDP: the clean gradient is already the
    global mean, identical on every rank, so the perturbation is too)."""
    loss_sum = _passes(runner, plan, batch, dist, use_bf16, weight)
    if fgm is not None:
        with fgm.perturbed():
            _passes(runner, plan, batch, dist, use_bf16, weight)
    return loss_sum


def _passes(runner, plan: StepPlan, batch: Step, dist: Dist, use_bf16: bool, weight: torch.Tensor | None):
    loss_sum = torch.zeros((), device=plan.device)
    for j, b in enumerate(batch.micro):
        last = j == len(batch.micro) - 1
        sync = contextlib.nullcontext() if last or dist.world == 1 else runner.no_sync()
        with sync, torch.autocast(plan.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = plan.forward(runner, b)
            # sum over this rank's rows / rows of the whole step: DDP's gradient averaging over ranks then
            # yields exactly the mean over the global batch (label -100: empty packed slots, no loss). Class
            # weights scale each row's loss: sum(w_y * ce) / rows (torch's weighted mean divides by sum(w) instead)
            ce = torch.nn.functional.cross_entropy(logits.float(), b["labels"], weight=weight, reduction="sum",
                                                   ignore_index=-100)
            (ce * dist.world / batch.rows).backward()
        loss_sum += ce.detach()
    return loss_sum


def _val_metrics(model, split: TokenizedSplit | None, pad_id: int, device: torch.device) -> dict[str, float]:
    """Unweighted loss, accuracy and macro-F1 (evaluate's arithmetic) on the validation split."""
    if split is None or len(split) == 0:
        return {"val_loss": float("nan"), "val_accuracy": float("nan"), "val_macro_f1": float("nan")}
    raw = predict_logits(model, split, 128, pad_id, device)
    logits, labels = torch.from_numpy(raw), torch.from_numpy(split.labels)
    scores, _ = classification_metrics(split.labels, softmax(raw), [str(i) for i in range(raw.shape[1])], bins=2)
    return {"val_loss": float(torch.nn.functional.cross_entropy(logits, labels)),
            "val_accuracy": float((logits.argmax(-1) == labels).float().mean()), "val_macro_f1": scores["macro_f1"]}


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


    base = resolve_base(cfg.model.base)
    check_model_limits(cfg, base)
    # train replaces the model folder (io.atomic_dir) only after training: refuse a wrong --model before it
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
