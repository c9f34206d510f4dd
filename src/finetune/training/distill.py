"""Distillation: a student made of some of the teacher's own layers (embeddings and head copied), trained on the
teacher's soft targets through the same loop as train (``loop.py``: checkpoints, resume, progress, NaN guard,
early stopping), by its loss hook. The teacher's logits on the train split are computed once and cached.

Loss per row: ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)`` (Hinton et al., 2015:
the T^2 keeps the soft term's gradient scale independent of T), plus ``hidden_weight`` times the mean squared gap
between each student block's output and the output of the teacher block it was copied from, over real tokens
(hidden-state transfer, as in patient KD / TinyBERT). Hidden states are too large to cache (rows x tokens x width
per layer), so with ``hidden_weight`` > 0 the teacher runs live on each micro-batch and gives the logits too.

``mask_rate`` > 0 augments the train split (TinyBERT's lesson: a student learns more of the teacher from more
inputs than the labelled ones): while the student trains, that share of each row's tokens becomes the mask token,
afresh every step, and the live teacher labels the same masked text.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.common.config import TrainConfig
from finetune.common.distill_config import DistillConfig
from finetune.common.tokens import TokenizedSplit
from finetune.training.loop import train_loop
from finetune.training.model import load_classifier, predict_logits
from finetune.training.recipe import TrainingError, TrainResult, export_run, resume_run, setup_run

log = logging.getLogger("finetune")

# The one place that says which tasks distillation supports: a task is added here with its soft-target loss
# (per token for token tasks, per label with a sigmoid for multi-label).
SUPPORTED_TASKS = ("single_label",)


def check_distillable_task(task: str) -> None:
    if task not in SUPPORTED_TASKS:
        raise TrainingError(f"distill: task {task!r} is not supported (supported: {', '.join(SUPPORTED_TASKS)}); "
                            f"the pipeline serves the teacher's variants instead")


def encoder_layers(model) -> torch.nn.ModuleList:
    """The stack of encoder blocks (BERT/RoBERTa ``encoder.layer``, DistilBERT ``transformer.layer``)."""
    n = model.config.num_hidden_layers
    for name, module in model.base_model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n and name.endswith("layer"):
            return module
    raise TrainingError(f"distill: no stack of {n} encoder layers found in model type "
                        f"{getattr(model.config, 'model_type', '?')!r}")


def labels_only(alpha: float, hidden_weight: float) -> bool:
    """A student that learned nothing from the teacher: layer-drop pruning, distillation's baseline."""
    return alpha == 0 and not hidden_weight


def student_layers(n_teacher: int, chosen: list[int]) -> list[int]:
    """The teacher layers the student keeps: ``chosen``, or two of every three, the first kept (6 -> 0, 2, 3, 5:
    on MiniLM-L6 the pair whose removal cost least before any retraining, bench/layer_drop.py)."""
    layers = sorted(chosen) if chosen else [i for i in range(n_teacher) if i % 3 != 1]
    bad = [i for i in layers if i >= n_teacher]
    if bad or len(layers) >= n_teacher:
        raise TrainingError(f"distill.layers = {chosen}: must pick fewer than the teacher's {n_teacher} layers, "
                            f"each in 0..{n_teacher - 1}")
    return layers


def build_student(teacher, layers: list[int]):
    """A copy of ``teacher`` holding only ``layers`` of its encoder (in order); embeddings and head copied."""
    student = copy.deepcopy(teacher)
    stack = encoder_layers(student)
    kept = torch.nn.ModuleList([stack[i] for i in layers])
    for i, block in enumerate(kept):  # the attention's layer index (KV cache bookkeeping in newer transformers)
        for m in block.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = i
    parent = student.base_model.get_submodule(_parent_name(student, stack))
    parent.layer = kept
    student.config.num_hidden_layers = len(layers)
    return student


def _parent_name(model, stack) -> str:
    for name, module in model.base_model.named_modules():
        if module is stack:
            return name.rsplit(".", 1)[0] if "." in name else ""
    raise TrainingError("distill: encoder layer stack not found")


class BlockOutputs:
    """The outputs of some encoder blocks, kept by forward hooks each time the model runs."""

    def __init__(self, blocks: list[torch.nn.Module]):
        self.out: list[torch.Tensor | None] = [None] * len(blocks)
        self.handles = [b.register_forward_hook(self._keeper(i)) for i, b in enumerate(blocks)]

    def _keeper(self, i: int):
        def keep(module, args, output):
            self.out[i] = output[0] if isinstance(output, tuple) else output
        return keep

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class TokenMasking:
    """While the student trains, ``rate`` of each row's tokens (never special tokens or padding) become the mask
    token, by a forward pre-hook on its word embeddings; ``last`` keeps the ids the student saw, for the teacher.
    Validation (eval mode) sees the text as it is."""

    def __init__(self, student, rate: float, mask_id: int, special_ids: list[int], seed: int):
        self.rate, self.mask_id = rate, mask_id
        self.special = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
        self.gen = torch.Generator().manual_seed(seed)
        self.last: torch.Tensor | None = None
        self.handle = student.get_input_embeddings().register_forward_pre_hook(self._mask)

    def _mask(self, module, args):
        if not module.training:
            self.last = None
            return None
        ids = args[0]
        pick = torch.rand(ids.shape, generator=self.gen).to(ids.device) < self.rate
        pick &= ~torch.isin(ids, self.special.to(ids.device))
        self.last = torch.where(pick, torch.full_like(ids, self.mask_id), ids)
        return (self.last, *args[1:])

    def remove(self) -> None:
        self.handle.remove()


class LiveTeacher:
    """The teacher run on each micro-batch (on the text the student saw, masked or not): its logits, and the
    hidden-state gap per row of the student's blocks (captured while the student ran) to the teacher blocks they
    were copied from."""

    def __init__(self, teacher, student, layers: list[int], masking: TokenMasking | None = None):
        self.model = teacher.eval().requires_grad_(False)
        self.teacher_blocks = BlockOutputs([encoder_layers(teacher)[i] for i in layers])
        self.student_blocks = BlockOutputs(list(encoder_layers(student)) if layers else [])
        self.masking = masking

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        seen = self.masking.last if self.masking is not None and self.masking.last is not None else None
        ids = seen if seen is not None else batch["input_ids"]
        with torch.no_grad():
            return self.model(input_ids=ids, attention_mask=batch["attention_mask"]).logits.float()

    def hidden_gap(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per row: mean over blocks, real tokens and width of the squared student - teacher difference."""
        mask = batch["attention_mask"].unsqueeze(-1).float()
        gaps = [(((s.float() - t.float()) ** 2) * mask).sum((1, 2)) / (mask.sum((1, 2)) * s.shape[-1])
                for s, t in zip(self.student_blocks.out, self.teacher_blocks.out)]
        return torch.stack(gaps).mean(0)

    def close(self) -> None:
        self.teacher_blocks.remove()
        self.student_blocks.remove()
        if self.masking is not None:
            self.masking.remove()


class SoftTargetLoss:
    """The loop's loss hook: rows are found in the cached teacher logits by the batch's ``index``. Keeps the
    soft-target (KL) term per step on the device, read once after training (``soft_history``)."""

    def __init__(self, teacher_logits: torch.Tensor | None, temperature: float, alpha: float,
                 live: LiveTeacher | None = None, hidden_weight: float = 0.0):
        self.teacher, self.t, self.alpha = teacher_logits, temperature, alpha
        self.live, self.hidden_weight = live, hidden_weight
        self.soft: list[tuple[torch.Tensor, int]] = []

    def __call__(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "index" not in batch:
            raise TrainingError("distill needs padded batches (train.pack_tokens 0): packed rows carry no index")
        target = self.live.logits(batch) if self.live is not None else self.teacher[batch["index"]]
        kl = torch.nn.functional.kl_div(torch.log_softmax(logits / self.t, -1), torch.log_softmax(target / self.t, -1),
                                        log_target=True, reduction="none").sum(-1) * self.t ** 2
        ce = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
        self.soft.append((kl.detach().sum(), len(kl)))
        loss = self.alpha * kl + (1 - self.alpha) * ce
        if self.live is not None and self.hidden_weight > 0:
            loss = loss + self.hidden_weight * self.live.hidden_gap(batch)
        return loss.sum()

    def soft_history(self) -> list[float]:
        """Mean soft-target loss of each micro-batch, in training order."""
        return [float(s) / max(n, 1) for s, n in self.soft]


def teacher_logits(teacher_dir: Path, split: TokenizedSplit, pad_id: int, cache: Path | None) -> np.ndarray:
    """The teacher's logits for every row of ``split``: read from ``cache`` when it holds this teacher's for
    this split, else computed once (and written there)."""
    h = hashlib.sha256(_weights_digest(teacher_dir).encode())
    for array in (split.ids, split.offsets):
        h.update(np.ascontiguousarray(array).tobytes())
    key = h.hexdigest()[:16]
    path = cache / f"teacher_logits-{key}.npy" if cache else None
    if path is not None and path.is_file():
        return np.load(path)
    teacher = load_classifier(teacher_dir)
    logits = predict_logits(teacher, split, 128, pad_id, torch.device("cpu"))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, logits)
        tmp.replace(path)
    return logits


def _weights_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def student_train_config(train: TrainConfig, dcfg: DistillConfig) -> TrainConfig:
    """train's settings with the student's own: padded batches, full fine-tuning, best validation kept."""
    return dataclasses.replace(train, epochs=dcfg.epochs, max_steps=None, learning_rate=dcfg.learning_rate,
                               patience=dcfg.patience, eval_every=dcfg.eval_every, keep_best=True,
                               select_metric="val_loss", pack_tokens=0, freeze="none",
                               lora=dataclasses.replace(train.lora, enabled=False),
                               adversarial=dataclasses.replace(train.adversarial, enabled=False))


def distill(tokens: dict[str, TokenizedSplit], meta: dict[str, Any], teacher_dir: str | Path, cfg: TrainConfig,
            dcfg: DistillConfig, model_out: str | Path, checkpoint_dir: str | Path | None = None,
            task: str = "single_label") -> tuple[TrainResult, dict[str, Any]]:
    """Train the student of ``teacher_dir`` and write it to ``model_out`` atomically; its summary and lineage."""
    check_distillable_task(task)
    cfg = student_train_config(cfg, dcfg)
    teacher_dir = Path(teacher_dir)
    n_teacher = int(json.loads((teacher_dir / "config.json").read_text())["num_hidden_layers"])
    layers = student_layers(n_teacher, dcfg.layers)
    # a checkpoint resumes only the same student and loss (train's identity check covers the rest)
    own = hashlib.sha256(json.dumps(dataclasses.asdict(dcfg), sort_keys=True).encode()).hexdigest()[:8]
    ckpt = Path(checkpoint_dir) / f"L{'-'.join(map(str, layers))}-{own}" if checkpoint_dir else None
    run = setup_run(tokens, meta, teacher_dir, cfg, reshape=lambda m: build_student(m, layers))
    hook, live = _soft_targets(run, teacher_dir, tokens["train"], meta, dcfg, layers, checkpoint_dir)
    run.loss_fn = hook
    state = resume_run(run, meta, ckpt)
    try:
        train_loop(run, state)
    finally:
        if live is not None:
            live.close()  # the student is exported without its hooks
    result = export_run(run, state, model_out)
    soft = hook.soft_history()
    info = {"teacher_layers": n_teacher, "student_layers": layers, "temperature": dcfg.temperature,
            "alpha": dcfg.alpha, "hidden_weight": dcfg.hidden_weight, "mask_rate": dcfg.mask_rate,
            "teacher_parameters": _parameters(teacher_dir),
            "student_parameters": result.parameters, "soft_loss_first": soft[0] if soft else None,
            "soft_loss_last": float(np.mean(soft[-max(1, len(soft) // 10):])) if soft else None}
    return result, info


def _soft_targets(run, teacher_dir: Path, train_split: TokenizedSplit, meta: dict[str, Any], dcfg: DistillConfig,
                  layers: list[int], checkpoint_dir: str | Path | None) -> tuple[SoftTargetLoss, LiveTeacher | None]:
    """The loss hook: with hidden-state transfer or masking the teacher runs live beside the student; without,
    its logits on the train split are computed once and cached next to the checkpoints."""
    if dcfg.hidden_weight > 0 or dcfg.mask_rate > 0:
        masking = _masking(run, dcfg) if dcfg.mask_rate > 0 else None
        # block outputs are kept only when the hidden-state term reads them
        live = LiveTeacher(load_classifier(teacher_dir, run.dist.device), run.model,
                           layers if dcfg.hidden_weight > 0 else [], masking)
        return SoftTargetLoss(None, dcfg.temperature, dcfg.alpha, live, dcfg.hidden_weight), live
    pad_id = int(meta["tokenizer"].get("pad_token_id") or 0)
    cached = teacher_logits(teacher_dir, train_split, pad_id, Path(checkpoint_dir) if checkpoint_dir else None)
    return SoftTargetLoss(torch.from_numpy(cached).to(run.dist.device), dcfg.temperature, dcfg.alpha), None


def _masking(run, dcfg: DistillConfig) -> TokenMasking:
    """Masking with the teacher's own tokenizer's mask token; its special tokens are never masked."""
    if getattr(run.tok, "mask_token_id", None) is None:
        raise TrainingError(f"distill.mask_rate = {dcfg.mask_rate}: the teacher's tokenizer has no mask token; "
                            f"set distill.mask_rate to 0")
    return TokenMasking(run.model, dcfg.mask_rate, int(run.tok.mask_token_id), list(run.tok.all_special_ids),
                        run.cfg.seed)


def _parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            total += sum(int(np.prod(fh.get_slice(k).get_shape())) for k in fh.keys())
    return total
