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
    """Byte for byte: compiling the same params writes the same file (the checked-in one was written by another
    process, so a header that depends on protobuf map order would differ here)."""
    from pipelines.finetune_pipeline import compile_spec

    fresh = compile_spec(tmp_path / "spec.yaml")
    assert fresh.read_bytes() == SPEC.read_bytes(), \
        "stale spec: run `finetune pipeline compile` and commit pipelines/finetune_pipeline.yaml"


def _spec():
    return yaml.safe_load(SPEC.read_text()), list(yaml.safe_load_all(SPEC.read_text()))


def test_spec_has_five_stages_in_order_gpu_image_and_parameters():
    docs = list(yaml.safe_load_all(SPEC.read_text()))
    spec, platform = docs[0], docs[1]
    image = (REPO / "components" / "image.txt").read_text().strip()
    execs = spec["deploymentSpec"]["executors"]
    assert all(e["container"]["image"] == image for e in execs.values()) and len(execs) == 9
    # the five stages live in the data-valid branch; dependencies form the chain
    branch = next(c for n, c in spec["components"].items() if n.startswith("comp-condition") and
                  "train" in c["dag"]["tasks"])
    tasks = branch["dag"]["tasks"]
    (deploy_gate,) = [n for n in tasks if n.startswith("condition-")]  # deploy_champion == true
    assert set(tasks) == set(STAGES) - {"validate"} | {"compress", "distill", deploy_gate}
    deps = {n: set(t.get("dependentTasks", [])) for n, t in tasks.items()}
    assert deps["tokenize"] == set() and deps["train"] == {"tokenize"}
    assert deps["evaluate"] == {"tokenize", "train"}
    assert deps["register"] == {"evaluate", "tokenize", "train", "compress"}  # it registers the int8 variant
    assert deps["compress"] == {"tokenize", "train", "distill"} and deps[deploy_gate] == {"register"}
    assert deps["distill"] == {"tokenize", "train", "evaluate"}  # between evaluate and compress; skips itself
    assert tasks["compress"]["inputs"]["artifacts"]["student"]["taskOutputArtifact"]["producerTask"] == "distill"
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
    # one channel: the whole config in `params`, per-run values beside it, no config value mirrored
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == {"params", "data_uri", "data_md5", "checkpoint_dir", "git_rev", "deploy_champion"}
    from finetune.common.params import config_from_dict, load_config

    assert config_from_dict(params["params"]["defaultValue"]) == load_config(REPO / "params.yaml")
    inputs = {n: set(t["inputs"]["parameters"]) for n, t in tasks.items()}
    assert inputs["tokenize"] == {"params"} and inputs["train"] == {"params", "checkpoint_dir"}
    assert inputs["evaluate"] == {"params"} and inputs["register"] == {"params", "data_uri", "data_md5", "git_rev",
                                                                       "run_name"}
    assert all(t["inputs"]["parameters"]["params"] == {"componentInputParameter": "pipelinechannel--params"}
               for n, t in tasks.items() if n != deploy_gate)
    # register gets the tokenize output (token-length section of the report), as the local path does
    assert tasks["register"]["inputs"]["artifacts"]["tokens"]["taskOutputArtifact"]["producerTask"] == "tokenize"
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert k8s["exec-train"]["nodeSelector"] and k8s["exec-train"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert {s["secretName"] for s in k8s["exec-register"]["secretAsEnv"]} == {"finetune-s3", "finetune-mlflow"}
    # the network policies in k8s/ admit only pods with this label to MLflow and S3
    for name in ("exec-validate", "exec-tokenize", "exec-train", "exec-evaluate", "exec-register", "exec-compress",
                 "exec-distill", "exec-deploy"):
        assert k8s[name]["podMetadata"]["labels"] == {"finetune/pipeline-access": "true"}, name


def test_components_only_call_their_stage():
    """No stage logic in components: each body calls finetune.stages.<verb>'s run_<verb> (and only functions of
    that stage module), nothing more."""
    tree = ast.parse((REPO / "components" / "finetune_components.py").read_text())
    funcs = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    assert set(STAGES) <= set(funcs)
    for verb in STAGES:
        f = funcs[verb]
        calls = {n.func.id for stmt in f.body for n in ast.walk(stmt)
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        own = {a.name for n in ast.walk(f) if isinstance(n, ast.ImportFrom) and n.module == f"finetune.stages.{verb}"
               for a in n.names}
        assert f"run_{verb}" in calls, verb
        assert calls - own - {"config_from_dict"} <= {"str"}, (verb, calls)
        loops = [n for n in ast.walk(f) if isinstance(n, (ast.While, ast.ListComp, ast.DictComp))]
        assert not loops, verb
        logic = [s for s in f.body if not isinstance(s, (ast.Import, ast.ImportFrom))]
        assert len(logic) <= 4, f"component {verb} has grown logic ({len(logic)} statements besides imports)"


@pytest.fixture
def fake_kfp(monkeypatch):
    """kfp.Client replaced by a recorder; the submit CLI runs from the repo root."""
    import kfp

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
    return calls


def test_submit_builds_the_request(fake_kfp):
    from finetune.cli import main
    from finetune.common.params import config_from_dict

    code = main(["pipeline", "submit", "--host", "https://kfp.example", "--experiment", "demo", "--run-name", "r1",
                 "--arg", "data_uri=s3://bucket/reviews.csv", "--arg", "data_md5=1e5", "--arg", "train.epochs=3",
                 "--set", "train.seed=7", "--set", "train.lora.r=4"])
    assert code == 0
    calls = fake_kfp
    assert calls["host"] == "https://kfp.example" and calls["experiment"] == "demo" and calls["run_name"] == "r1"
    assert calls["package"] == "pipelines/finetune_pipeline.yaml" and calls["service_account"] == "finetune-pipeline"
    args = calls["arguments"]
    assert set(args) == {"data_uri", "data_md5", "params"}  # nothing mirrored beside params
    assert args["data_uri"] == "s3://bucket/reviews.csv" and args["data_md5"] == "1e5"  # per-run values stay strings
    # the whole resolved config travels; a dotted --arg is an override like --set
    assert args["params"]["train"]["seed"] == 7 and args["params"]["train"]["epochs"] == 3
    assert args["params"]["train"]["lora"]["r"] == 4 and "max_steps" not in args["params"]["train"]  # nulls dropped
    assert config_from_dict(args["params"]).train.learning_rate == 1e-4  # untouched values from params.yaml


@pytest.mark.parametrize("argv, words", [
    (["--arg", "epochs=3"], "--arg epochs: not a per-run parameter of pipelines/finetune_pipeline.yaml "
                            "(checkpoint_dir, data_md5, data_uri, deploy_champion, git_rev); config values go through --set"),
    (["--arg", "data_uri"], "--arg 'data_uri' is not of the form NAME=VALUE"),
    (["--set", "train.learning_rate=0"], "params.yaml + --set: train.learning_rate = 0.0: must be > 0"),
    (["--arg", "train.nonsense=1"], "unknown key train.nonsense"),
])
def test_submit_refuses_bad_arguments_before_contacting_the_api(fake_kfp, capsys, argv, words):
    from finetune.cli import main

    assert main(["pipeline", "submit", "--host", "https://kfp.example", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("finetune pipeline: error: ") and words in err and err.count("\n") == 1, err
    assert "host" not in fake_kfp  # nothing sent
    if argv[0] == "--arg" and "." not in argv[1]:  # about a flag, not about a file
        assert "params.yaml" not in err


def test_submit_unreachable_host_is_a_clear_error(monkeypatch, capsys):
    from conftest import free_port
    from finetune.cli import main

    monkeypatch.chdir(REPO)
    code = main(["pipeline", "submit", "--host", f"http://127.0.0.1:{free_port()}"])
    err = capsys.readouterr().err
    assert code == 1 and "cannot submit to the Kubeflow Pipelines API at http://127.0.0.1:" in err
    assert "Traceback" not in err


def test_local_and_cluster_lineage_have_the_same_keys(tmp_path):
    """One function builds lineage on both paths: the CLI (project checkout) and the register component (data
    URI, submitted git rev, KFP run name) give the same key set; what a path cannot know is null."""
    from finetune.common.lineage import LINEAGE_KEYS, collect, file_md5

    data = tmp_path / "reviews.csv"
    data.write_text("text,label\nfine,fresh\n")
    local = collect(str(data), root=REPO)
    cluster = collect(str(data), git_commit="abc123", kfp_run="finetune-run-7")
    remote = collect("s3://bucket/reviews.csv", data_md5="0a1b", git_commit="abc123", kfp_run="finetune-run-7")
    assert list(local) == list(cluster) == list(remote) == list(LINEAGE_KEYS)
    assert local["data_md5"] == cluster["data_md5"] == file_md5(data) and remote["data_md5"] == "0a1b"
    assert local["git_commit"] != "abc123" and local["kfp_run"] is None and local["data_dvc_md5"]
    assert cluster["git_commit"] == "abc123" and cluster["git_dirty"] is None and cluster["data_dvc_md5"] is None


# ---- whole DAG on KFP's local runner ----

@pytest.fixture(scope="module")
def kfp_local(tmp_path_factory):
    from kfp import local

    root = tmp_path_factory.mktemp("kfp-root")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    return root


def _small_params(*overrides: str) -> dict:
    """params.yaml made small, through the same override channel and resolution `finetune pipeline submit` uses."""
    from finetune.common.params import as_params, load_config

    return as_params(load_config(REPO / "params.yaml", [
        "validate.val_fraction=0.15", "validate.test_fraction=0.2", "tokenize.max_length=32", "train.threads=2",
        "train.checkpoint_every=0", "compress.latency_requests=10",  # the gate is on accuracy, not latency
        "register.min_macro_f1=0.0",  # a dozen steps make a weak model; where it lands is what is tested
        *overrides]))


@pytest.mark.integration
def test_submit_set_and_arg_reach_the_train_components_config(kfp_local, fake_kfp, tiny_model_dir, tmp_path):
    """What `finetune pipeline submit --set ... --arg ...` sends is what the train component builds its config
    from: the arguments recorded from the CLI run validate -> tokenize -> train on KFP's local runner (tiny
    model, one step), and the config the train step saved beside its model has the submitted values."""
    from components.finetune_components import tokenize, train, validate
    from kfp import dsl

    from conftest import toy_frame
    from finetune.cli import main

    data = tmp_path / "toy.csv"
    toy_frame(12).to_csv(data, index=False)
    assert main(["pipeline", "submit", "--host", "https://kfp.example", "--arg", f"data_uri={data}",
                 "--set", "train.learning_rate=3e-5", "--arg", "train.max_steps=1", "--set", "train.lora.r=4",
                 "--set", f"model.base={tiny_model_dir}", "--set", "tokenize.max_length=16",
                 "--set", "train.batch_size=8", "--set", "train.threads=1", "--set", "train.checkpoint_every=0",
                 "--set", "validate.min_rows_per_class=2", "--set", "validate.val_fraction=0.25",
                 "--set", "validate.test_fraction=0.25"]) == 0
    arguments = fake_kfp["arguments"]

    @dsl.pipeline(name="train-config-probe")
    def probe(data_uri: str, params: dict):
        v = validate(data_uri=data_uri, data_md5="", params=params)
        t = tokenize(splits=v.outputs["splits"], params=params)
        train(tokens=t.outputs["tokens"], params=params, checkpoint_dir="")

    probe(**arguments)
    saved = max(kfp_local.rglob("finetune_config.json"), key=lambda f: f.stat().st_mtime)
    trained = json.loads(saved.read_text())
    assert trained["train"]["learning_rate"] == 3e-5 and trained["train"]["max_steps"] == 1
    assert trained["train"]["lora"]["r"] == 4 and trained["model"]["base"] == str(tiny_model_dir)
    assert trained["train"]["epochs"] == 2  # untouched: params.yaml's value
    assert json.loads((saved.parent.parent / "train_logs" / "summary.json").read_text())["steps"] == 1


@pytest.mark.integration
def test_whole_dag_registers_a_model_that_loads_and_predicts(kfp_local, mlflow_server, real_reviews, tmp_path,
                                                             monkeypatch):
    import mlflow.pyfunc
    from mlflow import MlflowClient
    from pipelines.finetune_pipeline import build

    from finetune.common.lineage import file_md5

    data = tmp_path / "reviews.csv"
    real_reviews.groupby("label").head(200).to_csv(data, index=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)  # the step subprocesses inherit it
    # compress.max_accuracy_drop=1: whatever a 12-step model scores, its int8 variant passes and is registered
    # through the HTTP server (the refusal path is tested in test_register_int8.py)
    build()(data_uri=str(data), params=_small_params("train.max_steps=12", "train.batch_size=16",
                                                     "register.model_name=kfp-it", "register.floor=0.0",
                                                     "compress.max_accuracy_drop=1.0"))
    client = MlflowClient(mlflow_server.url)
    mv = client.get_model_version_by_alias("kfp-it", "champion")
    run = client.get_run(mv.run_id)
    assert run.data.tags["lineage.data_uri"] == str(data) and run.data.params["train.max_steps"] == "12"
    preds = mlflow.pyfunc.load_model("models:/kfp-it@champion").predict(["a joyous, moving film", "dull and stupid"])
    assert len(preds) == 2 and set(preds) <= {"fresh", "rotten"}
    # evaluate's Output[Metrics] / Output[ClassificationMetrics] carry the scalars and the confusion matrix
    run_dir = max((p for p in kfp_local.iterdir() if (p / "register").is_dir()), key=lambda p: p.stat().st_mtime)
    assert run.data.tags["lineage.kfp_run"], "the KFP run name is part of the lineage"
    # the same lineage keys as the local path (lineage.collect): unknown ones are null, not missing
    from finetune.common.lineage import LINEAGE_KEYS

    assert {k for k in run.data.tags if k.startswith("lineage.")} == {f"lineage.{k}" for k in LINEAGE_KEYS}
    assert run.data.tags["lineage.data_md5"] == file_md5(data) and run.data.tags["lineage.data_dvc_md5"] == "None"
    # register got the tokenize output: the report has the token-length plot like the local one (4 images + the front)
    page = next(run_dir.joinpath("register").rglob("report.html")).read_text(encoding="utf-8")
    assert page.count('src="data:image/png;base64,') == 5  # evaluate's four plots and compress's front
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
    # register got the compress output: the int8 variant passed its gate and was registered beside the champion
    int8 = json.loads(next(run_dir.joinpath("register").rglob("registration.json")).read_text())["int8"]
    assert gate["int8_passed"] is True and int8["registered"] is True, (gate["message"], int8)
    mv8 = client.get_model_version_by_alias("kfp-it-int8", "champion")
    assert mv8.tags["fp32_model"] == f"kfp-it/{mv.version}" and int8["version"] == str(mv8.version)
    assert client.get_model_version("kfp-it", mv.version).tags["int8_version"] == f"kfp-it-int8/{mv8.version}"
    # the registry's card of the fp32 version names its int8 variant; the variant loads verified and predicts
    assert f"registered as `models:/kfp-it-int8/{mv8.version}` (@champion)" in client.get_model_version(
        "kfp-it", mv.version).description
    from finetune.registry.loading import load_verified

    int8_preds = load_verified("models:/kfp-it-int8@champion", mlflow_server.url).predict(
        ["a joyous, moving film", "dull and stupid"])
    assert len(int8_preds) == 2 and set(int8_preds) <= {"fresh", "rotten"}


@pytest.mark.integration
def test_bad_data_stops_at_validate_with_report_and_nothing_registered(kfp_local, mlflow_server, tmp_path,
                                                                      monkeypatch):
    from mlflow import MlflowClient
    from pipelines.finetune_pipeline import build

    data = tmp_path / "bad.csv"
    data.write_text("text,label\n" + "".join(f"good {i},fresh\nbad {i},rotten\n" for i in range(12)) + ",fresh\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    with pytest.raises(RuntimeError):
        build()(data_uri=str(data), params=_small_params("register.model_name=kfp-bad"))
    reports = [json.loads(p.read_text()) for p in kfp_local.rglob("report") if p.is_file()]
    bad = [r for r in reports if r["data"] == str(data)]
    assert bad and bad[0]["success"] is False
    assert any(r["rule"] == "text_not_null" and not r["success"] for r in bad[0]["rules"])
    assert not MlflowClient(mlflow_server.url).search_registered_models(filter_string="name = 'kfp-bad'")
