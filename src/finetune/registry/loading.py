"""Loading a registered model only after every file was checked against the registry."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import mlflow.artifacts
import mlflow.pyfunc
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.tracking._tracking_service.utils import _use_tracking_uri

from finetune.common.redact import redact_text, redact_uri
from finetune.registry import integrity
from finetune.registry.request import SERVING_SUFFIX, SERVING_TAG, RegistryError


def _name_and_ref(model_uri: str, refusal: str) -> tuple[str, str, bool]:
    """(name, alias or version, whether it is an alias) of ``models:/<name>/<version>`` or
    ``models:/<name>@<alias>``; any other URI is refused with ``refusal``."""
    if not model_uri.startswith("models:/"):
        raise RegistryError(f"{model_uri}: {refusal} (models:/<name>/<version> or models:/<name>@<alias>)")
    name, sep, ref = model_uri[len("models:/"):].partition("@")
    if not sep:
        name, _, ref = name.rpartition("/")
    return name, ref, bool(sep)


def _model_version(client, name: str, ref: str, is_alias: bool):
    """The version a URI names; ``<name>-serving`` (no registered model) names what serves ``<name>``'s version:
    the variant recorded on it by register (record_serving), or the fp32 version itself when none is recorded."""
    if name.endswith(SERVING_SUFFIX) and not client.search_registered_models(f"name = '{name}'"):
        fp32 = _model_version(client, name.removesuffix(SERVING_SUFFIX), ref, is_alias)
        served, _, version = (fp32.tags or {}).get(SERVING_TAG, "").rpartition("/")
        return client.get_model_version(served, version) if served else fp32
    return client.get_model_version_by_alias(name, ref) if is_alias else client.get_model_version(name, ref)


def load_verified(model_uri: str, tracking_uri: str):
    """Load a registered model (``models:/<name>/<version>`` or ``models:/<name>@<alias>``) only after every file
    of a downloaded copy matched the sha256 digests the registry holds for that version; loads that copy."""

    return load_verified_version(model_uri, tracking_uri)[0]


def load_verified_version(model_uri: str, tracking_uri: str, keep: str | None = None, copy_to: str | None = None):
    """(model, name, version) as load_verified loads it; with ``keep`` (a folder inside the logged model, e.g.
    ``artifacts/reference_profile``), that verified folder is also copied to ``copy_to``."""
    name, ref, is_alias = _name_and_ref(model_uri, "only registered models can be verified and loaded")
    try:
        mv = _model_version(MlflowClient(tracking_uri), name, ref, is_alias)
        name = mv.name  # <name>-serving resolves to another registered model's version
        # models:/ URIs resolve against the global tracking URI, whatever tracking_uri= says
        with tempfile.TemporaryDirectory(prefix="finetune-verified-") as tmp, _use_tracking_uri(tracking_uri):
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=tmp)
            integrity.verify(local, integrity.from_tags(mv.tags or {}), f"{name} version {mv.version}")
            if keep is not None:
                if not (Path(local) / keep).is_dir():
                    raise RegistryError(f"{name} version {mv.version} has no {keep} (registered before it was "
                                        f"stored with each version); register the model again")
                shutil.copytree(Path(local) / keep, copy_to, dirs_exist_ok=True)
            return mlflow.pyfunc.load_model(local), name, str(mv.version)
    except integrity.IntegrityError as exc:
        raise RegistryError(str(exc)) from None
    except (MlflowException, OSError) as exc:
        raise RegistryError(redact_text(f"cannot load {model_uri} from {redact_uri(tracking_uri)}: {exc}")) from None


def version_download_uri(tracking_uri: str, model_name: str, version: str) -> str:
    """Where the artifact store holds a registered version's model files (``mlflow-artifacts:/...`` when the
    server proxies artifacts)."""
    return MlflowClient(tracking_uri).get_model_version_download_uri(model_name, version)


def pinned_version(model_uri: str, tracking_uri: str) -> tuple[str, str]:
    """(name, version) that ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` points at now: a server
    loads ``models:/<name>/<version>`` and reports that version, even if the alias moves meanwhile."""
    name, ref, is_alias = _name_and_ref(model_uri, "not a registered model URI")
    try:
        mv = _model_version(MlflowClient(tracking_uri), name, ref, is_alias)
    except MlflowException as exc:
        raise RegistryError(redact_text(f"cannot resolve {model_uri} in {redact_uri(tracking_uri)}: "
                                        f"{exc.message}")) from None
    return mv.name, str(mv.version)


def load_local(folder: str):
    """Load an MLflow model folder (its MLmodel file) that no registry vouches for: only the pyfunc's own weight
    check applies. Raises RegistryError when it cannot be loaded."""
    try:
        return mlflow.pyfunc.load_model(folder)
    except (MlflowException, OSError) as exc:
        raise RegistryError(f"cannot load the model folder {folder}: {exc}") from None
