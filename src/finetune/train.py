"""train: fine-tune the base model on the tokenized train split.

Plain PyTorch loop: length-grouped batches with dynamic padding, AdamW, linear warm-up + decay,
bf16 autocast on CUDA, fp32 on CPU. Seeded: same params + data give the same model on CPU.
Checkpoints (safetensors + JSON, no pickle) are written atomically every ``checkpoint_every`` steps;
a rerun with the same config resumes from the newest complete one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .config import TrainConfig
from .io import MARKER, atomic_dir, read_json, write_json
from .modeling import collate, epoch_batches, pick_device, predict_logits
from .tokenize import TokenizedSplit, load_tokenizer, tokenizer_fingerprint

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    pass


@dataclass
class TrainResult:
    steps: int
    epochs_run: float
    final_loss: float
    val_loss: float
    val_accuracy: float
    device: str
    seconds: float
    samples_per_second: float
    resumed_from_step: int = 0
    parameters: int = 0
    trainable_parameters: int = 0
    world_size: int = 1
    history: list[dict[str, float]] = field(default_factory=list)  # one row per step: step, loss, lr
    val_history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch end


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def _fingerprint(cfg: TrainConfig, meta: dict[str, Any], base: Path) -> str:
    """Checkpoints are only resumed by a run with the same data, base model and training config."""
    keep = {k: v for k, v in asdict(cfg).items() if k not in ("log_every", "checkpoint_every", "threads")}
    blob = json.dumps({"cfg": keep, "meta": meta, "base": str(base.resolve())}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---- checkpoints: model + optimizer + scheduler + RNG in safetensors and JSON ----

def _save_checkpoint(ckpt_root: Path, step: int, fp: str, model, opt, sched, history, keep: int = 2) -> None:
    from safetensors.torch import save_file

    target = ckpt_root / f"step-{step:07d}"
    if target.exists() and not (target / MARKER).is_file():
        if (target / "state.json").is_file():  # a stale checkpoint of a version before the marker: ours
            shutil.rmtree(target)
        else:  # not train's: keep it, and train on without this checkpoint rather than fail
            log.warning("%s exists and was not written by train: checkpoint of step %d skipped", target, step)
            return
    with atomic_dir(target, "train") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        osd = opt.state_dict()
        tensors = {f"{pid}.{k}": v.cpu() for pid, st in osd["state"].items() for k, v in st.items()}
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, tmp / "optimizer.safetensors")
        write_json(tmp / "state.json", {"step": step, "fingerprint": fp, "param_groups": osd["param_groups"],
                                        "scheduler": sched.state_dict(), "history": history})
    for old in sorted(_checkpoint_dirs(ckpt_root))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _checkpoint_dirs(ckpt_root: Path) -> list[Path]:
    """The ``step-*`` folders train wrote (marker, or state.json from before the marker): the only ones it deletes,
    whatever else --checkpoints holds."""
    return [p for p in ckpt_root.glob("step-*") if (p / MARKER).is_file() or (p / "state.json").is_file()]


def _latest_checkpoint(ckpt_root: Path | None, fp: str) -> Path | None:
    if ckpt_root is None or not ckpt_root.is_dir():
        return None
    for cand in sorted(ckpt_root.glob("step-*"), reverse=True):  # temp folders start with '.', never match
        state = cand / "state.json"
        if state.is_file() and read_json(state).get("fingerprint") == fp:
            return cand
    return None


def _load_checkpoint(path: Path, model, opt, sched) -> tuple[int, list[dict[str, float]]]:
    from safetensors.torch import load_file

    state = read_json(path / "state.json")
    model.load_state_dict(load_file(path / "model.safetensors"))
    flat = load_file(path / "optimizer.safetensors")
    torch.set_rng_state(flat.pop("rng.torch"))
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, val in flat.items():
        pid, name = key.split(".", 1)
        per_param.setdefault(int(pid), {})[name] = val
    opt.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    sched.load_state_dict(state["scheduler"])
    return int(state["step"]), state["history"]


class _Progress:
    """tqdm bar on a terminal; plain log lines every ``every`` steps elsewhere (CI, KFP pods)."""

    def __init__(self, total: int, initial: int, every: int):
        self.every, self.total = every, total
        self.bar = None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", desc="train", dynamic_ncols=True)

    def update(self, step: int, loss: float, rate: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:.1f}")
        elif step % self.every == 0 or step == self.total:
            log.info("step %d/%d loss %.4f %.1f samples/s", step, self.total, loss, rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Dist:
    """torchrun's environment (WORLD_SIZE/RANK/LOCAL_RANK): data-parallel training, or a no-op for one process."""

    def __init__(self, device_pref: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1:
            import torch.distributed as dist

            use_cuda = device_pref != "cpu" and torch.cuda.is_available()
            if use_cuda:
                torch.cuda.set_device(self.local_rank)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if use_cuda else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(value)
        return value


def _build_model(base: Path, labels: list[str], cfg: TrainConfig, device: torch.device):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    mcfg = AutoConfig.from_pretrained(str(base), num_labels=len(labels), id2label=dict(enumerate(labels)),
                                      label2id={lab: i for i, lab in enumerate(labels)}, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base), config=mcfg, local_files_only=True, use_safetensors=True,
        attn_implementation=cfg.attn_implementation)
    if cfg.lora.enabled:
        from peft import LoraConfig as PeftLora
        from peft import get_peft_model

        # SEQ_CLS keeps the new classification head fully trainable next to the adapters.
        model = get_peft_model(model, PeftLora(task_type="SEQ_CLS", r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                               lora_dropout=cfg.lora.dropout,
                                               target_modules=list(cfg.lora.target_modules)))
    return model.to(device), mcfg


def _exportable(model):
    """The plain transformers model to save: LoRA merged into the base weights, so loading needs no peft."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def train(tokens: dict[str, TokenizedSplit], meta: dict[str, Any], base_model: str | Path, cfg: TrainConfig,
          model_out: str | Path, checkpoint_dir: str | Path | None = None,
          on_step: Callable[[dict[str, float]], None] | None = None) -> TrainResult:
    """Fine-tune ``base_model`` on ``tokens['train']``; write the model folder to ``model_out`` atomically.

    Under torchrun every rank takes an equal share of each global batch; the loss is normalised by the global
    batch, so the update equals a single process's with the same ``batch_size`` (up to dropout noise).
    """
    base = Path(base_model)
    tok = load_tokenizer(base)
    if tokenizer_fingerprint(tok) != meta["tokenizer"]:
        raise TrainingError(f"tokens were made with a different tokenizer ({meta['tokenizer']}) than the base "
                            f"model's ({tokenizer_fingerprint(tok)}): rerun tokenize")
    labels = meta["labels"]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = _Dist(cfg.device)
    device = torch.device("cuda", dist.local_rank) if dist.world > 1 and pick_device(cfg.device).type == "cuda" \
        else pick_device(cfg.device)
    seed_everything(cfg.seed)
    model, mcfg = _build_model(base, labels, cfg, device)
    torch.manual_seed(cfg.seed + dist.rank)  # per-rank dropout streams; weights are synced from rank 0 below
    if mcfg.vocab_size < meta["tokenizer"]["vocab_size"]:
        raise TrainingError(f"model vocab {mcfg.vocab_size} < tokenizer vocab {meta['tokenizer']['vocab_size']}")

    train_split = tokens["train"]
    k = cfg.grad_accum_steps

    def steps_of(epoch: int) -> list[list[np.ndarray]]:  # optimizer steps of one epoch, k micro-batches each
        plan = epoch_batches(train_split, cfg.batch_size, cfg.seed, epoch, max_tokens=cfg.max_tokens)
        return [plan[i:i + k] for i in range(0, len(plan), k)]

    per_epoch = len(steps_of(0))
    total = math.ceil(cfg.epochs * per_epoch)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    warmup = int(cfg.warmup_ratio * total)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in n else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate,
                            fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))

    fp = _fingerprint(cfg, meta, base)
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir else None
    start, history = 0, []
    latest = _latest_checkpoint(ckpt_root, fp)
    if latest is not None:
        start, history = _load_checkpoint(latest, model, opt, sched)
        log.info("resuming from checkpoint %s (step %d of %d)", latest, start, total)
    elif ckpt_root is not None and ckpt_root.exists() and dist.main:
        for stale in _checkpoint_dirs(ckpt_root):  # checkpoints of another config/data: never resume from them
            shutil.rmtree(stale)
    if ckpt_root is not None and dist.main:
        ckpt_root.mkdir(parents=True, exist_ok=True)  # a DVC output: exists even when no checkpoint is written
    dist.barrier()

    runner = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        runner = torch.compile(runner)

    pad_id = tok.pad_token_id or 0
    mult = min(cfg.pad_to_multiple_of, max(1, getattr(mcfg, "max_position_embeddings", 512)))
    use_bf16 = device.type == "cuda"
    progress = _Progress(total, start, cfg.log_every) if dist.main else None
    val_history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    samples = 0
    step = start
    epoch, done_before = 0, 0  # find the epoch and offset of `start` (epochs can differ in length with max_tokens)
    while True:
        n = len(steps_of(epoch))
        if done_before + n > start or done_before + n >= total:
            break
        done_before += n
        epoch += 1
    runner.train()
    while step < total:
        groups = steps_of(epoch)
        for group in groups[step - done_before:]:
            n_global = sum(len(idx) for idx in group)
            loss_sum = torch.zeros((), device=device)
            for j, idx in enumerate(group):
                part = idx[dist.rank::dist.world]
                b = collate(train_split, part, pad_id, mult)
                if device.type == "cuda":
                    b = {key: v.pin_memory() for key, v in b.items()}
                b = {key: v.to(device, non_blocking=True) for key, v in b.items()}
                sync = contextlib.nullcontext() if j == len(group) - 1 or dist.world == 1 else runner.no_sync()
                with sync, torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    logits = runner(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                    # sum over this rank's rows / rows of the whole step: DDP's gradient averaging over ranks
                    # then yields exactly the mean over the global batch
                    ce = torch.nn.functional.cross_entropy(logits.float(), b["labels"], reduction="sum")
                    (ce * dist.world / n_global).backward()
                loss_sum += ce.detach()
            loss = float(dist.sum(loss_sum)) / n_global
            if not math.isfinite(loss):
                if progress:
                    progress.close()
                raise TrainingError(f"loss became {loss} at step {step + 1}: training diverged "
                                    f"(try a lower train.learning_rate, now {cfg.learning_rate})")
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            samples += n_global
            row = {"step": step, "loss": loss, "lr": sched.get_last_lr()[0]}
            history.append(row)
            if on_step:
                on_step(row)
            if progress:
                progress.update(step, loss, samples / (time.perf_counter() - t0))
            if ckpt_root is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                if dist.main:
                    _save_checkpoint(ckpt_root, step, fp, model, opt, sched, history)
                dist.barrier()
            end_of_epoch = step - done_before == len(groups)
            if (cfg.eval_every and step % cfg.eval_every == 0) or (not cfg.eval_every and end_of_epoch) \
                    or step == total:
                if dist.main:
                    val_history.append({"step": step, **_val_metrics(model, tokens.get("val"), pad_id, device)})
                dist.barrier()
                runner.train()
            if step >= total:
                break
        done_before += len(groups)
        epoch += 1
    if progress:
        progress.close()
    seconds = time.perf_counter() - t0

    if dist.main:
        with atomic_dir(model_out, "train") as tmp:
            _exportable(model).save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        if ckpt_root is not None:  # the finished model supersedes them; they only serve a killed run
            for old in _checkpoint_dirs(ckpt_root):
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    last = val_history[-1] if val_history else {"val_loss": float("nan"), "val_accuracy": float("nan")}
    tail = [h["loss"] for h in history[-max(1, min(20, len(history))):]]
    return TrainResult(steps=step, epochs_run=round(step / per_epoch, 3), final_loss=float(np.mean(tail)),
                       val_loss=last["val_loss"], val_accuracy=last["val_accuracy"], device=str(device),
                       seconds=round(seconds, 2), samples_per_second=round(samples / max(seconds, 1e-9), 2),
                       resumed_from_step=start, parameters=sum(p.numel() for p in model.parameters()),
                       trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
                       world_size=dist.world, history=history, val_history=val_history)


def _val_metrics(model, split: TokenizedSplit | None, pad_id: int, device: torch.device) -> dict[str, float]:
    if split is None or len(split) == 0:
        return {"val_loss": float("nan"), "val_accuracy": float("nan")}
    logits = torch.from_numpy(predict_logits(model, split, 128, pad_id, device))
    labels = torch.from_numpy(split.labels)
    return {"val_loss": float(torch.nn.functional.cross_entropy(logits, labels)),
            "val_accuracy": float((logits.argmax(-1) == labels).float().mean())}


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
        fh.write("step,val_loss,val_accuracy\n")
        fh.writelines(f"{h['step']},{h['val_loss']:.6f},{h['val_accuracy']:.6f}\n" for h in result.val_history)
    summary = {k: v for k, v in asdict(result).items() if k not in ("history",)}
    write_json(out / "summary.json", summary)
