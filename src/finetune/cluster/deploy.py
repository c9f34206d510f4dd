"""deploy: point the KServe InferenceService at the newly promoted champion, and only then.

The register stage decides promotion (registration.json ``promoted``); this module turns that decision into
one merge patch of ``spec.predictor.model.storageUri`` (the S3 folder MLflow stored the version's model in).
A registration that did not promote changes nothing. The Kubernetes client is passed in (CustomObjectsApi in
the cluster, a fake in unit tests), so the logic has no cluster dependency.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from finetune.common.files import read_json
from finetune.registry.loading import version_download_uri

log = logging.getLogger("finetune")


GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"


VERSION_ANNOTATION = "finetune/model-version"


class CustomObjects(Protocol):  # the part of kubernetes.client.CustomObjectsApi used here
    def get_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str,
                                     name: str) -> dict[str, Any]: ...

    def patch_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, name: str,
                                       body: dict[str, Any]) -> dict[str, Any]: ...


class DeployError(RuntimeError):
    pass


@dataclass
class Deployment:
    changed: bool
    message: str
    storage_uri: str | None = None


def storage_patch(storage_uri: str, model_name: str, version: str) -> dict[str, Any]:
    """Merge patch: the new model folder, and which registry version it is (visible with kubectl get -o yaml)."""
    return {"metadata": {"annotations": {VERSION_ANNOTATION: f"{model_name}/{version}"}},
            "spec": {"predictor": {"model": {"storageUri": storage_uri}}}}


def deploy_champion(registration: dict[str, Any], storage_uri: str | None, api: CustomObjects, name: str,
                    namespace: str) -> Deployment:
    """Patch InferenceService ``name`` to serve ``storage_uri`` when ``registration`` promoted a champion."""
    model, version = registration.get("model_name"), registration.get("version")
    if not registration.get("promoted"):
        return Deployment(False, f"{model} version {version} was not promoted ({registration.get('alias')}): "
                                 f"InferenceService {namespace}/{name} left as it is")
    if not storage_uri or not storage_uri.startswith(("s3://", "gs://", "pvc://", "https://")):
        raise DeployError(f"{model} version {version}: storage URI {storage_uri!r} is not one KServe can fetch "
                          f"(s3://, gs://, pvc://, https://)")
    current = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    if current.get("spec", {}).get("predictor", {}).get("model", {}).get("storageUri") == storage_uri:
        return Deployment(False, f"InferenceService {namespace}/{name} already serves {storage_uri}", storage_uri)
    api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                       storage_patch(storage_uri, str(model), str(version)))
    return Deployment(True, f"InferenceService {namespace}/{name} now serves {model} version {version} "
                            f"from {storage_uri}", storage_uri)


def version_storage_uri(tracking_uri: str, model_name: str, version: str, artifacts_destination: str) -> str:
    """Where the artifact store holds the registered version's model files, as a URI KServe can fetch.

    A server that proxies artifacts (``mlflow server --artifacts-destination``) answers ``mlflow-artifacts:/<path>``;
    the files are then at ``<artifacts_destination>/<path>``."""

    return resolve_proxied(version_download_uri(tracking_uri, model_name, version), artifacts_destination)


def resolve_proxied(uri: str, artifacts_destination: str) -> str:
    if not uri.startswith("mlflow-artifacts:"):
        return uri
    path = uri.removeprefix("mlflow-artifacts:").lstrip("/")
    if "://" in uri:  # mlflow-artifacts://host:port/path: drop the server part
        path = path.split("/", 1)[1] if "/" in path else ""
    return f"{artifacts_destination.rstrip('/')}/{path}"


def run_deploy(registration: str | Path, name: str, namespace: str, artifacts_destination: str,
               api: Any = None) -> dict[str, Any]:
    """Point InferenceService ``namespace/name`` at the version ``registration`` (registration.json) promoted.
    ``api``: a kubernetes CustomObjectsApi; by default the in-cluster one (the pod's service account). The
    registry's address comes from MLFLOW_TRACKING_URI, never from registration.json (whose copy is redacted)."""

    reg = read_json(Path(registration) / "registration.json" if Path(registration).is_dir() else registration)
    uri = None
    if reg.get("promoted"):
        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not tracking_uri:
            raise DeployError("MLFLOW_TRACKING_URI is not set: the deploy step reads the registry's address from the "
                              "environment (the finetune-mlflow secret), not from registration.json (redacted)")
        uri = version_storage_uri(tracking_uri, reg["model_name"], reg["version"], artifacts_destination)
    if api is None and reg.get("promoted"):
        from kubernetes import client, config

        config.load_incluster_config()
        api = client.CustomObjectsApi()
    result = deploy_champion(reg, uri, api, name, namespace)
    log.info("deploy: %s", result.message)
    return {"changed": result.changed, "message": result.message, "storage_uri": result.storage_uri}
