"""Integration: the real `dvc repro` in a temporary copy of the repo, real MiniLM, a slice of the real data,
the default embedded MLflow store; then the register stage against a real `mlflow server` process."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from conftest import ENV, REPO, Server, copy_repo, post, set_params, sh, v2_body

pytestmark = pytest.mark.integration
MODEL = "rt-it"


@pytest.fixture(scope="module")
def project(tmp_path_factory, real_reviews, mlflow_server):
    """A copy of the repo on 600 real reviews (300 per class) with a short training run."""
    root = copy_repo(tmp_path_factory.mktemp("project"))
    (root / "data").mkdir(exist_ok=True)
    real_reviews.groupby("label").head(300).to_csv(root / "data" / "reviews.csv", index=False)
    sh(["dvc", "add", "-q", "data"], root)
    set_params(root, validate={"val_fraction": 0.15, "test_fraction": 0.2},
               tokenize={"max_length": 48},
               train={"max_steps": 40, "batch_size": 16, "learning_rate": 1e-4, "checkpoint_every": 10, "threads": 2},
               register={"model_name": MODEL, "floor": 0.0},
               compress={"latency_requests": 10})  # the gate is on accuracy; 10 timed texts per variant suffice
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "fixture"], root)
    return root


@pytest.fixture(scope="module")
def first_run(project):
    return sh(["dvc", "repro"], project)


def test_repro_produces_disjoint_splits_metrics_and_a_champion(project, first_run):
    from mlflow import MlflowClient

    v = project / "out" / "validate"
    splits = {s: pd.read_parquet(v / f"{s}.parquet") for s in ("train", "val", "test")}
    texts = {s: set(f["text"]) for s, f in splits.items()}
    assert not (texts["train"] & texts["test"]) and not (texts["train"] & texts["val"]) and not (texts["val"] & texts["test"])
    assert sum(map(len, texts.values())) == 600 and len(splits["test"]) == 120
    metrics = json.loads((project / "out" / "evaluate" / "metrics.json").read_text())
    assert {"accuracy", "macro_f1", "loss", "ece", "per_class", "confusion_matrix"} <= set(metrics)
    assert metrics["accuracy"] >= 0.6, metrics  # 40 steps of MiniLM on real reviews beat chance (0.5)
    reg = json.loads((project / "out" / "register" / "registration.json").read_text())
    assert reg["alias"] == "champion" and reg["version"] == "1"
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    # register read out/compress: the int8 variant is registered exactly when its gate passed
    gate = json.loads((project / "out" / "compress" / "metrics.json").read_text())
    assert reg["int8"]["registered"] is gate["int8_passed"], (reg["int8"], gate["message"])
    if gate["int8_passed"]:
        assert client.get_model_version_by_alias(f"{MODEL}-int8", "champion").tags["fp32_model"] == f"{MODEL}/1"
    run = client.get_run(reg["run_id"])
    assert run.data.tags["lineage.git_commit"] == sh(["git", "rev-parse", "HEAD"], project).stdout.strip()
    assert run.data.tags["lineage.data_dvc_md5"].endswith(".dir")
    from finetune.common.lineage import LINEAGE_KEYS  # the keys the KFP register step records too (test_kfp.py)

    assert {k for k in run.data.tags if k.startswith("lineage.")} == {f"lineage.{k}" for k in LINEAGE_KEYS}
    assert run.data.tags["lineage.data_uri"] == "data/reviews.csv"
    assert len(client.get_metric_history(reg["run_id"], "train_loss")) == 40
    assert (project / "mlartifacts").is_dir()  # artifacts stay inside the project by default
    # DVC metrics/plots see the files
    shown = sh(["dvc", "metrics", "show", "--json"], project).stdout
    assert "macro_f1" in shown


def test_finetune_serve_answers_both_protocols_for_the_trained_champion_fp32_and_int8(project, first_run):
    """The champion dvc repro trained (MiniLM on real reviews) and its int8 variant behind `finetune serve`: V1 and
    v2 answers carry the registry's own numbers for these texts (load_verified), rows summing to 1, the version."""
    from finetune.registry.loading import load_verified

    texts = ["a wonderful, moving film", "a dull and tedious mess", "not bad at all"]
    reg = json.loads((project / "out" / "register" / "registration.json").read_text())
    names = [MODEL] + ([f"{MODEL}-int8"] if reg["int8"]["registered"] else [])  # registered iff its gate passed
    for name in names:
        model = load_verified(f"models:/{name}@champion", f"sqlite:///{project / 'mlflow.db'}")
        want = np.array([[r["probabilities"][lab] for lab in ("fresh", "rotten")]
                         for r in model.predict(texts, params={"probabilities": True})])
        server = Server(project, f"models:/{name}@champion").wait_ready()
        try:
            status, headers, v1 = post(f"{server.base}/v1/models/{name}:predict", {"instances": texts})
            assert status == 200 and headers.get("X-Model-Version") == f"{name}/1", v1
            got = np.array([[p["probabilities"][lab] for lab in ("fresh", "rotten")] for p in v1["predictions"]])
            assert np.abs(got.sum(axis=1) - 1).max() < 1e-9 and np.abs(got - want).max() < 1e-4, (got, want)
            status, _, v2 = post(f"{server.base}/v2/models/{name}/infer", v2_body(texts))
            assert status == 200 and v2["outputs"][0]["data"] == [p["label"] for p in v1["predictions"]], v2
        finally:
            assert server.stop() == 0


def test_second_repro_does_nothing_and_train_param_reruns_only_downstream(project, first_run):
    from mlflow import MlflowClient

    again = sh(["dvc", "repro"], project)
    assert "Running stage" not in again.stdout, again.stdout
    first = json.loads((project / "out" / "evaluate" / "metrics.json").read_text())

    # learning_rate ~0 (0 itself is refused): the classification head stays random, a worse model, whatever the
    # number of steps (8: a short rerun)
    set_params(project, train={"learning_rate": 1e-12, "max_steps": 8})
    rerun = sh(["dvc", "repro"], project).stdout
    ran = {s for s in ("validate", "tokenize", "train", "evaluate", "register") if f"Running stage '{s}'" in rerun}
    assert ran == {"train", "evaluate", "register"}, rerun
    worse = json.loads((project / "out" / "evaluate" / "metrics.json").read_text())
    assert worse["accuracy"] < first["accuracy"]
    reg = json.loads((project / "out" / "register" / "registration.json").read_text())
    assert (reg["version"], reg["alias"], reg["promoted"]) == ("2", "challenger", False)
    assert reg["champion_before"]["version"] in ("1", 1)
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(MODEL, "challenger").version) == "2"


def test_cosmetic_settings_do_not_rerun_train_after_a_real_repro(project, first_run):
    """On the real run: log_every/threads/checkpoint_every are not train's params; learning_rate is."""
    import yaml

    before = (project / "params.yaml").read_text()
    try:
        set_params(project, train={"log_every": 3, "threads": 1, "checkpoint_every": 7})
        status = sh(["dvc", "status", "train"], project).stdout
        assert "up to date" in status, status
        lr = yaml.safe_load(before)["train"]["learning_rate"]
        set_params(project, train={"learning_rate": lr * 2})
        status = sh(["dvc", "status", "train"], project).stdout
        assert "train.learning_rate" in status and "log_every" not in status, status
    finally:
        (project / "params.yaml").write_text(before)


def test_dvc_push_to_the_default_local_remote(project, first_run):
    sh(["dvc", "push", "-q", "data.dvc"], project)
    stored = [p for p in (project / ".dvc-remote").rglob("*") if p.is_file()]
    assert len(stored) >= 2  # the .dir manifest + the CSV


def test_register_against_a_real_mlflow_server(project, first_run, mlflow_server):
    import mlflow.pyfunc
    from mlflow import MlflowClient

    url = mlflow_server.url
    env = {**ENV, "MLFLOW_TRACKING_URI": url}
    # out/model is the lr~0 model of the test before: open the gate, what is tested is where it lands
    sh(["finetune", "register", "--set", f"register.model_name={MODEL}-srv", "--set", "register.floor=0",
        "--set", "register.min_macro_f1=0", "--out", "out/register-server"], project, env)
    reg = json.loads((project / "out" / "register-server" / "registration.json").read_text())
    assert reg["tracking_uri"] == url and reg["alias"] == "champion"
    client = MlflowClient(url)
    assert str(client.get_model_version_by_alias(f"{MODEL}-srv", "champion").version) == reg["version"]
    # artifacts went through the server into its artifact destination, not into the project
    assert list((mlflow_server.root / "artifacts").rglob("model.safetensors"))
    os.environ["MLFLOW_TRACKING_URI"] = url
    try:
        preds = mlflow.pyfunc.load_model(f"models:/{MODEL}-srv@champion").predict(
            ["a moving, beautifully acted drama", "a tedious, lifeless mess"])
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    assert len(preds) == 2 and set(preds) <= {"fresh", "rotten"}


def test_fresh_clone_data_matches_data_dvc(tmp_path):
    """What `make data` does on a fresh clone: rebuild the raw file from the installed package; DVC agrees."""
    root = copy_repo(tmp_path)
    sh(["finetune", "materialize", "-q"], root)
    status = sh(["dvc", "status", "data.dvc"], root).stdout
    assert "up to date" in status, status
    assert (root / "data.dvc").read_bytes() == (REPO / "data.dvc").read_bytes()  # data.dvc untouched


def test_materialize_refuses_bytes_that_do_not_match_data_dvc(tmp_path, monkeypatch):
    import finetune.stages.materialize as sd

    root = copy_repo(tmp_path)
    recorded = (root / "data.dvc").read_bytes()
    monkeypatch.chdir(root)
    monkeypatch.setenv("PATH", ENV["PATH"])
    monkeypatch.setattr(sd, "build_csv", lambda: b"text,label\nnot the real data,fresh\n")
    with pytest.raises(sd.DataSetMismatch, match="does not match the hash in data.dvc"):
        sd.materialize_tracked("data/reviews.csv")
    assert (root / "data.dvc").read_bytes() == recorded and not (root / "data" / "reviews.csv").exists()


def test_data_uri_of_a_dvc_tracked_path_at_a_git_revision(project, tmp_path):
    """What the Kubeflow validate step does with data_uri=dvc://...: read the file DVC tracks at that revision."""
    from finetune.common.sources import fetch

    rev = sh(["git", "rev-parse", "HEAD"], project).stdout.strip()
    got = fetch(f"dvc://data/reviews.csv?repo={project}&rev={rev}", tmp_path)
    assert got.read_bytes() == (project / "data" / "reviews.csv").read_bytes()


def test_repro_writes_report_card_and_dvc_plots(project, first_run):
    reg = json.loads((project / "out" / "register" / "registration.json").read_text())
    page = (project / "out" / "register" / "report.html").read_text(encoding="utf-8")
    # four evaluate plots and compress's front (accuracy against texts/s, the served variant starred)
    assert f"{MODEL} v{reg['version']}" in page and page.count('src="data:image/png;base64,') == 5
    assert 'alt="the front: test accuracy against texts/s, the served variant starred"' in page
    assert f"# {MODEL}, version {reg['version']}" in (project / "out" / "register" / "model_card.md").read_text()
    plots = json.loads(sh(["dvc", "plots", "show", "--json"], project).stdout)["data"]
    roc = plots["out/evaluate/roc.csv"][0]["content"]
    assert roc["encoding"]["color"]["field"] == "class"  # the .dvc/plots template: one line per class
    assert {r["class"] for r in roc["data"]["values"]} == {"fresh", "rotten"}
    lengths = plots["out/tokenize/lengths.csv"][0]["content"]["data"]["values"]
    assert {r["field"] for r in lengths} == {"train", "val", "test"}
    assert {"out/evaluate/roc.png", "out/train/loss.csv"} <= set(plots)


def test_queued_experiment_registers_in_the_project_and_shows_in_exp_show(project, first_run):
    """`dvc exp run --queue -S ...` + `dvc queue start`: the experiment runs in a temporary copy, registers into
    the project's own mlflow.db (no MLFLOW_TRACKING_URI set), and `dvc exp show` has its metrics."""
    import time

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    before = len(client.search_model_versions(f"name = '{MODEL}'"))
    sh(["dvc", "exp", "run", "--queue", "-n", "sweep-a", "-S", "train.max_steps=4", "-S", "train.learning_rate=5e-5"],
       project)
    sh(["dvc", "queue", "start", "-j", "1"], project)
    deadline = time.time() + 400
    while "sweep-a" not in (status := sh(["dvc", "queue", "status"], project).stdout) or \
            any(s in status for s in ("Queued", "Running")):
        assert time.time() < deadline, status
        time.sleep(5)
    assert "Success" in status, sh(["dvc", "queue", "logs", "sweep-a"], project, check=False).stdout[-3000:]
    shown = json.loads(sh(["dvc", "exp", "show", "--json"], project).stdout)
    exps = [e for base in shown for e in (base.get("experiments") or []) if e.get("name") == "sweep-a"]
    data = exps[0]["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["max_steps"] == 4
    assert 0 <= data["metrics"]["out/evaluate/metrics.json"]["data"]["accuracy"] <= 1
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == before + 1
