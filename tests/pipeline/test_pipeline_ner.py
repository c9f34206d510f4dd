"""Integration: task token (NER) through the real `dvc repro` in a temporary copy of the repo (tiny random BERT,
a generated CoNLL file with a learnable pattern, the default embedded MLflow store)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import copy_repo, set_params, sh

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stages"))
from test_ner_stages import ner_file

pytestmark = pytest.mark.integration
MODEL = "ner-it"
TAGS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


@pytest.fixture(scope="module")
def ner_project(tmp_path_factory, tiny_model_dir):
    root = copy_repo(tmp_path_factory.mktemp("ner-project"))
    (root / "data").mkdir(exist_ok=True)
    ner_file(root / "data" / "people.conll", n=120)
    sh(["dvc", "add", "-q", "data"], root)
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("task: single_label ", "task: token ", 1))
    set_params(root, data={"path": "data/people.conll"}, model={"base": str(tiny_model_dir)},
               validate={"labels": [], "val_fraction": 0.15, "test_fraction": 0.15}, tokenize={"max_length": 16},
               train={"epochs": 4, "batch_size": 16, "learning_rate": 3e-3, "warmup_ratio": 0.0, "threads": 1,
                      "select_metric": "val_entity_micro_f1"},
               register={"model_name": MODEL, "metric": "entity_micro_f1", "floor": 0.5, "min_macro_f1": 0.0},
               compress={"latency_requests": 2, "threads": 1})
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "fixture"], root)
    sh(["dvc", "repro"], root)
    return root


def test_dvc_repro_scores_entities_gates_on_entity_f1_and_registers_int8(ner_project):
    from mlflow import MlflowClient

    out = ner_project / "out"
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert metrics["entity_micro_f1"] >= 0.5 and set(metrics["per_class"]) == {"LOC", "PER"}
    assert set(metrics["span_errors"]) >= {"LOC", "PER"}
    reg = json.loads((out / "register" / "registration.json").read_text())
    assert reg["alias"] == "champion" and "entity_micro_f1" in reg["reason"]
    client = MlflowClient(f"sqlite:///{ner_project / 'mlflow.db'}")
    mv = client.get_model_version_by_alias(MODEL, "champion")
    assert mv.tags["task"] == "token-classification/ner" and json.loads(mv.tags["labels"]) == TAGS
    assert float(mv.tags["entity_micro_f1"]) == metrics["entity_micro_f1"]  # the next run compares without re-scoring
    int8 = client.get_model_version_by_alias(f"{MODEL}-int8", "champion")  # follows the fp32 champion
    assert int8.tags["fp32_model"] == f"{MODEL}/{mv.version}" and int8.tags["task"] == "token-classification/ner"
    compressed = json.loads((out / "compress" / "metrics.json").read_text())
    assert compressed["int8_passed"] and "entity_micro_f1" in compressed["message"]
    report = (out / "register" / "report.html").read_text()
    assert "<h3>Named entities</h3>" in report and 'alt="per-type F1 (exact span and type)"' in report
    assert "NER: entity micro-F1" in (out / "register" / "model_card.md").read_text()
    sentences = (out / "evaluate" / "predictions.jsonl").read_text().splitlines()
    assert len(sentences) == metrics["n"] and "predicted_entities" in json.loads(sentences[0])
