"""The Kubeflow pipeline: compiled spec, thin components, submission, and whole-DAG runs with KFP's real
local runner (SubprocessRunner) registering into a real MLflow server."""

import ast
import json
import sys

import pytest
import yaml

from conftest import REPO

sys.path.insert(0, str(REPO))
STAGES = ["validate", "tokenize", "train", "evaluate", "register"]
SPEC = REPO / "pipelines" / "finetune_pipeline.yaml"


def test_checked_in_spec_is_up_to_date(tmp_path):
    from pipelines.finetune_pipeline import compile_spec

    fresh = compile_spec(tmp_path / "spec.yaml")
    # compared as data: the header comment prints the params default in arbitrary key order
    assert list(yaml.safe_load_all(fresh.read_text())) == list(yaml.safe_load_all(SPEC.read_text())), \
        "stale spec: run `finetune pipeline compile` and commit pipelines/finetune_pipeline.yaml"


def _spec():
    return yaml.safe_load(SPEC.read_text()), list(yaml.safe_load_all(SPEC.read_text()))


def test_spec_has_five_stages_in_order_gpu_image_and_parameters():
    docs = list(yaml.safe_load_all(SPEC.read_text()))
    spec, platform = docs[0], docs[1]
    image = (REPO / "components" / "image.txt").read_text().strip()
    execs = spec["deploymentSpec"]["executors"]
    assert all(e["container"]["image"] == image for e in execs.values()) and len(execs) == 8
    # the five stages live in the data-valid branch; dependencies form the chain
    branch = next(c for n, c in spec["components"].items() if n.startswith("comp-condition") and
                  "train" in c["dag"]["tasks"])
    tasks = branch["dag"]["tasks"]
    (deploy_gate,) = [n for n in tasks if n.startswith("condition-")]  # deploy_champion == true
    assert set(tasks) == set(STAGES) - {"validate"} | {"compress", deploy_gate}
    deps = {n: set(t.get("dependentTasks", [])) for n, t in tasks.items()}
    assert deps["tokenize"] == set() and deps["train"] == {"tokenize"}
    assert deps["evaluate"] == {"tokenize", "train"} and deps["register"] == {"evaluate", "train"}
    assert deps["compress"] == {"tokenize", "train"} and deps[deploy_gate] == {"register"}
    # deploy runs only when enabled and register promoted: two nested conditions
    (promoted,) = spec["components"][f"comp-{deploy_gate}"]["dag"]["tasks"].values()
    assert "deploy_champion" in tasks[deploy_gate]["triggerPolicy"]["condition"]
    assert "'champion'" in promoted["triggerPolicy"]["condition"]
    inner = spec["components"][promoted["componentRef"]["name"]]["dag"]["tasks"]
    assert list(inner) == ["deploy"] and inner["deploy"]["cachingOptions"].get("enableCache") is not True
    root = spec["root"]["dag"]["tasks"]
    assert "validate" in root and root["validate"]["retryPolicy"]["maxRetryCount"] == 2
    conds = [t["triggerPolicy"]["condition"] for c in spec["components"].values() if "dag" in c
             for t in c["dag"]["tasks"].values() if "triggerPolicy" in t]
    assert any("passed" in c and "== true" in c for c in conds), conds
    assert tasks["register"]["cachingOptions"] == {} or tasks["register"]["cachingOptions"].get("enableCache") is not True
    assert root["validate"]["cachingOptions"]["enableCache"] is True and tasks["tokenize"]["cachingOptions"]["enableCache"]
    res = execs["exec-train"]["container"]["resources"]
    assert res["accelerator"]["resourceCount"] == "1" and res["accelerator"]["resourceType"] == "nvidia.com/gpu"
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name in ("data_uri", "base_model", "epochs", "max_steps", "batch_size", "learning_rate", "model_name",
                 "gate_metric", "min_improvement", "floor", "params"):
        assert name in params, name
    assert params["model_name"]["defaultValue"] == yaml.safe_load((REPO / "params.yaml").read_text())["register"]["model_name"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert k8s["exec-train"]["nodeSelector"] and k8s["exec-train"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert {s["secretName"] for s in k8s["exec-register"]["secretAsEnv"]} == {"finetune-s3", "finetune-mlflow"}
    # the network policies in k8s/ admit only pods with this label to MLflow and S3
    for name in ("exec-validate", "exec-tokenize", "exec-train", "exec-evaluate", "exec-register", "exec-compress",
                 "exec-deploy"):
        assert k8s[name]["podMetadata"]["labels"] == {"finetune/pipeline-access": "true"}, name


def test_components_only_call_their_stage():
    """No stage logic in components: each body imports finetune.stages.run_<verb> and calls it, nothing more."""
    tree = ast.parse((REPO / "components" / "finetune_components.py").read_text())
    funcs = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    assert set(STAGES) <= set(funcs)
    for verb in STAGES:
        f = funcs[verb]
        calls = {n.func.id for stmt in f.body for n in ast.walk(stmt)
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert f"run_{verb}" in calls, verb
        assert calls - {f"run_{verb}", "config_for"} <= {"str"}, (verb, calls)
        loops = [n for n in ast.walk(f) if isinstance(n, (ast.While, ast.ListComp, ast.DictComp))]
        assert not loops, verb
        assert len(f.body) <= 6, f"component {verb} has grown logic ({len(f.body)} statements)"


def test_submit_builds_the_request(monkeypatch, tmp_path):
    import kfp

    from finetune.cli import main

    calls = {}

    class FakeClient:
        def __init__(self, host, namespace=None, existing_token=None):
            calls["host"], calls["namespace"], calls["token"] = host, namespace, existing_token

        def create_run_from_pipeline_package(self, package, arguments, run_name, experiment_name, namespace,
                                             service_account):
            calls.update(package=package, arguments=arguments, run_name=run_name, experiment=experiment_name,
                         service_account=service_account)
            return type("Run", (), {"run_id": "run-123"})()

    monkeypatch.setattr(kfp, "Client", FakeClient)
    monkeypatch.chdir(REPO)
    code = main(["pipeline", "submit", "--host", "https://kfp.example", "--experiment", "demo", "--run-name", "r1",
                 "--arg", "data_uri=s3://bucket/reviews.csv", "--arg", "epochs=3", "--set", "train.seed=7"])
    assert code == 0
    assert calls["host"] == "https://kfp.example" and calls["experiment"] == "demo" and calls["run_name"] == "r1"
    assert calls["package"] == "pipelines/finetune_pipeline.yaml" and calls["service_account"] == "finetune-pipeline"
    args = calls["arguments"]
    assert args["data_uri"] == "s3://bucket/reviews.csv" and args["epochs"] == 3
    assert args["params"]["train"]["seed"] == 7 and "max_steps" not in args["params"]["train"]  # nulls dropped


def test_submit_unreachable_host_is_a_clear_error(monkeypatch, capsys):
    from conftest import free_port
    from finetune.cli import main

    monkeypatch.chdir(REPO)
    code = main(["pipeline", "submit", "--host", f"http://127.0.0.1:{free_port()}"])
    err = capsys.readouterr().err
    assert code == 1 and "cannot submit to the Kubeflow Pipelines API at http://127.0.0.1:" in err
    assert "Traceback" not in err


# ---- whole DAG on KFP's local runner ----

@pytest.fixture(scope="module")
def kfp_local(tmp_path_factory):
    from kfp import local

    root = tmp_path_factory.mktemp("kfp-root")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    return root


def _small_params():
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["validate"].update(val_fraction=0.15, test_fraction=0.2)
    p["tokenize"]["max_length"] = 32
    p["train"].update(threads=2, checkpoint_every=0)
    p["register"]["min_macro_f1"] = 0.0  # a dozen steps make a weak model; where it lands is what is tested
    from finetune.config import drop_none

    return drop_none(p)  # as `finetune pipeline submit` does: KFP structs hold no nulls


@pytest.mark.integration
def test_whole_dag_registers_a_model_that_loads_and_predicts(kfp_local, mlflow_server, real_reviews, tmp_path,
                                                             monkeypatch):
    import mlflow.pyfunc
    from mlflow import MlflowClient

    from pipelines.finetune_pipeline import build

    data = tmp_path / "reviews.csv"
    real_reviews.groupby("label").head(200).to_csv(data, index=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)  # the step subprocesses inherit it
    build()(data_uri=str(data), max_steps=12, batch_size=16, learning_rate=1e-4, model_name="kfp-it", floor=0.0,
            params=_small_params())
    client = MlflowClient(mlflow_server.url)
    mv = client.get_model_version_by_alias("kfp-it", "champion")
    run = client.get_run(mv.run_id)
    assert run.data.tags["lineage.data_uri"] == str(data) and run.data.params["train.max_steps"] == "12"
    preds = mlflow.pyfunc.load_model("models:/kfp-it@champion").predict(["a joyous, moving film", "dull and stupid"])
    assert len(preds) == 2 and set(preds) <= {"fresh", "rotten"}
    # evaluate's Output[Metrics] / Output[ClassificationMetrics] carry the scalars and the confusion matrix
    run_dir = max((p for p in kfp_local.iterdir() if (p / "register").is_dir()), key=lambda p: p.stat().st_mtime)
    assert run.data.tags["lineage.kfp_run"], "the KFP run name is part of the lineage"
    out = json.loads((run_dir / "evaluate" / "executor_output.json").read_text())["artifacts"]
    scalars = out["metrics"]["artifacts"][0]["metadata"]
    assert set(scalars) == {"accuracy", "macro_f1", "loss", "ece"} and 0 <= scalars["accuracy"] <= 1
    cm = out["confusion"]["artifacts"][0]["metadata"]["confusionMatrix"]
    assert [a["displayName"] for a in cm["annotationSpecs"]] == ["fresh", "rotten"]
    assert sum(sum(r["row"]) for r in cm["rows"]) == 80  # every test row counted once
    # compress ran in the DAG: ONNX files and the gate's verdict (a 12-step model: whatever it scores)
    compressed = run_dir / "compress" / "compressed"
    gate = json.loads((compressed / "metrics.json").read_text())
    assert gate["exported"] is True and set(gate["variants"]) == {"pytorch_fp32", "onnx_fp32", "onnx_int8"}
    assert (compressed / "model.int8.onnx").stat().st_size < (compressed / "model.onnx").stat().st_size


@pytest.mark.integration
def test_bad_data_stops_at_validate_with_report_and_nothing_registered(kfp_local, mlflow_server, tmp_path,
                                                                      monkeypatch):
    from mlflow import MlflowClient

    from pipelines.finetune_pipeline import build

    data = tmp_path / "bad.csv"
    data.write_text("text,label\n" + "".join(f"good {i},fresh\nbad {i},rotten\n" for i in range(12)) + ",fresh\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    with pytest.raises(RuntimeError):
        build()(data_uri=str(data), model_name="kfp-bad", params=_small_params())
    reports = [json.loads(p.read_text()) for p in kfp_local.rglob("report") if p.is_file()]
    bad = [r for r in reports if r["data"] == str(data)]
    assert bad and bad[0]["success"] is False
    assert any(r["rule"] == "text_not_null" and not r["success"] for r in bad[0]["rules"])
    assert not MlflowClient(mlflow_server.url).search_registered_models(filter_string="name = 'kfp-bad'")
