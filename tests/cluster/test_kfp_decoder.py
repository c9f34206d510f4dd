"""A decoder base (tiny random Llama, tokenizer without a pad token, LoRA [auto]) through the whole Kubeflow DAG
on KFP's real local runner: validate, tokenize, train, evaluate, compress, register into a real MLflow server.
The registered version's card records the decoder's architecture and the pad token chosen; it predicts."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import REPO, toy_frame

sys.path.insert(0, str(REPO))
pytestmark = pytest.mark.integration
MODEL = "kfp-decoder"


@pytest.fixture(scope="module")
def kfp_root(tmp_path_factory):
    from kfp import local

    root = tmp_path_factory.mktemp("kfp-decoder-root")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    return root


def test_decoder_base_runs_the_whole_dag_registers_with_its_architecture_and_predicts(
        kfp_root, mlflow_server, tiny_llama_dir, tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from pipelines.finetune_pipeline import build

    from finetune.common.params import as_params, load_config
    from finetune.registry.loading import load_verified

    frame = toy_frame(30)  # the sentiment word last: the head reads the last real token
    frame["text"] = ["#" + t.rsplit(" #", 1)[1] + " " + t.rsplit(" #", 1)[0] for t in frame["text"]]
    data = tmp_path / "reviews.csv"
    frame.to_csv(data, index=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)  # the step subprocesses inherit it
    params = as_params(load_config(REPO / "params.yaml", [
        f"model.base={tiny_llama_dir}", "validate.val_fraction=0.2", "validate.test_fraction=0.2",
        "tokenize.max_length=24", "train.max_steps=40", "train.batch_size=8", "train.learning_rate=2e-2",
        "train.threads=2", "train.checkpoint_every=0", "train.lora.enabled=true", "train.lora.dropout=0.0",
        "train.lora.target_modules=[auto]", f"register.model_name={MODEL}", "register.floor=0.0",
        "register.min_macro_f1=0.0", "compress.max_accuracy_drop=1.0", "compress.latency_requests=10"]))
    build()(data_uri=str(data), params=params)

    client = MlflowClient(mlflow_server.url)
    mv = client.get_model_version_by_alias(MODEL, "champion")
    card = client.get_model_version(MODEL, mv.version).description
    assert "| architecture | LlamaForSequenceClassification |" in card, card
    assert "set by finetune (the tokenizer shipped none)" in card  # tiny tokenizer: no pad token shipped
    run = client.get_run(mv.run_id)
    trained, total = (float(run.data.metrics[k]) for k in ("train_trainable_parameters", "train_parameters"))
    assert 0 < trained < total / 2, (trained, total)  # LoRA adapters and the head only
    run_dir = max((p for p in kfp_root.iterdir() if (p / "register").is_dir()), key=lambda p: p.stat().st_mtime)
    gate = json.loads((run_dir / "compress" / "compressed" / "metrics.json").read_text())
    assert gate["exported"] and gate["variants"]["onnx_fp32"]["label_agreement"] == 1.0, gate["message"]
    texts = ["#1 a wonderful film", "#2 a dull mess"]
    preds = load_verified(f"models:/{MODEL}@champion", mlflow_server.url).predict(texts)
    assert len(preds) == 2 and set(preds) <= {"fresh", "rotten"}
    int8 = load_verified(f"models:/{MODEL}-int8@champion", mlflow_server.url).predict(texts)
    assert len(int8) == 2 and set(int8) <= {"fresh", "rotten"}
