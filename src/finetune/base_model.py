"""Locate the pretrained base model on disk. Nothing is ever downloaded from a model hub."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

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
