"""The monitor on Kubernetes, checked offline: k8s/overlays/prod-monitoring renders, its core objects (the CronJob,
the request volume) validate strictly, the InferenceService against its CRD schema and the core pod schema, and the
server writes its request log exactly where the CronJob's monitor reads it."""

from __future__ import annotations

import pytest
import yaml

from conftest import K8S_VERSION, MARKERS, NAMESPACE, kubernetes_validate
from stack import render


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return render("prod-monitoring", MARKERS)


def one(docs, kind: str) -> dict:
    (obj,) = [d for d in docs if d["kind"] == kind]
    return obj


def test_core_objects_validate_strictly_and_the_isvc_matches_its_schemas(docs, tmp_path):
    import kubernetes_validate as kv
    from test_k8s_serving import pod_template, validator

    core = [d for d in docs if not d["apiVersion"].startswith("serving.kserve.io")]
    path = tmp_path / "core.yaml"
    path.write_text(yaml.safe_dump_all(core))
    proc = kubernetes_validate(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    isvc = one(docs, "InferenceService")
    validator().validate(isvc)
    kv.validate(pod_template(isvc["spec"]["predictor"]), K8S_VERSION, strict=True)
    assert {d["metadata"]["namespace"] for d in docs if d["kind"] != "Namespace"} == {NAMESPACE}


def test_the_server_logs_requests_where_the_cronjob_monitors_them(docs):
    isvc, cron, pvc = one(docs, "InferenceService"), one(docs, "CronJob"), one(docs, "PersistentVolumeClaim")
    predictor = isvc["spec"]["predictor"]
    args = predictor["containers"][0]["args"]
    sets = {args[i + 1] for i, a in enumerate(args) if a == "--set"}
    assert {"serve.log_text=keep", "serve.log_folder=/requests"} <= sets  # the monitor needs the texts
    assert any(s.startswith("serve.log_sample_rate=") and float(s.split("=")[1]) > 0 for s in sets)
    claim = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in predictor["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in predictor["containers"][0]["volumeMounts"]}
    assert claim[mounts["/requests"]] == pvc["metadata"]["name"] and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["finetune", "monitor"]
    folder = container["args"][container["args"].index("--input") + 1]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == folder)
    cron_claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    assert cron_claims[mount["name"]] == pvc["metadata"]["name"] and mount["readOnly"] is True
    assert cron["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 0  # exit 3 (drift) is a verdict, not retried
    assert pvc["spec"]["storageClassName"] == "standard-rwx"
