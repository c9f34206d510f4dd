"""Locate the pretrained base model on disk. Nothing is ever downloaded from a model hub."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from finetune.common.coercion import ConfigError
from finetune.common.config import Config

# Belt and braces: transformers must never try the network, in any stage.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class ModelNotFound(FileNotFoundError):
    pass


def resolve_base(base: str) -> Path:
    """``pkg:<module>`` -> the folder that the installed package's get_model_path() returns; else a local folder."""
    if base.startswith("pkg:"):
        name = base[4:]
        try:
            mod = importlib.import_module(name)
        except ImportError as exc:
            raise ModelNotFound(f"base model package '{name}' is not installed (model.base={base})") from exc
        path = Path(mod.get_model_path())
    else:
        path = Path(base)
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"base model folder {path} has no config.json (model.base={base})")
    return path


def check_model_limits(cfg: Config, model_dir: str | Path) -> None:
    """Limits that depend on the base model, checked before a stage does any work."""

    conf = Path(model_dir) / "config.json"
    model_cfg = json.loads(conf.read_text(encoding="utf-8")) if conf.is_file() else {}
    positions = model_cfg.get("max_position_embeddings")
    if positions and cfg.tokenize.max_length > positions:
        raise ConfigError(f"tokenize.max_length = {cfg.tokenize.max_length}: must be <= {positions}, the "
                          f"max_position_embeddings of the base model {cfg.model.base}")
    layers = model_cfg.get("num_hidden_layers")
    if layers and (cfg.train.frozen_layers or 0) > layers:
        raise ConfigError(f"train.freeze = {cfg.train.freeze!r}: must be <= {layers}, the num_hidden_layers of the "
                          f"base model {cfg.model.base} (or none, encoder)")
