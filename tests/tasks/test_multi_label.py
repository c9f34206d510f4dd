"""task: multi_label. The task module's arithmetic (metrics, thresholds, loss weights) against hand-made cases and
scikit-learn's definitions, and validate's multi-label path on generated data."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, hamming_loss

from finetune.common.config import DataConfig, ValidateConfig
from finetune.common.tokens import SPLITS
from finetune.stages.validate import validate
from finetune.tasks import multi_label as ml
from finetune.tasks import task_for

LABELS = ["a", "b", "c", "rare"]


def ml_frame(n: int = 120, seed: int = 0) -> pd.DataFrame:
    """Generated texts with 0-3 labels each; 'rare' on about 10% of the rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        labs = [lab for lab, p in zip(LABELS, (0.5, 0.4, 0.3, 0.1)) if rng.random() < p] or ["a"]
        rows.append({"text": f"text {i} about " + " and ".join(labs), "label": labs})
    return pd.DataFrame(rows)


CFG = ValidateConfig(labels=[], min_rows_per_class=5, val_fraction=0.2, test_fraction=0.2)


def test_metrics_match_sklearn_and_hand_counts():
    y = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    probs = np.array([[0.9, 0.2, 0.4], [0.1, 0.8, 0.6], [0.7, 0.3, 0.1], [0.2, 0.1, 0.3]])
    m, _ = ml.scores(y, probs, ["x", "y", "z"], bins=2)
    pred = (probs >= 0.5).astype(int)
    assert m["micro_f1"] == pytest.approx(f1_score(y, pred, average="micro"), abs=1e-6)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0), abs=1e-6)
    assert m["samples_f1"] == pytest.approx(f1_score(y, pred, average="samples", zero_division=1), abs=1e-6)
    assert m["hamming_loss"] == pytest.approx(hamming_loss(y, pred), abs=1e-6)
    assert m["subset_accuracy"] == 0.25  # rows 0 and 2 miss a label, row 1 adds z: only row 3 is exact
    assert m["per_class"]["z"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_tuned_thresholds_change_predictions_and_raise_validation_f1():
    # label 0 is always predicted at low probabilities: 0.5 misses it, its tuned threshold catches it
    y = np.array([[1, 0], [1, 1], [0, 1], [0, 0], [1, 0]])
    probs = np.array([[0.35, 0.1], [0.4, 0.9], [0.1, 0.8], [0.05, 0.2], [0.3, 0.3]])
    th = ml.tune_thresholds(y, probs)
    assert 0.1 < th[0] <= 0.3 and th[1] == 0.5  # label 1 is already perfect at 0.5: ties keep 0.5
    assert ml.decide(probs, ["x", "y"]) == [[], ["y"], ["y"], [], []]
    assert ml.decide(probs, ["x", "y"], th) == [["x"], ["x", "y"], ["y"], [], ["x"]]
    assert ml.scores(y, probs, ["x", "y"], 2, th)[0]["micro_f1"] > ml.scores(y, probs, ["x", "y"], 2)[0]["micro_f1"]


def test_balanced_class_weights_are_per_label_pos_weight():
    train = np.array([[1, 0], [1, 1], [0, 0], [1, 0]])
    w = ml.loss_weights("balanced", train, ["x", "y"])
    assert w.tolist() == pytest.approx([1 / 3, 3.0])  # negatives / positives


def test_token_task_is_implemented():
    assert task_for("token").NAME == "token"  # branch ner: tasks/token.py


def test_csv_labels_split_on_the_separator_and_jsonl_lists_validate(tmp_path):
    df = ml_frame()
    df.assign(label=df["label"].map("|".join)).to_csv(tmp_path / "d.csv", index=False)
    df.to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    a = validate(tmp_path / "d.csv", DataConfig(), CFG, task_name="multi_label")
    b = validate(tmp_path / "d.jsonl", DataConfig(), CFG, task_name="multi_label")
    assert a.ok and b.ok, a.summary() + b.summary()
    assert a.labels == b.labels == LABELS
    assert a.report["class_counts"] == b.report["class_counts"]
    assert a.report["class_counts"]["rare"] == sum("rare" in x for x in df["label"])
    balance = b.report["class_balance"]
    assert balance["label_cardinality"] == pytest.approx(df["label"].map(len).mean(), abs=1e-6)
    assert balance["top_pairs"][0]["rows"] == max(
        sum(p in x and q in x for x in df["label"]) for p in LABELS for q in LABELS if p < q)


def test_stratified_split_keeps_every_label_in_every_split_and_is_seeded(tmp_path):
    df = ml_frame(150, seed=1)
    df.to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    r = validate(tmp_path / "d.jsonl", DataConfig(), CFG, task_name="multi_label")
    assert r.ok, r.summary()
    for s in SPLITS:
        assert set(ml.label_counts(r.splits[s]["label"]).index) == set(LABELS), s
    texts = {s: set(r.splits[s]["text"]) for s in SPLITS}
    assert sum(map(len, texts.values())) == 150 and not texts["train"] & texts["test"]
    df.sample(frac=1, random_state=4).to_json(tmp_path / "s.jsonl", orient="records", lines=True)
    again = validate(tmp_path / "s.jsonl", DataConfig(), CFG, task_name="multi_label")
    assert {s: set(again.splits[s]["text"]) for s in SPLITS} == texts


@pytest.mark.parametrize("labels, cfg, rule, row", [
    ([["a"], [], ["b"]], {}, "labels_not_empty", 1),
    ([["a"], ["b", "zzz"], ["b"]], {"labels": ["a", "b"]}, "label_in_set", 1),
    ([["a"], {"k": "b"}, ["b"]], {}, "label_is_list", 1),
])
def test_broken_label_lists_are_refused_naming_row_and_rule(tmp_path, labels, cfg, rule, row):
    df = ml_frame(60)
    df.loc[:2, "label"] = pd.Series(labels, dtype=object)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in df.to_dict("records")))
    r = validate(tmp_path / "d.jsonl", DataConfig(), ValidateConfig(**{**CFG.__dict__, **cfg}),
                 task_name="multi_label")
    failed = [x for x in r.report["rules"] if not x["success"]]
    assert not r.ok and [x["rule"] for x in failed] == [rule]
    assert failed[0]["examples"][0]["row"] == row + 1  # the report's rows count from 1, as in the file


def test_rows_without_labels_pass_when_allowed(tmp_path):
    df = ml_frame(80)
    df.loc[:4, "label"] = pd.Series([[]] * 5, dtype=object)
    df.to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    r = validate(tmp_path / "d.jsonl", DataConfig(), ValidateConfig(**{**CFG.__dict__, "empty_labels": "allow"}),
                 task_name="multi_label")
    assert r.ok, r.summary()
    assert r.report["class_balance"]["rows_without_label"] == 5


def test_register_refuses_a_gate_metric_the_task_does_not_have_before_logging(tmp_path):
    from finetune.common.params import config_from_dict
    from finetune.stages import StageFailed
    from finetune.stages.register import run_register

    cfg = config_from_dict({"task": "multi_label", "register": {"metric": "accuracy"}})
    with pytest.raises(StageFailed, match="register.metric = 'accuracy': task multi_label gates on one of micro_f1"):
        run_register(cfg, tmp_path / "model", tmp_path / "ev", tmp_path / "splits", None, tmp_path / "out", {},
                     tracking_uri=f"sqlite:///{tmp_path / 'never.db'}")
    assert not (tmp_path / "never.db").exists() and not (tmp_path / "out").exists()


def test_cli_refuses_a_table_without_token_lists_for_the_token_task_in_one_line(tmp_path, capsys, monkeypatch):
    from finetune.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.csv").write_text("text,label\na,x\n")
    (tmp_path / "params.yaml").write_text("validate:\n  labels: []\n")
    code = main(["validate", "--data", "d.csv", "--out", "out", "--set", "task=token"])
    err = capsys.readouterr().err
    assert code != 0 and "rule 'required_columns'" in err and "no tokens column" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
