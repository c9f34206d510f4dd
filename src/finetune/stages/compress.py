"""compress: export the fine-tuned classifier to ONNX, quantize it to int8, and measure what that costs.

Variants: ``pytorch_fp32`` (the baseline, as trained), ``onnx_fp32`` (torch's TorchScript-based exporter) and
``onnx_int8`` (ONNX Runtime dynamic quantization: int8 weights, activations quantized per batch, no calibration
data). Each is scored on the test split (the task's metrics, deltas to the baseline, label agreement) and timed in
this process: p50/p95 latency of one text per request, texts/s at ``compress.batch_size``, peak memory. ONNX files
run in the session the ONNX pyfunc models serve with (common/row_parallel.py: rows grouped by length, one
single-threaded call per group at once), so what is measured is what serves. The int8
variant passes the gate only if its drop stays within ``compress.max_accuracy_drop``; a model that cannot be
exported yields no variant and a message naming the model and the operator, never a failed pipeline.

Students (``finetune distill``, passed as ``students``) are exported, quantized and measured the same way, in the
same run: ``<student>_onnx_fp32`` and ``<student>_onnx_int8``. The ONNX variant with the most texts/s whose drop
against the fp32 teacher stays within ``serve.max_accuracy_drop`` (and p50 within ``serve.max_latency_ms`` when
set) is the serving choice (metrics.json ``serving``); none within: fp32 is served and ``serving.reason`` says why.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic

from finetune.common.config import CompressConfig, Config
from finetune.common.digests import FILE_DIGESTS, MODEL_DIGEST, folder_digests, model_digest
from finetune.common.files import write_json
from finetune.common.memory import peak_rss_growth
from finetune.common.outputs import (
    MARKER,
    METRICS,
    ONNX_FP32,
    ONNX_INT8,
    TEMP_MARKER,
    atomic_dir,
    check_output_dir,
    no_space_left,
)
from finetune.common.row_parallel import RowParallelSession
from finetune.common.tokens import TokenizedSplit, read_tokens
from finetune.stages.serving_front import ServeBudget, choose_serving, variant_file
from finetune.tasks import task_for
from finetune.training.batches import collate
from finetune.training.distill import labels_only
from finetune.training.model import MismatchError, load_classifier

log = logging.getLogger("finetune")  # the stage's own lines: "INFO finetune: ..."


GATED = "onnx_int8"


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx")


Runner = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (input_ids, attention_mask) -> logits


class ExportUnsupported(RuntimeError):
    """The model uses something the ONNX exporter cannot express: no compressed variant."""


@dataclass
class CompressResult:
    metrics: dict[str, Any]
    exported: bool
    passed: bool
    message: str
    files: dict[str, Path] = field(default_factory=dict)  # variant -> ONNX file inside the output folder
    probs: dict[str, np.ndarray] = field(default_factory=dict)  # variant -> test-split class probabilities


def export_onnx(model, path: str | Path, opset: int, model_name: str) -> None:
    """Write ``model``'s logits graph to ``path`` with dynamic batch and sequence axes.

    The TorchScript exporter (``dynamo=False``) works offline and exports BERT-style encoders in about a second.
    """

    class Logits(torch.nn.Module):  # a plain (ids, mask) -> logits signature: the serving contract
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    mask = torch.ones((2, 8), dtype=torch.long)
    mask[1, 5:] = 0  # a padded row, so the traced graph keeps the attention mask path
    example = (torch.ones((2, 8), dtype=torch.long), mask)
    with torch.no_grad():  # a token head's logits are (batch, sequence, tags): their sequence axis is dynamic too
        per_token = Logits(model.eval())(*example).dim() == 3
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "logits": {0: "batch", 1: "sequence"} if per_token else {0: "batch"}}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes on shape-dependent Python branches, checked by tests
            if Logits(model.eval())(*example).ndim == 3:  # a token head (NER): (batch, sequence, tags)
                axes["logits"][1] = "sequence"
            torch.onnx.export(Logits(model.eval()), example, str(path), input_names=["input_ids", "attention_mask"],
                              output_names=["logits"], dynamic_axes=axes, opset_version=opset, dynamo=False)
    except Exception as exc:  # the exporter raises several unrelated types for the same problem
        Path(path).unlink(missing_ok=True)
        if no_space_left(exc):  # a full disk says nothing of the model: the stage fails (DiskFull), not "no variant"
            raise
        raise ExportUnsupported(unsupported_message(model_name, opset, exc)) from exc


def unsupported_message(model_name: str, opset: int, exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # later lines dump the whole graph
    found = re.search(r"\b((?:aten|prim|onnx)::[A-Za-z_][\w.]*)", first)
    operator = found.group(1) if found else f"unknown ({first})"
    return (f"model {model_name} cannot be exported to ONNX (opset {opset}): operator {operator} is not supported; "
            f"no compressed variant, the pipeline goes on with the fp32 model")


PARITY_TOLERANCE = 1e-3  # largest |logit| difference of the fp32 graph against PyTorch on the first test texts


def check_onnx_parity(model, path: str | Path, split: TokenizedSplit, pad_id: int, model_name: str) -> float:
    """The exported fp32 graph must give PyTorch's logits on a padded batch of the test split (a graph that traced
    but computes something else, e.g. a shape baked in at export time, yields no variant)."""
    n = min(len(split), 8)
    if n == 0:
        return 0.0
    ids, mask = _batch(split, np.arange(n), pad_id)
    want = torch_runner(model, 0)(ids, mask)
    real = mask.astype(bool) if want.ndim == 3 else slice(None)  # per token: padding positions carry no answer
    diff = float(np.abs(onnx_runner(path, 0)(ids, mask)[real] - want[real]).max())
    if not diff <= PARITY_TOLERANCE:
        Path(path).unlink(missing_ok=True)
        raise ExportUnsupported(f"model {model_name}: the exported ONNX graph disagrees with PyTorch (max logit "
                                f"difference {diff:.4g} > {PARITY_TOLERANCE}); no compressed variant, the pipeline "
                                f"goes on with the fp32 model")
    return diff


def quantize_int8(src: str | Path, dst: str | Path, per_channel: bool = False) -> None:
    """Dynamic int8 quantization (QInt8 weights) of an fp32 ONNX model."""

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs an INFO line per tensor (and a generic tip) on the root logger
    try:
        quantize_dynamic(str(src), str(dst), per_channel=per_channel, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def torch_runner(model, threads: int) -> Runner:

    if threads:
        torch.set_num_threads(threads)
    model = model.eval()

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    return run


def onnx_runner(path: str | Path, threads: int) -> Runner:
    """The ONNX file in the session the ONNX pyfunc models serve with (row_parallel; 0 threads: the CPUs available)."""
    session = RowParallelSession(str(path), threads)

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return session({"input_ids": ids, "attention_mask": mask})
    return run


def _batch(split: TokenizedSplit, idx: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    b = collate(split, idx, pad_id)
    return b["input_ids"].numpy(), b["attention_mask"].numpy()


def measure(run: Runner, split: TokenizedSplit, pad_id: int, batch_size: int, latency_requests: int,
            task: ModuleType | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """The task's probabilities for every text of ``split`` and timings of ``run``.

    Throughput: the whole split in its own order (requests arrive unsorted), ``batch_size`` texts per call.
    Latency: the first ``latency_requests`` texts, one per call. One untimed call of each shape warms up.
    """
    n = len(split)
    batches = [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    if batches:
        run(*_batch(split, batches[0], pad_id))
    logits, start = [], time.perf_counter()
    for idx in batches:
        logits.append(run(*_batch(split, idx, pad_id)))
    seconds = time.perf_counter() - start
    singles = [_batch(split, np.array([i]), pad_id) for i in range(min(latency_requests, n))]
    if singles:
        run(*singles[0])
    per_request = []
    for ids, mask in singles:
        t0 = time.perf_counter()
        run(ids, mask)
        per_request.append(time.perf_counter() - t0)
    ms = np.array(per_request) * 1000 if per_request else np.zeros(1)
    timing = {"texts_per_s": round(n / seconds, 1) if seconds > 0 else 0.0,
              "latency_ms_p50": round(float(np.percentile(ms, 50)), 3),
              "latency_ms_p95": round(float(np.percentile(ms, 95)), 3)}
    return (task or task_for("single_label")).probabilities(_stack(logits).astype(np.float64)), timing


def _stack(logits: list[np.ndarray]) -> np.ndarray:
    """The batches' logits as one array; per-token logits (batch, sequence, tags) padded to the longest batch."""
    if not logits or logits[0].ndim == 2:
        return np.concatenate(logits)
    width = max(x.shape[1] for x in logits)
    return np.concatenate([np.pad(x, ((0, 0), (0, width - x.shape[1]), (0, 0))) for x in logits])


def variant_gate(baseline: dict[str, Any], candidate: dict[str, Any], max_drop: float,
                 metric: str = "accuracy") -> tuple[bool, str]:
    """int8 passes when the task's primary ``metric`` drops at most ``max_drop`` below fp32 PyTorch."""
    drop = baseline[metric] - candidate[metric]
    if drop <= max_drop + 1e-12:
        return True, (f"int8 variant passed: {metric} {candidate[metric]:.4f} vs fp32 {baseline[metric]:.4f} "
                      f"(drop {drop:.4f} <= compress.max_accuracy_drop {max_drop})")
    return False, (f"int8 variant refused: {metric} {candidate[metric]:.4f} vs fp32 {baseline[metric]:.4f}, "
                   f"drop {drop:.4f} > compress.max_accuracy_drop {max_drop}; the pipeline goes on with the fp32 model")


def variant_metrics(probs: np.ndarray, split: TokenizedSplit, labels: list[str], timing: dict[str, float],
                     size: int, reference: np.ndarray | None, task: ModuleType | None = None) -> dict[str, Any]:
    """The task's gate metrics of one variant, its size and timings (and its agreement with the reference)."""
    task = task or task_for("single_label")
    scores, _ = task.scores(split.labels, probs, labels, bins=10)
    out = {**{m: scores[m] for m in _shown(task)}, "size_mb": round(size / 2 ** 20, 2), **timing}
    if reference is not None:  # agreement with the baseline's decisions and the largest probability difference
        out["label_agreement"] = round(task.agreement(probs, reference, split.labels, labels), 6)
        out["max_probability_diff"] = round(float(np.abs(probs - reference).max()), 6) if len(probs) else 0.0
    return out


def export_student(folder: Path, tmp: Path, cfg: CompressConfig, labels: list[str]) -> dict[str, tuple[str, str]]:
    """A student's fp32 and int8 ONNX files in ``tmp``: variant -> (file, how it was made)."""
    model = load_classifier(folder)
    if [model.config.id2label[i] for i in range(model.config.num_labels)] != labels:
        raise MismatchError(f"student {folder} predicts other labels than the test data's {labels}")
    info = json.loads((folder / "distill.json").read_text()) if (folder / "distill.json").is_file() else {}
    # alpha 0: the teacher's layers fine-tuned on the labels alone (layer-drop pruning, distillation's baseline)
    kind = "pruned" if labels_only(info.get("alpha"), info.get("hidden_weight", 0)) else "student"
    name = f"{kind}_L{model.config.num_hidden_layers}"
    how = info.get("made_by", f"{kind} {folder.name}")
    fp32, int8 = f"{name}.onnx", f"{name}.int8.onnx"
    if (tmp / fp32).exists():
        raise MismatchError(f"two {kind}s of {model.config.num_hidden_layers} layers ({folder}): one per depth")
    export_onnx(model, tmp / fp32, cfg.opset, name)
    quantize_int8(tmp / fp32, tmp / int8, cfg.per_channel)
    return {f"{name}_onnx_fp32": (fp32, f"{how}; ONNX"), f"{name}_onnx_int8": (int8, f"{how}; ONNX, dynamic int8")}


def _shown(task: ModuleType) -> tuple[str, ...]:
    """accuracy and macro-F1 (the card's columns; multi-label accuracy = subset accuracy), then the task's."""
    return tuple(dict.fromkeys(("accuracy", "macro_f1", *task.GATE_METRICS)))


def with_deltas(variants: dict[str, dict[str, Any]], metrics: tuple[str, ...] = ("accuracy", "macro_f1")) -> None:
    base = variants["pytorch_fp32"]
    for name, v in variants.items():
        if name != "pytorch_fp32":
            for m in metrics:  # the task's gate metrics
                v[f"{m}_delta"] = round(v[m] - base[m], 6)
            v["size_ratio"] = round(base["size_mb"] / v["size_mb"], 2) if v["size_mb"] else None
            v["speedup"] = round(v["texts_per_s"] / base["texts_per_s"], 2) if base["texts_per_s"] else None


def compress(model_dir: str | Path, test: TokenizedSplit, meta: dict[str, Any], cfg: CompressConfig,
             out_dir: str | Path, model_name: str | None = None, students: list[str | Path] = (),
             budget: ServeBudget | None = None) -> CompressResult:
    """Export, quantize, measure and gate; the output folder is replaced only when everything is written.

    ``out_dir`` gets model.onnx, model.int8.onnx, the tokenizer and config files of ``model_dir``, and
    metrics.json (last). Unsupported model: only metrics.json, saying why.
    """
    model_dir = Path(model_dir)
    name = model_name or model_dir.name
    digest = model_digest(model_dir)  # binds these figures and files to this model: register checks it
    labels = meta["labels"]
    task = task_for(meta.get("task", "single_label"))
    pad_id = int(meta["tokenizer"].get("pad_token_id") or 0)
    model = load_classifier(model_dir)
    model_labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if model_labels != labels:
        raise MismatchError(f"model {model_dir} predicts labels {model_labels}, test data has {labels}")
    common = {"model": name, MODEL_DIGEST: digest, "n": len(test), "batch_size": cfg.batch_size, "threads": cfg.threads,
              "max_accuracy_drop": cfg.max_accuracy_drop}
    with atomic_dir(out_dir, "compress", [model_dir]) as tmp:
        try:
            export_onnx(model, tmp / ONNX_FP32, cfg.opset, name)
            common["parity_max_logit_diff"] = round(check_onnx_parity(model, tmp / ONNX_FP32, test, pad_id, name), 8)
        except ExportUnsupported as exc:
            metrics = {**common, "exported": False, "int8_passed": False, "message": str(exc), "variants": {}}
            write_json(tmp / METRICS, metrics)
            return CompressResult(metrics, False, False, str(exc))
        quantize_int8(tmp / ONNX_FP32, tmp / ONNX_INT8, cfg.per_channel)
        for f in model_dir.iterdir():  # tokenizer + config: the ONNX folder serves on its own
            if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(f, tmp / f.name)
        torch_size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        runs = {"pytorch_fp32": (torch_runner(model, cfg.threads), torch_size),
                "onnx_fp32": (onnx_runner(tmp / ONNX_FP32, cfg.threads), (tmp / ONNX_FP32).stat().st_size),
                "onnx_int8": (onnx_runner(tmp / ONNX_INT8, cfg.threads), (tmp / ONNX_INT8).stat().st_size)}
        made = {"pytorch_fp32": "the teacher as trained", "onnx_fp32": "the teacher exported to ONNX",
                "onnx_int8": "the teacher exported to ONNX, dynamic int8"}
        for student in students:
            for variant, (file, how) in export_student(Path(student), tmp, cfg, labels).items():
                runs[variant] = (onnx_runner(tmp / file, cfg.threads), (tmp / file).stat().st_size)
                made[variant] = how
        variants, probs = {}, {}
        for variant, (run, size) in runs.items():
            with peak_rss_growth() as peak:  # above the loaded weights: activations, ONNX Runtime's arena
                probs[variant], timing = measure(run, test, pad_id, cfg.batch_size, cfg.latency_requests, task)
            timing["peak_memory_mb"] = peak["mb"]
            variants[variant] = variant_metrics(probs[variant], test, labels, timing, size, probs.get("pytorch_fp32")
                                                if variant != "pytorch_fp32" else None, task)
        with_deltas(variants, _shown(task))
        for variant, how in made.items():
            variants[variant]["made_by"] = how
        passed, message = variant_gate(variants["pytorch_fp32"], variants[GATED], cfg.max_accuracy_drop,
                                       task.GATE_METRICS[0])
        serving = choose_serving(variants, budget or ServeBudget(), task.GATE_METRICS[0], () if passed else (GATED,))
        metrics = {**common, "exported": True, "int8_passed": passed, "message": message, "variants": variants,
                   "serving": serving,
                   FILE_DIGESTS: {k: v for k, v in folder_digests(tmp).items()
                                  if k not in (METRICS, MARKER, TEMP_MARKER)}}  # the markers are no output
        write_json(tmp / METRICS, metrics)
    out = Path(out_dir)
    files = {v: out / variant_file(v) for v in metrics["variants"] if v != "pytorch_fp32"}
    return CompressResult(metrics, True, passed, message, files, probs)


def run_compress(cfg: Config, model: str | Path, tokens: str | Path, out: str | Path,
                 students: list[str | Path] = ()) -> dict[str, Any]:
    """ONNX + int8 variants of ``model`` (and of its ``students``), measured on the test split, and the serving
    choice. Never fails the pipeline for a model that cannot be exported or an int8 variant past the gate:
    metrics.json and the log say so."""

    check_output_dir(out, [model, tokens, *students])
    students = [s for s in students if (Path(s) / "config.json").is_file()]  # a skipped distill: no model
    toks, meta = read_tokens(tokens, names=("test",))
    budget = ServeBudget(cfg.serve.max_accuracy_drop, cfg.serve.max_latency_ms)
    result = compress(model, toks["test"], meta, cfg.compress, out, model_name=Path(model).name, students=students,
                      budget=budget)
    (log.info if result.passed else log.warning)("compress: %s", result.message)
    if result.exported:
        log.info("compress: serving %s: %s", result.metrics["serving"]["variant"], result.metrics["serving"]["reason"])
    if result.exported:
        v = result.metrics["variants"]
        log.info("compress: int8 %.1f MB (%.1fx smaller), %.1f texts/s (%.2fx fp32 PyTorch), p50 %.1f ms",
                 v["onnx_int8"]["size_mb"], v["onnx_int8"]["size_ratio"], v["onnx_int8"]["texts_per_s"],
                 v["onnx_int8"]["speedup"], v["onnx_int8"]["latency_ms_p50"])
    return result.metrics
