"""The loop as a KFP pipeline: the compiled spec is current and branches on the monitor's verdict; on KFP's local
runner, a drifted labelled batch goes monitor -> retrain branch (the whole training DAG, tiny model) -> register."""

import json
import sys

import pandas as pd
import pytest
import yaml

from conftest import REPO, write_register_inputs

sys.path.insert(0, str(REPO))
SPEC = REPO / "pipelines" / "monitor_pipeline.yaml"


def test_checked_in_monitor_spec_is_up_to_date_and_retrains_only_in_its_branch(tmp_path):
    from pipelines.monitor_pipeline import compile_monitor_spec

    fresh = compile_monitor_spec(tmp_path / "spec.yaml")
    assert fresh.read_bytes() == SPEC.read_bytes(), \
        "stale spec: run `python -m pipelines.monitor_pipeline` and commit pipelines/monitor_pipeline.yaml"
    spec = next(yaml.safe_load_all(SPEC.read_text()))
    dags = {name: comp["dag"]["tasks"] for name, comp in spec["components"].items() if "dag" in comp}

    def steps(tasks: dict) -> set[str]:
        """The step tasks under ``tasks``, through every nested condition."""
        out = set()
        for name, task in tasks.items():
            ref = task["componentRef"]["name"]
            out |= steps(dags[ref]) if ref in dags else {name}
        return out

    assert set(spec["root"]["dag"]["tasks"]) == {"monitor", "condition-branches-1"}
    branches = dags["comp-condition-branches-1"]
    conditions = {steps(dags[t["componentRef"]["name"]]).__contains__("register"): t["triggerPolicy"]["condition"]
                  for t in branches.values()}
    assert conditions[True] == "inputs.parameter_values['pipelinechannel--monitor-retrain'] == true"
    assert steps(branches) == {"validate", "tokenize", "train", "evaluate", "distill", "compress", "register",
                               "validation-failed", "no-retrain"}


@pytest.mark.integration
def test_drifted_labelled_batch_is_monitored_retrained_and_registered(mlflow_server, tiny_classifier_dir,
                                                                       tiny_model_dir, tmp_path, monkeypatch):
    from kfp import local
    from mlflow import MlflowClient
    from pipelines.monitor_pipeline import build_monitor

    from conftest import toy_frame
    from finetune.common import tracking
    from finetune.common.params import as_params, config_from_dict, load_config
    from finetune.stages.register import run_register

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)  # the step subprocesses inherit it
    monkeypatch.chdir(tmp_path)
    evaluation, splits = write_register_inputs(tmp_path, tiny_classifier_dir, toy_frame(40))
    cfg = config_from_dict({"register": {"model_name": "loop-it", "floor": 0.0, "min_macro_f1": 0.0, "retries": 0}})
    run_register(cfg, tiny_classifier_dir, evaluation, splits, None, tmp_path / "reg", {"git_commit": "abc"},
                 *tracking.configure("."))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)  # MLflow's tracking-URI context unset it on exit
    # the new data version: another domain's texts, labelled
    words = ["ledger", "turbine", "molecule", "tariff", "orbit", "voltage", "harvest", "statute", "glacier", "sonar"]
    rows = [((f"the {words[i % 10]} report {i} lists {words[(i * 3) % 10]} figures for the {words[(i * 7) % 10]} "
              f"committee in quarter {i % 4}"), "fresh" if i % 2 else "rotten") for i in range(120)]
    data = tmp_path / "new-version.csv"
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(data, index=False)
    params = as_params(load_config(REPO / "params.yaml", [
        f"model.base={tiny_model_dir}", "tokenize.max_length=32", "train.max_steps=2", "train.batch_size=16",
        "train.threads=1", "train.checkpoint_every=0", "validate.min_rows_per_class=2", "register.model_name=loop-it",
        "register.floor=0.0", "register.min_macro_f1=0.0", "compress.max_accuracy_drop=1.0",
        "compress.latency_requests=10"]))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    build_monitor()(data_uri=str(data), model_uri="models:/loop-it@champion", params=params)

    client = MlflowClient(mlflow_server.url)
    v1 = client.get_model_version("loop-it", "1")
    check = client.get_run(v1.tags["monitor.last_run_id"])
    assert check.data.tags["drift"] == "true" and check.data.tags["model_version"] == "1", check.data.tags
    retrained = client.get_model_version("loop-it", "2")  # registered by the retrain branch's register step
    assert client.get_run(retrained.run_id).data.tags["lineage.data_uri"] == str(data)
    report = json.loads(next((tmp_path / "kfp").rglob("monitor/report/metrics.json")).read_text())
    assert report["drift"] and report["labelled"] and "mmd:embeddings" in report["fired"]
