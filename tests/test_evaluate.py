import json

import numpy as np
import pytest

from conftest import toy_frame
from finetune.config import EvaluateConfig, TokenizeConfig
from finetune.evaluate import MismatchError, classification_metrics, evaluate, write_evaluation
from finetune.tokenize import tokenize


def test_metrics_by_hand():
    y = np.array([0, 0, 0, 1, 1, 2])
    probs = np.eye(3)[[0, 0, 1, 1, 1, 0]] * 0.7 + 0.1  # predictions 0,0,1,1,1,0; confidence 0.8 each
    m, calib = classification_metrics(y, probs, ["a", "b", "c"], bins=10)
    assert m["accuracy"] == pytest.approx(4 / 6, abs=1e-6)
    # class a: P=2/3 R=2/3; b: P=2/3 R=1; c: P=0 R=0
    assert m["per_class"]["a"] == {"precision": pytest.approx(2 / 3, abs=1e-6), "recall": pytest.approx(2 / 3, abs=1e-6),
                                   "f1": pytest.approx(2 / 3, abs=1e-6), "support": 3}
    assert m["per_class"]["b"]["f1"] == pytest.approx(0.8, abs=1e-6) and m["per_class"]["c"]["f1"] == 0.0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0) / 3, abs=1e-6)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["ece"] == pytest.approx(abs(0.8 - 4 / 6), abs=1e-6)  # all in one bin
    assert m["loss"] == pytest.approx(-(4 * np.log(0.8) + 2 * np.log(0.1)) / 6, abs=1e-5)
    assert [c["count"] for c in calib if c["count"]] == [6]


def test_perfectly_calibrated_has_zero_ece():
    y = np.array([0, 1] * 50)
    probs = np.eye(2)[y].astype(float)
    m, _ = classification_metrics(y, probs, ["x", "y"], bins=5)
    assert m["accuracy"] == 1.0 and m["ece"] == pytest.approx(0.0) and m["macro_f1"] == 1.0


@pytest.fixture(scope="module")
def tiny_classifier(tiny_model_dir, tmp_path_factory):
    from finetune.config import TrainConfig
    from finetune.train import train

    df = toy_frame(10)
    toks, meta = tokenize({"train": df, "val": df, "test": df}, ["fresh", "rotten"], tiny_model_dir,
                          TokenizeConfig(max_length=16))
    out = tmp_path_factory.mktemp("clf") / "model"
    train(toks, meta, tiny_model_dir, TrainConfig(max_steps=2, batch_size=8, threads=1, checkpoint_every=0), out)
    return out, toks, meta


def test_evaluate_writes_metrics_and_plots(tiny_classifier, tmp_path):
    model, toks, meta = tiny_classifier
    res = evaluate(model, toks["test"], meta, EvaluateConfig())
    write_evaluation(res, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"accuracy", "macro_f1", "loss", "ece", "per_class", "confusion_matrix"} <= set(metrics)
    assert sum(map(sum, metrics["confusion_matrix"])) == len(toks["test"]) == 20
    preds = (tmp_path / "predictions.csv").read_text().splitlines()
    assert preds[0] == "actual,predicted,confidence" and len(preds) == 21
    for png in ("confusion_matrix.png", "calibration.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_label_mismatch_is_refused(tiny_classifier):
    model, toks, meta = tiny_classifier
    with pytest.raises(MismatchError, match="predicts labels"):
        evaluate(model, toks["test"], {**meta, "labels": ["neg", "pos"]}, EvaluateConfig())
    with pytest.raises(MismatchError, match="tokenizer"):
        evaluate(model, toks["test"], {**meta, "tokenizer": {**meta["tokenizer"], "vocab_size": 5}}, EvaluateConfig())
