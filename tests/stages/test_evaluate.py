import json

import numpy as np
import pytest

from conftest import toy_frame
from finetune.common.config import EvaluateConfig, TokenizeConfig
from finetune.stages.evaluate import evaluate, write_evaluation
from finetune.stages.tokenize import tokenize
from finetune.tasks.single_label import classification_metrics
from finetune.training.model import MismatchError


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
    from finetune.common.config import TrainConfig
    from finetune.stages.train import train

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
    for png in ("confusion_matrix.png", "calibration.png", "roc.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0.0 <= metrics["per_class"]["fresh"]["roc_auc"] <= 1.0
    rows = (tmp_path / "roc.csv").read_text().splitlines()
    assert rows[0] == "class,fpr,tpr,threshold" and {r.split(",")[0] for r in rows[1:]} == {"fresh", "rotten"}
    assert rows[1].startswith("fresh,0.000000,0.000000") and rows[-1].startswith("rotten,1.000000,1.000000")


def test_label_mismatch_is_refused(tiny_classifier):
    model, toks, meta = tiny_classifier
    with pytest.raises(MismatchError, match="predicts labels"):
        evaluate(model, toks["test"], {**meta, "labels": ["neg", "pos"]}, EvaluateConfig())
    with pytest.raises(MismatchError, match="tokenizer"):
        evaluate(model, toks["test"], {**meta, "tokenizer": {**meta["tokenizer"], "vocab_size": 5}}, EvaluateConfig())


def test_roc_by_hand():
    from finetune.tasks.single_label import curves as roc_curves

    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    roc = roc_curves(y, np.c_[1 - p1, p1], ["neg", "pos"])
    pos = roc["pos"]
    assert list(zip(pos["fpr"], pos["tpr"])) == [(0, 0), (0, 0.5), (0.5, 0.5), (0.5, 1), (1, 1)]
    assert pos["threshold"][1:] == [0.8, 0.4, 0.35, 0.1]
    assert pos["auc"] == pytest.approx(0.75) and roc["neg"]["auc"] == pytest.approx(0.75)
    # tied scores are one threshold (a diagonal step); a class absent from the labels has no curve
    tied = roc_curves(np.array([0, 1, 0, 1]), np.full((4, 3), 1 / 3), ["a", "b", "c"])
    assert set(tied) == {"a", "b"} and tied["a"]["auc"] == pytest.approx(0.5) and len(tied["a"]["fpr"]) == 2
    # thinned for plotting, the area still from every point
    rng = np.random.default_rng(0)
    yy = rng.integers(0, 2, 5000)
    pp = np.clip(yy * 0.3 + rng.random(5000) * 0.7, 0, 1)
    big = roc_curves(yy, np.c_[1 - pp, pp], ["a", "b"], max_points=100)["b"]
    assert len(big["fpr"]) <= 100 and big["fpr"][0] == 0 and big["tpr"][-1] == 1
    ranks = pp.argsort().argsort() + 1  # Mann-Whitney U: AUC from ranks (no ties in random floats)
    u = (ranks[yy == 1].sum() - (yy == 1).sum() * ((yy == 1).sum() + 1) / 2) / ((yy == 1).sum() * (yy == 0).sum())
    assert big["auc"] == pytest.approx(u, abs=1e-6)


def test_inference_with_progress_gives_the_same_logits_and_reports(tiny_classifier, caplog):
    import io

    import torch

    from finetune.stages.evaluate import logits_with_progress
    from finetune.training.model import load_classifier, predict_logits

    model_dir, toks, _ = tiny_classifier
    model = load_classifier(model_dir)
    test = toks["test"]
    plain = predict_logits(model, test, 3, 0, torch.device("cpu"))
    with caplog.at_level("INFO", logger="finetune"):
        logged = logits_with_progress(model, test, 3, 0, torch.device("cpu"), every=0.0, stream=io.StringIO())
    assert np.array_equal(plain, logged)  # same batches, same padding: bit for bit
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluate:")]
    # not a terminal: plain lines with count, rate and ETA (20 texts in runs of 3*4: one line mid-way, one at the end)
    assert lines[0].startswith("evaluate: 12/20 texts (60%)") and "texts/s" in lines[0] and "ETA 0:00:" in lines[0]
    assert lines[-1].startswith("evaluate: 20/20 texts (100%)")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    caplog.clear()
    logits_with_progress(model, test, 3, 0, torch.device("cpu"), stream=term)
    bar = term.getvalue()
    assert "evaluate" in bar and "20/20" in bar and "texts/s" in bar and "<" in bar  # tqdm: rate, elapsed<ETA
    assert not [r for r in caplog.records if r.getMessage().startswith("evaluate:")]


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]  # signature, IHDR length and type, then width and height (big-endian)
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_many_classes_plot_and_roc_only_the_most_frequent(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune.common.tokens import TokenizedSplit, load_tokenizer, tokenizer_fingerprint

    labels = [f"c{i:02d}" for i in range(60)]
    model_dir = tmp_path / "model"
    AutoModelForSequenceClassification.from_pretrained(
        str(tiny_model_dir), num_labels=60, id2label=dict(enumerate(labels)),
        label2id={lab: i for i, lab in enumerate(labels)}).save_pretrained(model_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(model_dir)
    # classes 40..59 hold 5 texts each, the others 2: the 20 most frequent are c40..c59
    y = np.repeat(np.arange(60), [2] * 40 + [5] * 20)
    rng = np.random.default_rng(0)
    offsets = np.arange(len(y) + 1, dtype=np.int64) * 6
    test = TokenizedSplit(rng.integers(1000, 5000, int(offsets[-1])).astype(np.int32), offsets, y)
    meta = {"labels": labels, "tokenizer": tokenizer_fingerprint(load_tokenizer(model_dir))}
    res = evaluate(model_dir, test, meta, EvaluateConfig(batch_size=64))
    write_evaluation(res, tmp_path / "eval")

    roc_classes = {r.split(",")[0] for r in (tmp_path / "eval" / "roc.csv").read_text().splitlines()[1:]}
    assert roc_classes == {f"c{i}" for i in range(40, 60)}
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    # the full matrix and every class's AUC are still written
    assert len(metrics["confusion_matrix"]) == 60 and {len(r) for r in metrics["confusion_matrix"]} == {60}
    assert sum(map(sum, metrics["confusion_matrix"])) == len(y) == 180
    assert all("roc_auc" in metrics["per_class"][lab] for lab in labels)
    # the confusion image is drawn for 20 classes: (4 + 0.4 * 20) x (3.5 + 0.4 * 20) inches at 100 dpi,
    # where all 60 would give 2800 x 2750 pixels
    assert _png_size(tmp_path / "eval" / "confusion_matrix.png") == (1200, 1150)
