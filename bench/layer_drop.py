"""Layer drop without any retraining: validation and test accuracy of the fine-tuned model with each of its
encoder layers (then each pair) removed, the rest kept as trained. The cheapest structured pruning there is, and
the starting point a student inherits: `finetune distill --set distill.layers=[...]` keeps the layers named.

    python bench/layer_drop.py --model out/model --tokens out/tokenize --json layer_drop.json

See docs/benchmarks.md ("Distillation, pruning and the serving front").
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from finetune.common.tokens import read_tokens  # noqa: E402
from finetune.training.distill import build_student  # noqa: E402
from finetune.training.model import load_classifier, predict_logits  # noqa: E402


def accuracy(model, split, pad_id: int) -> float:
    logits = predict_logits(model, split, 64, pad_id, torch.device("cpu"))
    return round(float((logits.argmax(-1) == split.labels).mean()), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="out/model")
    ap.add_argument("--tokens", default="out/tokenize")
    ap.add_argument("--max-dropped", type=int, default=2, help="drop up to this many layers at once")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    toks, meta = read_tokens(args.tokens, names=("val", "test"))
    pad_id = int(meta["tokenizer"].get("pad_token_id") or 0)
    teacher = load_classifier(args.model)
    n = teacher.config.num_hidden_layers
    rows = [{"dropped": [], "val": accuracy(teacher, toks["val"], pad_id),
             "test": accuracy(teacher, toks["test"], pad_id)}]
    for k in range(1, min(args.max_dropped, n - 1) + 1):
        for dropped in itertools.combinations(range(n), k):
            student = build_student(teacher, [i for i in range(n) if i not in dropped])
            rows.append({"dropped": list(dropped), "val": accuracy(student, toks["val"], pad_id),
                         "test": accuracy(student, toks["test"], pad_id)})
            print(rows[-1], flush=True)
    print("| layers dropped | val accuracy | test accuracy |\n|---|---|---|")
    for r in rows:
        print(f"| {r['dropped'] or 'none'} | {r['val']} | {r['test']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
