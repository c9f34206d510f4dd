"""The training loop: optimizer steps from where resume left the run to its last step, validation and
checkpoints at their steps, early stopping.

The loss stays on the device and is read every ``log_every`` steps, before a validation and before a checkpoint
(:class:`LossLog`: the only host sync of the loop). Validation runs on rank 0, which decides for every rank when to
stop, so all ranks stop at the same step.
"""

from __future__ import annotations

import contextlib
import math
import time
from types import ModuleType
from typing import Callable

import torch

from finetune.common.progress import Progress
from finetune.common.tokens import TokenizedSplit
from finetune.tasks import task_for
from finetune.training import checkpoint
from finetune.training.distributed import Dist
from finetune.training.model import predict_logits
from finetune.training.packing import PackedClassifier
from finetune.training.recipe import TrainingError, TrainRun, TrainState
from finetune.training.regimes import FGM
from finetune.training.step_plan import Step, StepPlan

RowCallback = Callable[[dict[str, float]], None]
LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]  # (logits, micro-batch) -> summed loss


class LossLog:
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


def train_loop(run: TrainRun, state: TrainState, on_step: RowCallback | None = None,
               on_eval: RowCallback | None = None) -> None:
    """Advance ``state`` to the run's last step, or to an early stop. ``on_step`` gets each step's row when the
    losses are read; ``on_eval`` each validation row on rank 0 (an exception it raises, a pruned trial, ends
    training)."""
    packed = PackedClassifier(run.model, run.shape) if run.shape is not None else None
    runner = run.dist.wrap(packed if packed is not None else run.model)
    if run.cfg.compile:
        runner = torch.compile(runner)
    progress = Progress(run.total - state.start, "train", "steps", stream=None) if run.dist.main else None
    losses = LossLog(run.dist, state.history, on_step, progress, run.cfg.learning_rate)
    t0 = time.perf_counter()
    runner.train()
    try:
        while state.step < run.total and not state.stop:
            n_steps = len(run.plan.groups(state.epoch))
            for batch in run.plan.steps(state.epoch, skip=state.step - state.done_before):
                _optimizer_step(run, runner, batch, state, losses)
                if _after_step(run, runner, state, losses, n_steps, on_eval):
                    break
            state.done_before += n_steps
            state.epoch += 1
        losses.flush()
    finally:
        if progress:
            progress.close()
    state.seconds = time.perf_counter() - t0
    state.stop_reason = _stop_reason(run, state)
    if packed is not None:
        packed.release(run.cfg.attn_implementation)


def _optimizer_step(run: TrainRun, runner, batch: Step, state: TrainState, losses: LossLog) -> None:
    use_bf16 = run.dist.device.type == "cuda"
    loss_sum = forward_backward(runner, run.plan, batch, run.dist, use_bf16, run.weights, run.fgm, run.task,
                                run.loss_fn)
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.max_grad_norm)
    run.opt.step()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    state.step += 1
    state.samples += batch.rows
    losses.add(state.step, loss_sum, batch.rows, run.sched.get_last_lr()[0])


def _after_step(run: TrainRun, runner, state: TrainState, losses: LossLog, n_steps: int,
                on_eval: RowCallback | None) -> bool:
    """Read the losses, validate and checkpoint where this step calls for it; True when the loop ends here."""
    cfg, step = run.cfg, state.step
    save_now = bool(state.ckpt_root is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0
                    and step < run.total)
    end_of_epoch = step - state.done_before == n_steps
    val_now = bool((cfg.eval_every and step % cfg.eval_every == 0) or (not cfg.eval_every and end_of_epoch)
                   or step == run.total)
    if step % cfg.log_every == 0 or save_now or val_now:
        losses.flush()  # before a checkpoint: never save weights a non-finite loss produced
    if val_now:
        _validate(run, state, on_eval)
        runner.train()
    if save_now and not state.stop:  # after validation: the checkpoint holds its result
        if run.dist.main:
            checkpoint.save(state.ckpt_root, step, state.identity, run.model, run.opt, run.sched, state.history,
                            extra={"val_history": state.val_history, "selection": state.selection.state()},
                            best=state.best)
        run.dist.barrier()
    return step >= run.total or state.stop


def _validate(run: TrainRun, state: TrainState, on_eval: RowCallback | None) -> None:
    """One evaluation on rank 0: its row, early stopping's verdict, the best weights kept (keep_best)."""
    stop = False
    if run.dist.main:
        row = {"step": state.step, **_val_metrics(run, run.model, run.val)}
        state.val_history.append(row)
        if on_eval:  # tune's pruner: an exception from it ends training
            on_eval(row)
        stop = state.selection.update(row)
        if run.cfg.keep_best and state.selection.improved:
            state.best = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}
    state.stop = run.dist.from_main(stop)  # every rank stops at the same step


def _stop_reason(run: TrainRun, state: TrainState) -> str:
    if state.stop:
        return state.selection.stop_reason(state.step)
    if run.cfg.max_steps and state.step == run.cfg.max_steps:
        return f"reached train.max_steps ({state.step})"
    return f"completed train.epochs ({run.cfg.epochs:g}: {state.step} steps)"


def forward_backward(runner, plan: StepPlan, batch: Step, dist: Dist, use_bf16: bool,
                     weight: torch.Tensor | None = None, fgm: FGM | None = None,
                     task: ModuleType | None = None, loss_fn: LossFn | None = None) -> torch.Tensor:
    """Gradients of one optimizer step (all its micro-batches); returns this rank's (clean) loss sum, on the device.
    With ``fgm`` a second pass on perturbed embeddings adds its gradients (DDP: the clean gradient is already the
    global mean, identical on every rank, so the perturbation is too). ``loss_fn`` (distillation's hook) replaces
    the task's loss: (logits, micro-batch) -> the loss summed over the micro-batch's rows."""
    task = task or task_for("single_label")
    loss_sum = _passes(runner, plan, batch, dist, use_bf16, weight, task, loss_fn)
    if fgm is not None:
        with fgm.perturbed():
            _passes(runner, plan, batch, dist, use_bf16, weight, task, loss_fn)
    return loss_sum


def _passes(runner, plan: StepPlan, batch: Step, dist: Dist, use_bf16: bool, weight: torch.Tensor | None,
            task: ModuleType, loss_fn: LossFn | None = None):
    loss_sum = torch.zeros((), device=plan.device)
    for j, b in enumerate(batch.micro):
        last = j == len(batch.micro) - 1
        sync = contextlib.nullcontext() if last or dist.world == 1 else runner.no_sync()
        with sync, torch.autocast(plan.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = plan.forward(runner, b)
            # the task's loss summed over this rank's rows / rows of the whole step: DDP's gradient averaging
            # over ranks then yields exactly the mean over the global batch (label -100: no loss)
            ce = loss_fn(logits.float(), b) if loss_fn is not None else task.loss_sum(logits, b["labels"], weight)
            (ce * dist.world / batch.rows).backward()
        loss_sum += ce.detach()
    return loss_sum


def _val_metrics(run: TrainRun, model, split: TokenizedSplit | None) -> dict[str, float]:
    """The task's validation scores (unweighted loss, accuracy, macro-F1 ...) on the validation split."""
    if split is None or len(split) == 0:
        return {name: float("nan") for name in ("val_loss", "val_accuracy", "val_macro_f1", *run.task.SELECT_METRICS)}
    raw = predict_logits(model, split, 128, run.pad_id, run.dist.device)
    return run.task.validation_scores(raw, split.labels)
