"""KServe serving of the champion, checked offline: k8s/overlays/prod-serving renders, its core objects validate
strictly against the Kubernetes schemas, the InferenceService against k8s/schemas/inferenceservice-v1beta1.json
(its pod and container parts against the core schemas), and it follows the deployment rules. Then the deploy
step's patch logic against a fake Kubernetes client."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from conftest import K8S_VERSION, MARKERS, NAMESPACE, REPO, kubernetes_validate
from finetune.cluster.deploy import DeployError, deploy_champion, storage_patch
from stack import render

SCHEMA = json.loads((REPO / "k8s" / "schemas" / "inferenceservice-v1beta1.json").read_text())
MODEL_EXTRA = {"modelFormat", "runtime", "protocolVersion", "storageUri", "storage"}  # ModelSpec beyond Container
EXTENSION = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "containerConcurrency", "timeout",
             "canaryTrafficPercent", "labels", "annotations", "logger", "batcher", "deploymentStrategy", "model"}


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return render("prod-serving", MARKERS)


def isvc(docs) -> dict:
    (obj,) = [d for d in docs if d["kind"] == "InferenceService"]
    return obj


def validator() -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    return jsonschema.Draft202012Validator(SCHEMA)


def pod_template(predictor: dict) -> dict:
    """The predictor's PodSpec part, with the model as its container, as a core PodTemplate."""
    spec = {k: v for k, v in predictor.items() if k not in EXTENSION}
    container = {k: v for k, v in predictor["model"].items() if k not in MODEL_EXTRA}
    spec["containers"] = [{"name": "kserve-container", "image": "runtime", **container}]
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "predictor"},
            "template": {"metadata": {"labels": predictor.get("labels", {})}, "spec": spec}}


def test_core_objects_validate_strictly(docs, tmp_path):
    import yaml

    core = [d for d in docs if not d["apiVersion"].startswith("serving.kserve.io")]
    path = tmp_path / "core.yaml"
    path.write_text(yaml.safe_dump_all(core))
    proc = kubernetes_validate(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {d["metadata"]["namespace"] for d in docs if d["kind"] != "Namespace"} == {NAMESPACE}


def test_inferenceservice_matches_crd_schema_and_core_pod_schema(docs):
    import kubernetes_validate as kv

    obj = isvc(docs)
    validator().validate(obj)
    kv.validate(pod_template(obj["spec"]["predictor"]), K8S_VERSION, strict=True)


def test_inferenceservice_follows_the_deployment_rules(docs):
    obj = isvc(docs)
    pred = obj["spec"]["predictor"]
    model = pred["model"]
    assert model["modelFormat"]["name"] == "mlflow" and model["protocolVersion"] == "v2"
    assert obj["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    # the same bucket as MLflow's artifact store (prod's finetune-config S3_BUCKET)
    (config,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("finetune-config")]
    mlflow = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    env = {e["name"]: e.get("value") for e in mlflow["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://$(S3_BUCKET)/mlflow-artifacts"
    assert model["storageUri"].startswith(f"s3://{config['data']['S3_BUCKET']}/mlflow-artifacts/")
    # resources, non-root, no privilege escalation
    assert model["resources"]["limits"]["memory"] == model["resources"]["requests"]["memory"]
    assert "cpu" in model["resources"]["limits"]
    assert pred["securityContext"]["runAsNonRoot"] is True and pred["securityContext"]["runAsUser"] > 0
    assert model["securityContext"]["allowPrivilegeEscalation"] is False
    assert model["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # S3 reachable (the label S3 and MLflow accept), credentials via the service account, none in clear text
    assert pred["labels"]["finetune/pipeline-access"] == "true"
    sa = next(d for d in docs if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == pred["serviceAccountName"])
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == sa["secrets"][0]["name"])
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["data"])
    assert "serving.kserve.io/s3-endpoint" in secret["metadata"]["annotations"]
    assert not any(m in json.dumps(obj) for m in MARKERS.values())
    # inference traffic: a policy selects the predictor pods and admits only labelled clients
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "finetune-serving-ingress")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= pred["labels"].items()
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {"finetune/serving-access": "true"}


def test_prod_overlay_has_no_inferenceservice():
    assert not [d for d in render("prod", MARKERS) if d["kind"] == "InferenceService"]  # needs KServe: opt-in


@pytest.mark.parametrize("mutate, message", [
    (lambda o: o["spec"]["predictor"].update(minReplica=1), "minReplica"),
    (lambda o: o["spec"]["predictor"]["model"].update(protocolVersion="v3"), "v3"),
    (lambda o: o["spec"]["predictor"]["model"].pop("modelFormat"), "modelFormat"),
    (lambda o: o["spec"]["predictor"]["model"].update(storageUri="ftp://host/model"), "ftp://"),
    (lambda o: o["spec"]["predictor"].update(scaleMetric="latency"), "latency"),
    (lambda o: o["spec"].update(predictors=o["spec"].pop("predictor")), "predictor"),
    (lambda o: o.update(apiVersion="serving.kserve.io/v1alpha1"), "serving.kserve.io/v1beta1"),
])
def test_schema_rejects_broken_inferenceservices(docs, mutate, message):
    obj = copy.deepcopy(isvc(docs))
    mutate(obj)
    with pytest.raises(jsonschema.ValidationError) as err:
        validator().validate(obj)
    assert message in str(err.value)


def test_core_schema_rejects_a_typo_in_the_model_container(docs):
    import kubernetes_validate as kv

    pred = copy.deepcopy(isvc(docs)["spec"]["predictor"])
    pred["model"]["resource"] = pred["model"].pop("resources")
    with pytest.raises(Exception, match="resource"):
        kv.validate(pod_template(pred), K8S_VERSION, strict=True)


# ---- the deploy step against a fake client ----

class FakeCustomObjects:
    def __init__(self, obj: dict):
        self.obj, self.patches = obj, []

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        assert (group, version, plural) == ("serving.kserve.io", "v1beta1", "inferenceservices")
        assert (namespace, name) == (self.obj["metadata"]["namespace"], self.obj["metadata"]["name"])
        return copy.deepcopy(self.obj)

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body):
        self.patches.append(body)
        self.obj = merge(self.obj, body)
        return self.obj


def merge(target: dict, patch: dict) -> dict:
    """JSON merge patch (RFC 7386), as the API server applies a dict body to a custom object."""
    out = copy.deepcopy(target)
    for k, v in patch.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


URI = "s3://finetune-prod/mlflow-artifacts/1/models/m-abc/artifacts"
PROMOTED = {"model_name": "rotten-tomatoes-minilm", "version": "7", "alias": "champion", "promoted": True}


def test_deploy_points_the_service_at_a_promoted_champion(docs):
    api = FakeCustomObjects(isvc(docs))
    result = deploy_champion(PROMOTED, URI, api, "finetune-champion", NAMESPACE)
    assert result.changed and "version 7" in result.message
    assert api.patches == [storage_patch(URI, "rotten-tomatoes-minilm", "7")]
    assert api.obj["spec"]["predictor"]["model"]["storageUri"] == URI
    assert api.obj["metadata"]["annotations"]["finetune/model-version"] == "rotten-tomatoes-minilm/7"
    validator().validate(api.obj)  # the patched object is still a valid InferenceService
    again = deploy_champion(PROMOTED, URI, api, "finetune-champion", NAMESPACE)
    assert not again.changed and len(api.patches) == 1  # already serving it: nothing to do


def test_deploy_leaves_the_service_alone_when_not_promoted(docs):
    api = FakeCustomObjects(isvc(docs))
    before = copy.deepcopy(api.obj)
    result = deploy_champion({**PROMOTED, "alias": "challenger", "promoted": False}, URI, api,
                             "finetune-champion", NAMESPACE)
    assert not result.changed and "not promoted" in result.message
    assert api.patches == [] and api.obj == before


def test_deploy_refuses_a_uri_kserve_cannot_fetch(docs):
    api = FakeCustomObjects(isvc(docs))
    with pytest.raises(DeployError, match="mlflow-artifacts:/1/x"):
        deploy_champion(PROMOTED, "mlflow-artifacts:/1/x", api, "finetune-champion", NAMESPACE)
    assert api.patches == []


@pytest.mark.parametrize("uri, expected", [
    ("mlflow-artifacts:/1/models/m-abc/artifacts", "s3://b/mlflow-artifacts/1/models/m-abc/artifacts"),
    ("mlflow-artifacts://mlflow:5000/1/models/m-abc/artifacts", "s3://b/mlflow-artifacts/1/models/m-abc/artifacts"),
    ("s3://other/1/models/m-abc/artifacts", "s3://other/1/models/m-abc/artifacts"),
])
def test_proxied_artifact_uris_resolve_to_the_bucket(uri, expected):
    from finetune.cluster.deploy import resolve_proxied

    assert resolve_proxied(uri, "s3://b/mlflow-artifacts/") == expected


def test_run_deploy_does_nothing_for_a_challenger(tmp_path):
    """Not promoted: no registry lookup, no cluster client, nothing patched."""
    from finetune.cluster.deploy import run_deploy

    (tmp_path / "registration.json").write_text(json.dumps({**PROMOTED, "alias": "challenger", "promoted": False,
                                                            "tracking_uri": "http://127.0.0.1:9"}))
    result = run_deploy(tmp_path, "finetune-champion", NAMESPACE, "s3://b/mlflow-artifacts")
    assert result == {"changed": False, "storage_uri": None,
                      "message": "rotten-tomatoes-minilm version 7 was not promoted (challenger): "
                                 "InferenceService finetune/finetune-champion left as it is"}


def test_pipeline_service_account_may_patch_only_the_inferenceservice(docs):
    role = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "finetune-deploy")
    binding = next(d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["name"] == "finetune-deploy")
    assert role["rules"] == [{"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"],
                              "resourceNames": [isvc(docs)["metadata"]["name"]], "verbs": ["get", "patch"]}]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "finetune-pipeline", "namespace": NAMESPACE}]


def test_run_deploy_reads_the_registry_address_from_the_environment(docs, tmp_path, monkeypatch):
    """registration.json holds the redacted tracking URI (credentials replaced by ***): the deploy step must use
    MLFLOW_TRACKING_URI (the pod's secret) to look the version up, and say so in one line when it is unset."""
    from mlflow import MlflowClient

    from finetune.cluster.deploy import run_deploy

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    client.create_registered_model(PROMOTED["model_name"])
    source = "s3://finetune-prod/mlflow-artifacts/1/models/m-abc/artifacts"
    mv = client.create_model_version(PROMOTED["model_name"], source)
    redacted = {**PROMOTED, "version": str(mv.version), "tracking_uri": "http://***@127.0.0.1:9"}
    (tmp_path / "registration.json").write_text(json.dumps(redacted))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a wrong address fails at once, not after minutes
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    api = FakeCustomObjects(isvc(docs))
    result = run_deploy(tmp_path, "finetune-champion", NAMESPACE, "s3://finetune-prod/mlflow-artifacts", api=api)
    assert result["changed"] and result["storage_uri"] == source
    assert api.obj["spec"]["predictor"]["model"]["storageUri"] == source

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(DeployError, match="^MLFLOW_TRACKING_URI is not set: the deploy step reads the registry's "
                                          "address from the environment"):
        run_deploy(tmp_path, "finetune-champion", NAMESPACE, "s3://finetune-prod/mlflow-artifacts", api=api)
