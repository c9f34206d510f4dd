"""Integration: the pipeline against the production-shaped stack (tests/stack.py): PostgreSQL as MLflow's backend
store, SeaweedFS S3 for artifacts, data and the DVC remote, an `mlflow server` between them, all configured from
the rendered k8s/overlays/dev manifests. Both ways to run the pipeline register into it: `dvc repro` in a copy
of the repo, and the KFP DAG on the local runner reading its data from s3://."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import yaml

from conftest import ENV, REPO, copy_repo, set_params, sh

pytestmark = pytest.mark.integration
sys.path.insert(0, str(REPO))
DVC_MODEL, KFP_MODEL = "stack-dvc", "stack-kfp"
REVIEWS = ["a moving, beautifully acted drama", "a tedious, lifeless mess", "funny and warm"]
# A few training steps give a weak model: open the promotion gate (what is tested here is where it lands).
NO_GATE = {k: 0.0 for k in ("floor", "min_macro_f1")
           if k in yaml.safe_load((REPO / "params.yaml").read_text())["register"]}


def query(stack, sql: str, *args) -> list[tuple]:
    import psycopg2

    with psycopg2.connect(**stack.postgres) as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall()


def s3_keys(stack, prefix: str) -> list[str]:
    pages = stack.s3().get_paginator("list_objects_v2").paginate(Bucket=stack.bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def champion_in_postgres_and_s3(stack, name: str) -> tuple[str, bytes]:
    """The registry rows are in PostgreSQL, the run's files and the version's model in the bucket.
    Returns the champion's version and its weights as stored in S3."""
    assert query(stack, "SELECT name FROM registered_models WHERE name = %s", name) == [(name,)]
    ((version, run_id, storage),) = query(
        stack, "SELECT a.version, v.run_id, v.storage_location FROM registered_model_aliases a JOIN model_versions v "
               "ON v.name = a.name AND v.version = a.version WHERE a.name = %s AND a.alias = 'champion'", name)
    # mlflow-artifacts:/<experiment>/models/<id>/artifacts, proxied by the server to s3://bucket/mlflow-artifacts/
    assert storage.startswith("mlflow-artifacts:/"), storage
    model_keys = s3_keys(stack, "mlflow-artifacts/" + storage.removeprefix("mlflow-artifacts:/") + "/")
    assert any(k.endswith("/MLmodel") for k in model_keys), model_keys
    (weights,) = [k for k in model_keys if k.endswith("/model.safetensors")]
    run_keys = s3_keys(stack, "mlflow-artifacts/")
    assert any(f"/{run_id}/artifacts/evaluation/metrics.json" in k for k in run_keys), run_keys
    return str(version), stack.s3().get_object(Bucket=stack.bucket, Key=weights)["Body"].read()


def predicts_through_the_server(stack, name: str) -> None:
    import mlflow.pyfunc

    os.environ["MLFLOW_TRACKING_URI"] = stack.url
    try:
        preds = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(REVIEWS)
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    assert len(preds) == len(REVIEWS) and set(preds) <= {"fresh", "rotten"}, preds


# ---- the stack itself ----

def test_stack_runs_what_the_dev_overlay_describes(stack):
    from urllib.request import urlopen

    import botocore.exceptions

    cluster = yaml.safe_load((REPO / "pipelines" / "cluster.yaml").read_text())["secrets"]
    assert set(stack.client_env) == {k for s in cluster.values() for k in s["env"]}  # the pipeline's secret keys
    # the MLflow process got the manifest's environment: a PostgreSQL backend, S3 artifacts, local addresses
    environ = dict(kv.split("=", 1) for kv in
                   open(f"/proc/{stack.state['pgids']['mlflow']}/environ").read().split("\0") if "=" in kv)
    pg = stack.postgres
    assert environ["MLFLOW_BACKEND_STORE_URI"] == (f"postgresql+psycopg2://{pg['user']}:{pg['password']}"
                                                   f"@127.0.0.1:{pg['port']}/{pg['dbname']}")
    assert environ["MLFLOW_ARTIFACTS_DESTINATION"] == f"s3://{stack.bucket}/mlflow-artifacts"
    assert environ["MLFLOW_S3_ENDPOINT_URL"] == stack.client_env["MLFLOW_S3_ENDPOINT_URL"]
    assert environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    with urlopen(stack.url + "/health", timeout=10) as r:
        assert r.status == 200
    # MLflow created its schema in PostgreSQL
    assert query(stack, "SELECT count(*) FROM information_schema.tables WHERE table_name = 'model_versions'") == [(1,)]
    # S3 enforces the credentials from the finetune-s3 secret; the bucket job made the bucket
    assert stack.bucket in [b["Name"] for b in stack.s3().list_buckets()["Buckets"]]
    with pytest.raises(botocore.exceptions.ClientError):
        stack.s3(aws_secret_access_key="not-the-secret").list_buckets()
    with pytest.raises(OSError) as anonymous:
        urlopen(f"{stack.client_env['AWS_ENDPOINT_URL']}/{stack.bucket}", timeout=10)
    assert getattr(anonymous.value, "code", None) == 403


# ---- way 1: dvc repro, DVC remote on the same bucket ----

@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory, real_reviews, stack):
    """A copy of the repo on 600 real reviews, a short run, MLflow and a DVC remote on the stack."""
    root = copy_repo(tmp_path_factory.mktemp("stack-project"))
    (root / "data").mkdir(exist_ok=True)
    real_reviews.groupby("label").head(300).to_csv(root / "data" / "reviews.csv", index=False)
    env = {**ENV, **stack.client_env}  # what a developer exports after `make stack-up`
    sh(["dvc", "add", "-q", "data"], root, env)
    sh(["dvc", "remote", "add", "-d", "stack", f"s3://{stack.bucket}/dvc"], root, env)
    sh(["dvc", "remote", "modify", "stack", "endpointurl", stack.client_env["AWS_ENDPOINT_URL"]], root, env)
    set_params(root, validate={"val_fraction": 0.15, "test_fraction": 0.2}, tokenize={"max_length": 32},
               train={"max_steps": 20, "batch_size": 16, "learning_rate": 1e-4, "checkpoint_every": 10, "threads": 2},
               register={"model_name": DVC_MODEL, **NO_GATE}, compress={"latency_requests": 10})
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "fixture"], root, env)
    sh(["dvc", "repro", "evaluate"], root, env)  # no registry needed up to here: MLflow warms up meanwhile
    stack.url
    sh(["dvc", "repro"], root, env)
    return root, env


def test_dvc_repro_registers_into_postgres_and_s3(dvc_project, stack):
    root, _ = dvc_project
    reg = json.loads((root / "out" / "register" / "registration.json").read_text())
    assert reg["tracking_uri"] == stack.url and reg["alias"] == "champion"
    version, weights = champion_in_postgres_and_s3(stack, DVC_MODEL)
    assert version == str(reg["version"])
    assert weights == (root / "out" / "model" / "model.safetensors").read_bytes()  # the trained model, intact
    assert not (root / "mlartifacts").exists() and not (root / "mlflow.db").exists()  # nothing local
    predicts_through_the_server(stack, DVC_MODEL)


def test_dvc_push_and_pull_round_trip_through_s3(dvc_project, stack):
    root, env = dvc_project
    original = (root / "data" / "reviews.csv").read_bytes()
    sh(["dvc", "push", "-q", "data.dvc"], root, env)
    stored = s3_keys(stack, "dvc/")
    assert any(k.endswith(".dir") for k in stored) and len(stored) >= 2, stored
    shutil.rmtree(root / ".dvc" / "cache")
    shutil.rmtree(root / "data")
    sh(["dvc", "pull", "-q", "data.dvc"], root, env)
    assert (root / "data" / "reviews.csv").read_bytes() == original
    assert "up to date" in sh(["dvc", "status", "data.dvc"], root, env).stdout


# ---- way 2: the KFP DAG on the local runner, data from s3:// ----

def test_kfp_pipeline_reads_s3_data_and_registers_on_the_stack(stack, real_reviews, tmp_path, monkeypatch):
    from kfp import local
    from mlflow import MlflowClient
    from pipelines.finetune_pipeline import DEFAULT_DATA_URI, build

    from finetune.common.params import drop_none

    # the pipeline's default data_uri points into the bucket the dev overlay creates: upload there, pass nothing
    data_uri = DEFAULT_DATA_URI
    bucket, _, key = data_uri.removeprefix("s3://").partition("/")
    assert bucket == stack.bucket, "pipelines' DEFAULT_DATA_URI and the S3_BUCKET of k8s/ disagree"
    stack.s3().put_object(Bucket=bucket, Key=key,
                          Body=real_reviews.groupby("label").head(200).to_csv(index=False).encode())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["validate"].update(val_fraction=0.15, test_fraction=0.2)
    params["tokenize"]["max_length"] = 32
    params["train"].update(threads=2, checkpoint_every=0, max_steps=8, batch_size=16, learning_rate=1e-4)
    params["register"].update(NO_GATE, model_name=KFP_MODEL)
    params["compress"]["latency_requests"] = 10  # what lands in the registry is tested here, not latency
    for name, value in stack.client_env.items():  # exactly what the two secrets give the steps on a cluster
        monkeypatch.setenv(name, value)
    stack.url
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp-root"))
    build()(params=drop_none(params))
    version, weights = champion_in_postgres_and_s3(stack, KFP_MODEL)
    assert len(weights) > 10_000_000  # MiniLM's ~90 MB of float32 weights
    run = MlflowClient(stack.url).get_run(MlflowClient(stack.url).get_model_version(KFP_MODEL, version).run_id)
    assert run.data.tags["lineage.data_uri"] == data_uri and run.data.params["train.max_steps"] == "8"
    predicts_through_the_server(stack, KFP_MODEL)


def test_s3_down_at_register_time_then_rerun_registers_exactly_once(stack, tiny_classifier_dir, monkeypatch):
    """The artifact store goes down: bounded retries, a clear error, no version, no alias; once it is back, a
    rerun of the same registration registers exactly one version."""
    from mlflow import MlflowClient

    from finetune.common.config import RegisterConfig
    from finetune.registry.request import RegistrationRequest, RegistryError
    from finetune.registry.transaction import register

    url = stack.url
    cfg = RegisterConfig(model_name="outage", experiment="outage", floor=0.0, min_macro_f1=0.0, retries=1,
                         retry_backoff=0.5)
    metrics = {"accuracy": 0.8, "macro_f1": 0.8}
    client = MlflowClient(url)
    stack.kill("s3")
    try:
        with monkeypatch.context() as outage:
            # Our retries (register.retries) are what is tested: MLflow's own HTTP retries of each failing upload
            # and cleanup request (the server's S3 client waits ~10 s per request) would only repeat them.
            outage.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            with pytest.raises(RegistryError, match="giving up after 2 attempt"):
                register(RegistrationRequest.for_model(tiny_classifier_dir, metrics, cfg, url, test_hash="t"))
        assert client.search_model_versions("name = 'outage'") == []
    finally:
        stack.restart("s3")
    first = register(RegistrationRequest.for_model(tiny_classifier_dir, metrics, cfg, url, test_hash="t"))
    again = register(RegistrationRequest.for_model(tiny_classifier_dir, metrics, cfg, url, test_hash="t"))
    assert first.alias == "champion" and again.version == first.version
    assert [str(v.version) for v in client.search_model_versions("name = 'outage'")] == [first.version]
