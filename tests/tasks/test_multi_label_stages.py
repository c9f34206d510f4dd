"""task: multi_label through the stage cores on a tiny random BERT and generated data: validate -> tokenize
(multi-hot labels) -> train (BCE, thresholds tuned on val and stored with the model) -> evaluate (tuned and 0.5
figures, PR curves) -> compress (ONNX parity, int8 gate on micro-F1); refusals of regimes that do not apply."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_multi_label import CFG, LABELS, ml_frame

from finetune.common.config import CompressConfig, DataConfig, EvaluateConfig, TokenizeConfig, TrainConfig
from finetune.common.outputs import ONNX_FP32
from finetune.stages.compress import compress, measure, onnx_runner, torch_runner
from finetune.stages.evaluate import evaluate, write_evaluation
from finetune.stages.tokenize import tokenize
from finetune.stages.train import train
from finetune.stages.validate import validate
from finetune.tasks import multi_label as ml
from finetune.training.model import load_classifier
from finetune.training.recipe import TrainingError

SRC = Path(__file__).resolve().parents[2] / "src" / "finetune"


@pytest.fixture(scope="module")
def ml_tokens(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("ml-data")
    ml_frame(160, seed=2).to_json(d / "d.jsonl", orient="records", lines=True)
    r = validate(d / "d.jsonl", DataConfig(), CFG, task_name="multi_label")
    assert r.ok, r.summary()
    return tokenize(r.splits, r.labels, tiny_model_dir, TokenizeConfig(max_length=16), "multi_label")


@pytest.fixture(scope="module")
def ml_model(ml_tokens, tiny_model_dir, tmp_path_factory):
    toks, meta = ml_tokens
    out = tmp_path_factory.mktemp("ml-model") / "model"
    result = train(toks, meta, tiny_model_dir, TrainConfig(epochs=8, batch_size=16, learning_rate=3e-3, device="cpu",
                                                          threads=1, select_metric="val_micro_f1"), out)
    return out, result


def test_tokens_hold_multi_hot_rows(ml_tokens):
    toks, meta = ml_tokens
    assert meta["task"] == "multi_label" and meta["labels"] == LABELS
    assert toks["train"].labels.shape == (len(toks["train"]), len(LABELS)) and toks["train"].labels.max() == 1


def test_training_learns_and_stores_val_tuned_thresholds(ml_model):
    out, result = ml_model
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    stored = json.loads((out / ml.THRESHOLDS_FILE).read_text())
    assert stored["labels"] == LABELS and stored["tuned_on"].startswith("val")
    assert json.loads((out / "config.json").read_text())["problem_type"] == "multi_label_classification"
    assert "val_micro_f1" in result.val_history[-1]


def test_evaluate_reports_tuned_and_default_figures_and_pr_curves(ml_model, ml_tokens, tmp_path):
    out, _ = ml_model
    toks, meta = ml_tokens
    r = evaluate(out, toks["test"], meta, EvaluateConfig(), device="cpu")
    m = r.metrics
    for key in ("micro_f1", "macro_f1", "samples_f1", "subset_accuracy", "hamming_loss"):
        assert 0.0 <= m[key] <= 1.0
    assert set(m["at_default_threshold"]) >= {"micro_f1", "macro_f1"}
    assert list(m["thresholds"]) == LABELS
    assert m["micro_f1"] > 0.4  # the generated texts name their labels: the tiny model learns some of it
    write_evaluation(r, tmp_path / "ev")
    head = (tmp_path / "ev" / "predictions.csv").read_text().splitlines()[0]
    assert head == "actual,predicted," + ",".join(f"p_{lab}" for lab in LABELS)
    assert (tmp_path / "ev" / "roc.csv").read_text().startswith("class,recall,precision,threshold")
    assert "average_precision" in m["per_class"]["a"]


def test_onnx_matches_pytorch_and_int8_is_gated_on_micro_f1(ml_model, ml_tokens, tmp_path):
    out, _ = ml_model
    toks, meta = ml_tokens
    res = compress(out, toks["test"], meta, CompressConfig(threads=1, latency_requests=3), tmp_path / "c")
    torch_p, _ = measure(torch_runner(load_classifier(out), 1), toks["test"], 0, 8, 1, ml)
    onnx_p, _ = measure(onnx_runner(tmp_path / "c" / ONNX_FP32, 1), toks["test"], 0, 8, 1, ml)
    assert np.abs(torch_p - onnx_p).max() < 1e-4  # sigmoid probabilities, not softmax rows
    assert not np.allclose(torch_p.sum(1), 1.0)
    assert "micro_f1" in res.message and "micro_f1_delta" in res.metrics["variants"]["onnx_int8"]


def test_packing_is_refused_for_multi_label(ml_tokens, tiny_model_dir, tmp_path):
    toks, meta = ml_tokens
    with pytest.raises(TrainingError, match="train.pack_tokens > 0: packing is for single-label"):
        train(toks, meta, tiny_model_dir, TrainConfig(max_steps=1, pack_tokens=256, device="cpu"), tmp_path / "m")


def _pyfunc(module_file: str, folder, **conf):
    """The self-contained pyfunc class of ``module_file``, loaded on ``folder`` as MLflow would (the files the
    registry logs beside it, code_paths, importable by their own names)."""
    import importlib.util
    import sys
    import types

    from finetune.common import row_parallel

    sys.modules.setdefault("row_parallel", row_parallel)

    spec = importlib.util.spec_from_file_location(f"pyfunc_{module_file}", SRC / "registry" / module_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    impl = (mod.TextClassifier if module_file == "pyfunc_model.py" else mod.OnnxTextClassifier)()
    impl.load_context(types.SimpleNamespace(artifacts={"model": str(folder)}, model_config=conf))
    return impl


def test_stored_thresholds_decide_in_the_fp32_and_int8_pyfuncs_and_the_server(ml_model, ml_tokens, tmp_path):
    import hashlib
    import shutil

    from finetune.serving.model import ServedModel

    out, _ = ml_model
    folder = tmp_path / "model"
    shutil.copytree(out, folder)
    texts = ["text 1 about a and b", "text 2 about c", "text 3 about rare"]
    fp32 = _pyfunc("pyfunc_model.py", folder)
    records = fp32.predict(None, texts, params={"probabilities": True})
    probs = np.array([[r["probabilities"][lab] for lab in LABELS] for r in records])
    stored = np.array(json.loads((folder / ml.THRESHOLDS_FILE).read_text())["thresholds"])
    assert [r["labels"] for r in records] == ml.decide(probs, LABELS, stored)
    # thresholds just under / over each text's probability of 'c': the decision follows the stored file
    for cut, expect in ((probs[:, 2].min() - 1e-6, True), (probs[:, 2].max() + 1e-6, False)):
        th = stored.copy()
        th[2] = cut
        (folder / ml.THRESHOLDS_FILE).write_text(json.dumps({"labels": LABELS, "thresholds": th.tolist()}))
        got = _pyfunc("pyfunc_model.py", folder).predict(None, texts)
        assert all(("c" in labels) == expect for labels in got)
    compress(folder, ml_tokens[0]["test"], ml_tokens[1], CompressConfig(threads=1, latency_requests=2),
             tmp_path / "c")
    sha = hashlib.sha256((tmp_path / "c" / "model.int8.onnx").read_bytes()).hexdigest()
    int8 = _pyfunc("onnx_pyfunc_model.py", tmp_path / "c", onnx_sha256=sha, max_length=16)
    assert all("c" not in labels for labels in int8.predict(None, texts))  # the copied thresholds.json decides
    served = ServedModel("m", "local", "int8", LABELS, int8)
    answer = served.records(served.predict_proba(texts))
    assert set(answer[0]) == {"labels", "probabilities"} and list(answer[0]["probabilities"]) == LABELS
