"""Tokenized splits as stored by the tokenize stage, and the tokenizer that made them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from transformers import AutoTokenizer

from finetune.common.files import read_json

SPLITS = ("train", "val", "test")


class TokenizerError(RuntimeError):
    pass


@dataclass
class TokenizedSplit:
    ids: np.ndarray  # int32, all sequences concatenated
    offsets: np.ndarray  # int64, len n+1: sequence i is ids[offsets[i]:offsets[i+1]]
    labels: np.ndarray  # int64 class indices

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.labels)

    def sequence(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]]


def load_tokenizer(model_dir: str | Path):

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"no usable tokenizer in {model_dir}: {exc}") from exc
    if not tok.is_fast:
        raise TokenizerError(f"tokenizer in {model_dir} is not a fast tokenizer")
    if tok.pad_token is None:  # decoder LLMs (Llama, GPT-2...) ship none: pad with end-of-text, saved with the model
        fill = tok.eos_token or tok.unk_token
        if fill is None:
            raise TokenizerError(f"tokenizer in {model_dir} has no pad, eos or unk token to pad batches with")
        tok.pad_token = fill
        tok.init_kwargs["pad_token_set_by"] = "finetune: none shipped, eos/unk used"
    return tok


def tokenizer_fingerprint(tok) -> dict[str, Any]:
    """What must match between tokenize, train and evaluate."""
    return {"vocab_size": len(tok), "class": type(tok).__name__, "pad_token_id": tok.pad_token_id,
            "cls_token_id": tok.cls_token_id}


def read_splits(split_dir: str | Path) -> tuple[dict[str, pd.DataFrame], list[str]]:
    d = Path(split_dir)
    return {s: pd.read_parquet(d / f"{s}.parquet") for s in SPLITS}, read_json(d / "labels.json")


def read_tokens(token_dir: str | Path, names=SPLITS) -> tuple[dict[str, TokenizedSplit], dict[str, Any]]:
    d = Path(token_dir)
    out = {}
    for name in names:
        with np.load(d / f"{name}.npz", allow_pickle=False) as z:
            out[name] = TokenizedSplit(z["ids"], z["offsets"], z["labels"])
    return out, read_json(d / "meta.json")
