"""deploy: point the KServe InferenceService at the newly promoted champion, and only then.

The register stage decides promotion (registration.json ``promoted``); this module turns that decision into
one merge patch of the custom predictor's container: its ``--model`` argument becomes the pinned registry URI
(``models:/<name>/<version>``) of what serves the new champion (the variant compress chose: registration.json
``serving``; the fp32 version when none), which ``finetune serve`` verifies against the registry's digests
before it answers. A registration that did not promote changes nothing. The Kubernetes client is passed in
(CustomObjectsApi in the cluster, a fake in unit tests), so the logic has no cluster dependency.
"""

from __future__ import annotations

import copy
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
    model_uri: str | None = None


def model_uri(model_name: str, version: str) -> str:
    """The pinned registry URI: an alias would move under the running pods; a version does not."""
    return f"models:/{model_name}/{version}"


def predictor_container(obj: dict[str, Any]) -> dict[str, Any]:
    containers = obj.get("spec", {}).get("predictor", {}).get("containers") or []
    if not containers or "--model" not in containers[0].get("args", []):
        raise DeployError(f"InferenceService {obj.get('metadata', {}).get('name')}: its predictor has no container "
                          f"with a --model argument (k8s/components/serving runs `finetune serve --model ...`)")
    return containers[0]


def serving_patch(current: dict[str, Any], uri: str, model_name: str, version: str) -> dict[str, Any]:
    """Merge patch: the predictor's containers with --model set to ``uri``, and which registry version it is
    (visible with kubectl get -o yaml). A merge patch replaces lists whole, so every container is sent."""
    containers = copy.deepcopy(current["spec"]["predictor"]["containers"])
    args = containers[0]["args"]
    args[args.index("--model") + 1] = uri
    return {"metadata": {"annotations": {VERSION_ANNOTATION: f"{model_name}/{version}"}},
            "spec": {"predictor": {"containers": containers}}}


def served_uri(obj: dict[str, Any]) -> str | None:
    args = predictor_container(obj)["args"]
    i = args.index("--model")
    return args[i + 1] if i + 1 < len(args) else None


def served_version(registration: dict[str, Any]) -> tuple[Any, Any]:
    """(model, version) that serves the registered version: the variant compress chose and register recorded
    (registration.json ``serving``: a student, the int8 variant), else the fp32 version itself."""
    serving = registration.get("serving") or {}
    if serving.get("recorded") and serving.get("model_name") and serving.get("version"):
        return serving["model_name"], serving["version"]
    return registration.get("model_name"), registration.get("version")


def deploy_champion(registration: dict[str, Any], api: CustomObjects, name: str, namespace: str) -> Deployment:
    """Patch InferenceService ``name`` to serve the version ``registration`` promoted, when it promoted one: the
    pinned URI of its serving variant (``served_version``)."""
    model, version = served_version(registration)
    if not registration.get("promoted"):
        return Deployment(False, f"{model} version {version} was not promoted ({registration.get('alias')}): "
                                 f"InferenceService {namespace}/{name} left as it is")
    if not model or not str(version or "").isdigit():
        raise DeployError(f"registration.json: model_name {model!r} / version {version!r} do not name a registry "
                          f"version (models:/<name>/<number>)")
    uri = model_uri(str(model), str(version))
    current = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    if served_uri(current) == uri:
        return Deployment(False, f"InferenceService {namespace}/{name} already serves {uri}", uri)
    api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                       serving_patch(current, uri, str(model), str(version)))
    return Deployment(True, f"InferenceService {namespace}/{name} now serves {model} version {version} ({uri})", uri)


def run_deploy(registration: str | Path, name: str, namespace: str, artifacts_destination: str = "",
               api: Any = None) -> dict[str, Any]:
    """Point InferenceService ``namespace/name`` at the version ``registration`` (registration.json) promoted.
    ``api``: a kubernetes CustomObjectsApi; by default the in-cluster one (the pod's service account). The
    version is looked up first (a typo or a deleted version fails here, not in the serving pods); the registry's
    address comes from MLFLOW_TRACKING_URI, never from registration.json (whose copy is redacted).
    ``artifacts_destination`` is unused since the server loads from the registry; kept for the compiled pipeline."""

    reg = read_json(Path(registration) / "registration.json" if Path(registration).is_dir() else registration)
    if reg.get("promoted"):
        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not tracking_uri:
            raise DeployError("MLFLOW_TRACKING_URI is not set: the deploy step reads the registry's address from the "
                              "environment (the finetune-mlflow secret), not from registration.json (redacted)")
        version_download_uri(tracking_uri, *map(str, served_version(reg)))  # raises if it is not there
        if api is None:
            from kubernetes import client, config

            config.load_incluster_config()
            api = client.CustomObjectsApi()
    result = deploy_champion(reg, api, name, namespace)
    log.info("deploy: %s", result.message)
    return {"changed": result.changed, "message": result.message, "model_uri": result.model_uri}
