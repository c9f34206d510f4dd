"""Training checkpoints: model + optimizer + scheduler + RNG in safetensors and JSON (no pickle), written
atomically, pruned to the newest few. Each stores the whole resolved identity of its run (train config, data
meta, base model), so a run resumes only its own checkpoints and says which keys differ when it refuses one."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from finetune.common.config import TrainConfig
from finetune.common.files import read_json, write_json
from finetune.common.outputs import MARKER, DiskFull, atomic_dir

log = logging.getLogger(__name__)


# settings that change neither the model nor the data order: a run may resume across changes to them
_NEUTRAL = ("log_every", "checkpoint_every", "threads")


def run_identity(cfg: TrainConfig, meta: dict[str, Any], base: Path) -> dict[str, Any]:
    keep = {k: v for k, v in asdict(cfg).items() if k not in _NEUTRAL}
    return json.loads(json.dumps({"train": keep, "meta": meta, "base": str(base.resolve())}, default=str))


def fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    return {k: v for key, val in d.items() for k, v in _flat(val, f"{prefix}.{key}" if prefix else key).items()}


def differing_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ, e.g. ``train.learning_rate: 0.005 -> 0.001``."""
    a, b = _flat(old), _flat(new)
    return [f"{k}: {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def save(root: Path, step: int, identity: dict[str, Any], model, opt, sched, history, keep: int = 2,
         extra: dict[str, Any] | None = None, best: dict[str, torch.Tensor] | None = None) -> None:
    """``extra``: JSON state to resume with (validation history, best-so-far); ``best``: the best weights."""

    target = root / f"step-{step:07d}"
    if target.exists() and not (target / MARKER).is_file():
        if (target / "state.json").is_file():  # a stale checkpoint of a version before the marker: ours
            shutil.rmtree(target)
        else:  # not train's: keep it, and train on without this checkpoint rather than fail
            log.warning("%s exists and was not written by train: checkpoint of step %d skipped", target, step)
            return
    try:
        _write(target, step, identity, model, opt, sched, history, extra, best)
    except DiskFull as exc:  # the older checkpoints are only pruned after a complete write: they are all there
        last = sorted(_owned(root))
        raise DiskFull(f"{exc}; training stopped at step {step}, "
                       + (f"the last complete checkpoint {last[-1]} is kept: a rerun resumes from it" if last else
                          "no earlier checkpoint exists")) from None
    for old in sorted(_owned(root))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _write(target: Path, step: int, identity: dict[str, Any], model, opt, sched, history,
           extra: dict[str, Any] | None, best: dict[str, torch.Tensor] | None) -> None:
    with atomic_dir(target, "train") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        osd = opt.state_dict()
        tensors = {f"{pid}.{k}": v.cpu() for pid, st in osd["state"].items() for k, v in st.items()}
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, tmp / "optimizer.safetensors")
        if best is not None:
            save_file(best, tmp / "best.safetensors")
        write_json(tmp / "state.json", {"step": step, "fingerprint": fingerprint(identity), "identity": identity,
                                        "param_groups": osd["param_groups"], "scheduler": sched.state_dict(),
                                        "history": history, "extra": extra or {}})


def find(root: Path | None, identity: dict[str, Any]) -> Path | None:
    """The newest complete checkpoint of this run; checkpoints of another run are logged (with the keys that
    differ) and left for :func:`clear`."""
    if root is None or not root.is_dir():
        return None
    fp = fingerprint(identity)
    for cand in sorted(root.glob("step-*"), reverse=True):  # temp folders start with '.', never match
        state = cand / "state.json"
        if not state.is_file():
            continue
        saved = read_json(state)
        if saved.get("fingerprint") == fp:
            return cand
        diff = differing_keys(saved.get("identity", {}), identity) or ["(stored by an older version)"]
        log.warning("not resuming from %s: it belongs to another run; differing: %s", cand, "; ".join(diff))
    return None


def load(path: Path, model, opt, sched) -> tuple[int, list[dict[str, float]]]:

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


def load_extra(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """What :func:`save` got as ``extra`` and ``best`` (empty / None when it got none)."""

    best = path / "best.safetensors"
    return read_json(path / "state.json").get("extra") or {}, load_file(best) if best.is_file() else None


def clear(root: Path | None) -> None:
    if root is not None:
        for old in _owned(root):
            shutil.rmtree(old, ignore_errors=True)


def _owned(root: Path) -> list[Path]:
    """The ``step-*`` folders train wrote (marker, or state.json from before the marker): the only ones it deletes,
    whatever else the checkpoint folder holds."""
    return [p for p in root.glob("step-*") if (p / MARKER).is_file() or (p / "state.json").is_file()]
