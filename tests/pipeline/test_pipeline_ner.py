"""Integration: task token (NER) through the real `dvc repro` in a temporary copy of the repo (tiny random BERT,
a generated CoNLL file with a learnable pattern, the default embedded MLflow store)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import ENV, copy_repo, set_params, sh

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


# Repeated spaces before the city: its offsets must index the text as given, not a normalised copy.
PROBE = "Ines visited   Oslo on day7"
OSLO = {"text": "Oslo", "type": "LOC", "start": 15, "end": 19}


def located(entities):
    return [{k: e[k] for k in ("text", "type", "start", "end")} for e in entities]


def test_the_trained_champion_and_its_int8_predict_entities_with_offsets(ner_project):
    """`finetune predict` on the registered fp32 and int8 champions that `dvc repro` trained (registry-verified)."""
    env = {**ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{ner_project / 'mlflow.db'}"}
    for name in (MODEL, f"{MODEL}-int8"):
        proc = sh(["finetune", "predict", "--model", f"models:/{name}@champion", PROBE], ner_project, env=env)
        (record,) = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        assert record["text"] == PROBE and OSLO in located(record["entities"]), (name, record)
        assert PROBE[OSLO["start"]:OSLO["end"]] == "Oslo"


def test_kfp_local_runner_registers_a_ner_champion_that_finds_entities(tmp_path_factory, tiny_model_dir,
                                                                       mlflow_server, monkeypatch):
    """task token through the whole KFP DAG on KFP's local runner, registering into a real MLflow server."""
    from kfp import local
    from mlflow import MlflowClient
    from pipelines.finetune_pipeline import build

    from finetune.common.params import as_params, load_config
    from finetune.registry.loading import load_verified

    root = tmp_path_factory.mktemp("kfp-ner")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root / "kfp-root"))
    data = ner_file(root / "people.conll", n=120)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    params = as_params(load_config(Path(__file__).resolve().parents[2] / "params.yaml", [
        "task=token", "validate.labels=[]", "validate.val_fraction=0.15", "validate.test_fraction=0.15",
        f"model.base={tiny_model_dir}", "tokenize.max_length=16", "train.epochs=4", "train.batch_size=16",
        "train.learning_rate=3e-3", "train.warmup_ratio=0", "train.threads=1", "train.checkpoint_every=0",
        "register.model_name=kfp-ner", "register.metric=entity_micro_f1", "register.floor=0.5",
        "register.min_macro_f1=0", "compress.latency_requests=2"]))
    build()(data_uri=str(data), params=params)
    mv = MlflowClient(mlflow_server.url).get_model_version_by_alias("kfp-ner", "champion")
    assert mv.tags["task"] == "token-classification/ner" and json.loads(mv.tags["labels"]) == TAGS
    for name in ("kfp-ner", "kfp-ner-int8"):
        (record,) = load_verified(f"models:/{name}@champion", mlflow_server.url).predict([PROBE])
        assert OSLO in located(record["entities"]), (name, record)
