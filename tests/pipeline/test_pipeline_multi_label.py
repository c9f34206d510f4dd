"""Integration: task multi_label through the real `dvc repro` in a temporary copy of the repo (tiny random BERT,
generated JSONL data, the default embedded MLflow store), then `finetune predict` with the registered champion."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ENV, copy_repo, sh

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tasks"))
from test_multi_label import LABELS, ml_frame

pytestmark = pytest.mark.integration
MODEL = "ml-it"


@pytest.fixture(scope="module")
def ml_project(tmp_path_factory, tiny_model_dir):
    root = copy_repo(tmp_path_factory.mktemp("ml-project"))
    (root / "data").mkdir(exist_ok=True)
    ml_frame(200, seed=5).to_json(root / "data" / "tags.jsonl", orient="records", lines=True)
    sh(["dvc", "add", "-q", "data"], root)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["task"] = "multi_label"
    raw["data"]["path"] = "data/tags.jsonl"
    raw["validate"].update(labels=[], min_rows_per_class=5, val_fraction=0.2, test_fraction=0.2)
    raw["model"]["base"] = str(tiny_model_dir)
    raw["tokenize"]["max_length"] = 16
    raw["train"].update(epochs=8, batch_size=16, learning_rate=3e-3, threads=1, select_metric="val_micro_f1")
    raw["register"].update(model_name=MODEL, metric="micro_f1", floor=0.3, min_macro_f1=0.0)
    raw["compress"].update(latency_requests=2, threads=1)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "fixture"], root)
    sh(["dvc", "repro"], root)
    return root


def test_dvc_repro_trains_gates_on_micro_f1_and_predicts_label_sets(ml_project):
    from mlflow import MlflowClient

    out = ml_project / "out"
    assert json.loads((out / "model" / "thresholds.json").read_text())["labels"] == LABELS
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert metrics["micro_f1"] >= 0.3 and set(metrics["at_default_threshold"]) >= {"micro_f1", "macro_f1"}
    reg = json.loads((out / "register" / "registration.json").read_text())
    assert reg["alias"] == "champion" and "micro_f1" in reg["reason"]
    client = MlflowClient(f"sqlite:///{ml_project / 'mlflow.db'}")
    mv = client.get_model_version_by_alias(MODEL, "champion")
    assert mv.tags["task"] == "text-classification/multi-label" and json.loads(mv.tags["labels"]) == LABELS
    assert "Multi-label: micro-F1" in (out / "register" / "model_card.md").read_text()
    assert "<h3>Multi-label</h3>" in (out / "register" / "report.html").read_text()
    done = sh(["finetune", "predict", "text 9 about b and c", "text 8 about rare"], ml_project, env=ENV)
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [sorted(r["probabilities"]) for r in records] == [sorted(LABELS)] * 2
    assert all(isinstance(r["labels"], list) and set(r["labels"]) <= set(LABELS) for r in records)


def test_kfp_local_runner_registers_a_multi_label_champion(tmp_path_factory, tiny_model_dir, mlflow_server,
                                                           monkeypatch):
    """The same task through the whole KFP DAG on KFP's local runner, registering into a real MLflow server."""
    from kfp import local
    from mlflow import MlflowClient
    from pipelines.finetune_pipeline import build

    from finetune.common.params import as_params, load_config
    from finetune.registry.loading import load_verified

    root = tmp_path_factory.mktemp("kfp-ml")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root / "kfp-root"))
    data = root / "tags.jsonl"
    ml_frame(200, seed=6).to_json(data, orient="records", lines=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    params = as_params(load_config(Path(__file__).resolve().parents[2] / "params.yaml", [
        "task=multi_label", "validate.labels=[]", "validate.min_rows_per_class=5", "validate.val_fraction=0.2",
        "validate.test_fraction=0.2", f"model.base={tiny_model_dir}", "tokenize.max_length=16", "train.epochs=8",
        "train.batch_size=16", "train.learning_rate=3e-3", "train.threads=1", "train.checkpoint_every=0",
        "register.model_name=kfp-ml", "register.metric=micro_f1", "register.floor=0.3", "register.min_macro_f1=0",
        "compress.latency_requests=2", "compress.max_accuracy_drop=1.0"]))
    build()(data_uri=str(data), params=params)
    mv = MlflowClient(mlflow_server.url).get_model_version_by_alias("kfp-ml", "champion")
    assert mv.tags["task"] == "text-classification/multi-label"
    for name in ("kfp-ml", "kfp-ml-int8"):
        preds = load_verified(f"models:/{name}@champion", mlflow_server.url).predict(["text 1 about a and c"])
        assert isinstance(preds[0], list) and set(preds[0]) <= set(LABELS), (name, preds)
