"""tokenize: turn the validated splits into token ids with the base model's fast tokenizer.

Stored unpadded (flat ids + offsets per split, .npz without pickle) so training pads per batch only
as far as the batch needs. lengths.csv (share of each split's texts per token length) feeds `dvc plots`
and the run report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from .config import TokenizeConfig
from .io import atomic_dir, read_json, write_json
from .validate import SPLITS


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
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"no usable tokenizer in {model_dir}: {exc}") from exc
    if not tok.is_fast:
        raise TokenizerError(f"tokenizer in {model_dir} is not a fast tokenizer")
    return tok


def tokenizer_fingerprint(tok) -> dict[str, Any]:
    """What must match between tokenize, train and evaluate."""
    return {"vocab_size": len(tok), "class": type(tok).__name__, "pad_token_id": tok.pad_token_id,
            "cls_token_id": tok.cls_token_id}


def encode(texts: list[str], labels: list[str], label_names: list[str], tok, cfg: TokenizeConfig) -> TokenizedSplit:
    index = {lab: i for i, lab in enumerate(label_names)}
    chunks: list[list[int]] = []
    for start in range(0, len(texts), cfg.batch_size):
        enc = tok(texts[start:start + cfg.batch_size], truncation=True, max_length=cfg.max_length,
                  padding=False, return_attention_mask=False, return_token_type_ids=False)
        chunks.extend(enc["input_ids"])
    lengths = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=len(chunks))
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter((t for c in chunks for t in c), dtype=np.int32, count=int(offsets[-1]))
    return TokenizedSplit(ids, offsets, np.array([index[lab] for lab in labels], dtype=np.int64))


def tokenize(splits: dict[str, pd.DataFrame], label_names: list[str], model_dir: str | Path,
             cfg: TokenizeConfig) -> tuple[dict[str, TokenizedSplit], dict[str, Any]]:
    """Tokenize each split; returns the arrays and a stats/meta dict."""
    tok = load_tokenizer(model_dir)
    out, stats = {}, {}
    for name, frame in splits.items():
        ts = encode(frame["text"].tolist(), frame["label"].tolist(), label_names, tok, cfg)
        lens = ts.lengths
        out[name] = ts
        stats[name] = {"rows": len(ts), "tokens": int(lens.sum()), "mean_length": round(float(lens.mean()), 2),
                       "max_length": int(lens.max()), "truncated": int((lens >= cfg.max_length).sum())}
    meta = {"labels": label_names, "max_length": cfg.max_length, "tokenizer": tokenizer_fingerprint(tok),
            "stats": stats}
    return out, meta


def length_shares(tokens: dict[str, TokenizedSplit], max_length: int) -> list[dict[str, float]]:
    """One row per token length 1..max_length: the share of each split's texts with that length (a text at
    ``max_length`` was probably truncated)."""
    counts = {name: np.bincount(ts.lengths, minlength=max_length + 1)[: max_length + 1] / max(1, len(ts))
              for name, ts in tokens.items()}
    return [{"length": n, **{name: round(float(c[n]), 6) for name, c in counts.items()}}
            for n in range(1, max_length + 1)]


# ---- storage, shared by the CLI and KFP wrappers ----

def read_splits(split_dir: str | Path) -> tuple[dict[str, pd.DataFrame], list[str]]:
    d = Path(split_dir)
    return {s: pd.read_parquet(d / f"{s}.parquet") for s in SPLITS}, read_json(d / "labels.json")


def write_tokens(tokens: dict[str, TokenizedSplit], meta: dict[str, Any], out_dir: str | Path,
                 inputs: Iterable[str | Path] = ()) -> None:
    with atomic_dir(out_dir, "tokenize", inputs) as tmp:
        for name, ts in tokens.items():
            np.savez(tmp / f"{name}.npz", ids=ts.ids, offsets=ts.offsets, labels=ts.labels)
        rows = length_shares(tokens, meta["max_length"])
        names = list(tokens)
        with (tmp / "lengths.csv").open("w", encoding="utf-8") as fh:
            fh.write(",".join(["length", *names]) + "\n")
            fh.writelines(",".join(str(r[c]) for c in ["length", *names]) + "\n" for r in rows)
        write_json(tmp / "meta.json", meta)


def read_tokens(token_dir: str | Path, names=SPLITS) -> tuple[dict[str, TokenizedSplit], dict[str, Any]]:
    d = Path(token_dir)
    out = {}
    for name in names:
        with np.load(d / f"{name}.npz", allow_pickle=False) as z:
            out[name] = TokenizedSplit(z["ids"], z["offsets"], z["labels"])
    return out, read_json(d / "meta.json")
