"""tokenize: turn the validated splits into token ids with the base model's fast tokenizer.

Stored unpadded (flat ids + offsets per split, .npz without pickle) so training pads per batch only
as far as the batch needs. lengths.csv (share of each split's texts per token length) feeds `dvc plots`
and the run report.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from finetune.common.base_model import check_model_limits, resolve_base
from finetune.common.config import Config, TokenizeConfig
from finetune.common.files import write_json
from finetune.common.outputs import atomic_dir, check_output_dir
from finetune.common.tokens import TokenizedSplit, load_tokenizer, read_splits, tokenizer_fingerprint
from finetune.tasks import task_for

log = logging.getLogger("finetune")  # the stage's own lines: "INFO finetune: ..."


def encode(texts: list[str], labels: list, label_names: list[str], tok, cfg: TokenizeConfig,
           task: str = "single_label") -> TokenizedSplit:
    """Token ids of ``texts`` and the task's label array (class ids, multi-hot rows, ...)."""
    chunks: list[list[int]] = []
    for start in range(0, len(texts), cfg.batch_size):
        enc = tok(texts[start:start + cfg.batch_size], truncation=True, max_length=cfg.max_length,
                  padding=False, return_attention_mask=False, return_token_type_ids=False)
        chunks.extend(enc["input_ids"])
    lengths = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=len(chunks))
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter((t for c in chunks for t in c), dtype=np.int32, count=int(offsets[-1]))
    return TokenizedSplit(ids, offsets, task_for(task).encode_labels(labels, label_names))


def tokenize(splits: dict[str, pd.DataFrame], label_names: list[str], model_dir: str | Path,
             cfg: TokenizeConfig, task: str = "single_label") -> tuple[dict[str, TokenizedSplit], dict[str, Any]]:
    """Tokenize each split; returns the arrays and a stats/meta dict (which records the task)."""
    tok = load_tokenizer(model_dir)
    out, stats = {}, {}
    encode_rows = getattr(task_for(task), "encode_rows", None)  # a task whose rows are tagged words (token)
    for name, frame in splits.items():
        texts, labels, extra = frame["text"].tolist(), frame["label"].tolist(), {}
        if encode_rows:  # word/sub-token alignment; entities cut by max_length counted
            ts, extra = encode_rows(texts, labels, label_names, tok, cfg.max_length)
        else:
            ts = encode(texts, labels, label_names, tok, cfg, task)
        lens = ts.lengths
        out[name] = ts
        stats[name] = {"rows": len(ts), "tokens": int(lens.sum()), "mean_length": round(float(lens.mean()), 2),
                       "max_length": int(lens.max()), "truncated": int((lens >= cfg.max_length).sum()), **extra}
    meta = {"task": task, "labels": label_names, "max_length": cfg.max_length, "tokenizer": tokenizer_fingerprint(tok),
            "stats": stats}
    return out, meta


def length_shares(tokens: dict[str, TokenizedSplit], max_length: int) -> list[dict[str, float]]:
    """One row per token length 1..max_length: the share of each split's texts with that length (a text at
    ``max_length`` was probably truncated)."""
    counts = {name: np.bincount(ts.lengths, minlength=max_length + 1)[: max_length + 1] / max(1, len(ts))
              for name, ts in tokens.items()}
    return [{"length": n, **{name: round(float(c[n]), 6) for name, c in counts.items()}}
            for n in range(1, max_length + 1)]


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


def run_tokenize(cfg: Config, splits: str | Path, out: str | Path) -> dict[str, Any]:

    check_output_dir(out, [splits])
    base = resolve_base(cfg.model.base)
    check_model_limits(cfg, base)
    frames, labels = read_splits(splits)
    tokens, meta = tokenize(frames, labels, base, cfg.tokenize, cfg.task)
    write_tokens(tokens, meta, out, [splits])
    log.info("tokenized: %s", meta["stats"])
    return meta
