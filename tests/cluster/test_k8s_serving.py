"""KServe serving of the champion (`finetune serve` as a custom predictor), checked offline: k8s/overlays/prod-serving
and prod-serving-keda render, its core objects validate
strictly against the Kubernetes schemas, the InferenceService against k8s/schemas/inferenceservice-v1beta1.json
(its pod and container parts against the core schemas), and it follows the deployment rules. Then the deploy
step's patch logic against a fake Kubernetes client."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from conftest import K8S_VERSION, MARKERS, NAMESPACE, REPO, kubernetes_validate
from finetune.cluster.deploy import DeployError, deploy_champion, serving_patch
from stack import render

SCHEMA = json.loads((REPO / "k8s" / "schemas" / "inferenceservice-v1beta1.json").read_text())
EXTENSION = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "containerConcurrency", "timeout",
             "canaryTrafficPercent", "labels", "annotations", "logger", "batcher", "deploymentStrategy"}
OVERLAYS = ["prod-serving", "prod-serving-keda"]


@pytest.fixture(scope="module", params=OVERLAYS)
def docs(request) -> list[dict]:
    return render(request.param, MARKERS)


def isvc(docs) -> dict:
    (obj,) = [d for d in docs if d["kind"] == "InferenceService"]
    return obj


def validator() -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    return jsonschema.Draft202012Validator(SCHEMA)


def pod_template(predictor: dict) -> dict:
    """The predictor's PodSpec part (its containers included) as a core PodTemplate."""
    spec = {k: v for k, v in predictor.items() if k not in EXTENSION}
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


def serving_container(obj: dict) -> dict:
    (container,) = obj["spec"]["predictor"]["containers"]
    return container


def test_inferenceservice_follows_the_deployment_rules(docs):
    obj = isvc(docs)
    pred = obj["spec"]["predictor"]
    model = serving_container(obj)
    assert "model" not in pred  # no serving runtime: the project's image runs `finetune serve`
    assert obj["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    # the project's image, tagged like the training pods (k8s/components/settings images: = components/image.txt)
    trainer = next(d for d in render("prod-trainjob", MARKERS) if d["kind"] == "TrainingRuntime")
    assert model["image"] == json.dumps(trainer).split('"image": "')[1].split('"')[0]
    assert model["image"].split(":")[0].endswith("finetune") and ":" in model["image"]
    assert model["command"] == ["finetune", "serve"]
    args = model["args"]
    assert args[args.index("--host") + 1] == "0.0.0.0" and args[args.index("--port") + 1] == "8080"
    assert args[args.index("--model") + 1].startswith("models:/")
    assert model["ports"] == [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}]
    assert model["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert model["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    # the pipeline's secrets (pipelines/cluster.yaml), none in clear text
    import yaml

    cluster = yaml.safe_load((REPO / "pipelines" / "cluster.yaml").read_text())
    assert [s["secretRef"]["name"] for s in model["envFrom"]] == [cluster["secrets"]["mlflow"]["name"],
                                                                 cluster["secrets"]["s3"]["name"]]
    assert not {"MLFLOW_TRACKING_URI", "AWS_SECRET_ACCESS_KEY"} & {e["name"] for e in model.get("env", [])}
    # autoscaling on in-flight requests
    assert (pred["scaleMetric"], pred["minReplicas"]) == ("concurrency", 1)
    assert pred["maxReplicas"] >= pred["minReplicas"] and pred["scaleTarget"] >= 1
    # resources, non-root, read-only root filesystem with a writable /tmp (model download, HF cache, request log)
    assert model["resources"]["limits"]["memory"] == model["resources"]["requests"]["memory"]
    assert "cpu" in model["resources"]["limits"]
    assert pred["securityContext"]["runAsNonRoot"] is True and pred["securityContext"]["runAsUser"] > 0
    assert model["securityContext"]["allowPrivilegeEscalation"] is False
    assert model["securityContext"]["readOnlyRootFilesystem"] is True
    assert model["securityContext"]["capabilities"]["drop"] == ["ALL"]
    (tmp,) = [m for m in model["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in next(v for v in pred["volumes"] if v["name"] == tmp["name"])
    assert {"name": "HF_HOME", "value": "/tmp/hf"} in model["env"]
    # S3 reachable (the label S3 and MLflow accept), credentials via the service account, none in clear text
    assert pred["labels"]["finetune/pipeline-access"] == "true"
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "finetune-s3")
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["data"])
    sa = next(d for d in docs if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == pred["serviceAccountName"])
    assert sa["automountServiceAccountToken"] is False
    assert not any(m in json.dumps(obj) for m in MARKERS.values())
    # inference traffic: a policy selects the predictor pods and admits only labelled clients
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "finetune-serving-ingress")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= pred["labels"].items()
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {"finetune/serving-access": "true"}


def test_keda_overlay_changes_only_the_autoscaler_class():
    plain, keda = isvc(render("prod-serving", MARKERS)), isvc(render("prod-serving-keda", MARKERS))
    assert keda["metadata"]["annotations"].pop("serving.kserve.io/autoscalerClass") == "keda"
    assert keda == plain
    assert plain["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"  # KEDA needs it


def test_prod_overlay_has_no_inferenceservice():
    assert not [d for d in render("prod", MARKERS) if d["kind"] == "InferenceService"]  # needs KServe: opt-in


@pytest.mark.parametrize("mutate, message", [
    (lambda o: o["spec"]["predictor"].update(minReplica=1), "minReplica"),
    (lambda o: o["spec"]["predictor"].pop("containers"), "containers"),
    (lambda o: o["spec"]["predictor"].update(model={"storageUri": "s3://b/m"}), "modelFormat"),
    (lambda o: o["metadata"]["annotations"].update({"serving.kserve.io/deploymentMode": "Raw"}), "Raw"),
    (lambda o: o["metadata"]["annotations"].update({"serving.kserve.io/autoscalerClass": "kedas"}), "kedas"),
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
    pred["containers"][0]["resource"] = pred["containers"][0].pop("resources")
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


PROMOTED = {"model_name": "rotten-tomatoes-minilm", "version": "7", "alias": "champion", "promoted": True}
URI = "models:/rotten-tomatoes-minilm/7"


def served(obj: dict) -> str:
    args = obj["spec"]["predictor"]["containers"][0]["args"]
    return args[args.index("--model") + 1]


def test_deploy_points_the_service_at_a_promoted_champion(docs):
    api = FakeCustomObjects(isvc(docs))
    before = copy.deepcopy(api.obj)
    result = deploy_champion(PROMOTED, api, "finetune-champion", NAMESPACE)
    assert result.changed and "version 7" in result.message and result.model_uri == URI
    assert api.patches == [serving_patch(before, URI, "rotten-tomatoes-minilm", "7")]
    assert served(api.obj) == URI  # pinned: the version, not the alias that will move
    assert api.obj["metadata"]["annotations"]["finetune/model-version"] == "rotten-tomatoes-minilm/7"
    # only --model changed: host, port, image, probes as they were
    after = copy.deepcopy(api.obj)
    for o in (before, after):
        o["spec"]["predictor"]["containers"][0]["args"].remove(served(o))
        o["metadata"]["annotations"].pop("finetune/model-version")
    assert after == before
    validator().validate(api.obj)  # the patched object is still a valid InferenceService
    again = deploy_champion(PROMOTED, api, "finetune-champion", NAMESPACE)
    assert not again.changed and len(api.patches) == 1  # already serving it: nothing to do


def test_deploy_serves_the_variant_register_recorded(docs):
    """compress chose a student, register recorded it (registration.json ``serving``): the service loads the
    student's pinned version, digest-verified by `finetune serve` like any version; unrecorded: the fp32 one."""
    student = {"model_name": "rotten-tomatoes-minilm-student", "version": "3", "recorded": True}
    api = FakeCustomObjects(isvc(docs))
    result = deploy_champion({**PROMOTED, "serving": student}, api, "finetune-champion", NAMESPACE)
    assert result.model_uri == "models:/rotten-tomatoes-minilm-student/3" == served(api.obj)
    assert api.obj["metadata"]["annotations"]["finetune/model-version"] == "rotten-tomatoes-minilm-student/3"
    validator().validate(api.obj)
    failed = deploy_champion({**PROMOTED, "serving": {**student, "recorded": False}}, api, "finetune-champion",
                             NAMESPACE)
    assert failed.model_uri == URI == served(api.obj)


def test_deploy_leaves_the_service_alone_when_not_promoted(docs):
    api = FakeCustomObjects(isvc(docs))
    before = copy.deepcopy(api.obj)
    result = deploy_champion({**PROMOTED, "alias": "challenger", "promoted": False}, api,
                             "finetune-champion", NAMESPACE)
    assert not result.changed and "not promoted" in result.message
    assert api.patches == [] and api.obj == before


@pytest.mark.parametrize("registration, message", [
    ({**PROMOTED, "version": "champion"}, "version 'champion' do not name a registry version"),
    ({**PROMOTED, "model_name": None}, "model_name None"),
])
def test_deploy_refuses_a_registration_without_a_pinned_version(docs, registration, message):
    api = FakeCustomObjects(isvc(docs))
    with pytest.raises(DeployError, match=message):
        deploy_champion(registration, api, "finetune-champion", NAMESPACE)
    assert api.patches == []


def test_deploy_refuses_a_service_without_the_serve_container(docs):
    obj = copy.deepcopy(isvc(docs))
    obj["spec"]["predictor"]["containers"][0]["args"] = ["--port", "8080"]
    api = FakeCustomObjects(obj)
    with pytest.raises(DeployError, match="finetune-champion: its predictor has no container with a --model"):
        deploy_champion(PROMOTED, api, "finetune-champion", NAMESPACE)
    assert api.patches == []


def test_run_deploy_does_nothing_for_a_challenger(tmp_path):
    """Not promoted: no registry lookup, no cluster client, nothing patched."""
    from finetune.cluster.deploy import run_deploy

    (tmp_path / "registration.json").write_text(json.dumps({**PROMOTED, "alias": "challenger", "promoted": False,
                                                            "tracking_uri": "http://127.0.0.1:9"}))
    result = run_deploy(tmp_path, "finetune-champion", NAMESPACE, "s3://b/mlflow-artifacts")
    assert result == {"changed": False, "model_uri": None,
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
    assert result["changed"] and result["model_uri"] == f"models:/{PROMOTED['model_name']}/{mv.version}"
    assert served(api.obj) == result["model_uri"]

    # a version the registry does not hold: refused before anything is patched
    other = FakeCustomObjects(isvc(docs))
    (tmp_path / "registration.json").write_text(json.dumps({**redacted, "version": "99"}))
    with pytest.raises(Exception, match="99"):
        run_deploy(tmp_path, "finetune-champion", NAMESPACE, "", api=other)
    assert other.patches == []
    (tmp_path / "registration.json").write_text(json.dumps(redacted))

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(DeployError, match="^MLFLOW_TRACKING_URI is not set: the deploy step reads the registry's "
                                          "address from the environment"):
        run_deploy(tmp_path, "finetune-champion", NAMESPACE, "s3://finetune-prod/mlflow-artifacts", api=api)
