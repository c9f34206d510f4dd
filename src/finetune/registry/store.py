"""Small MLflow operations the registry's modules share: retries, the current champion, deleting a
version, the digests stored with a version."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import mlflow.artifacts
from mlflow.exceptions import MlflowException
from mlflow.tracking._tracking_service.utils import _use_tracking_uri

from finetune.common.config import RegisterConfig
from finetune.common.redact import redact_text
from finetune.registry import integrity
from finetune.registry.request import CHAMPION, RegistryError, RegistryUnavailable

log = logging.getLogger(__name__)


def with_retries(cfg: RegisterConfig, tracking_uri: str, attempt_once: Callable[[], Any]) -> Any:
    """``attempt_once`` retried on RegistryUnavailable with exponential backoff, then reported."""

    delay = cfg.retry_backoff
    with _use_tracking_uri(tracking_uri):  # restore the caller's tracking URI afterwards: no global side effect
        for attempt in range(cfg.retries + 1):
            try:
                return attempt_once()
            except RegistryUnavailable as exc:
                if attempt == cfg.retries:
                    raise RegistryError(redact_text(f"giving up after {cfg.retries + 1} attempt(s): {exc}")) from None
                log.warning("registry attempt %d failed (%s); retrying in %.1fs", attempt + 1, redact_text(str(exc)),
                            delay)
                time.sleep(delay)
                delay *= 2
    raise AssertionError("unreachable")


def current_champion(client, name: str):
    return current_alias(client, name, CHAMPION)


def current_alias(client, name: str, alias: str):
    """The version of ``name`` holding ``alias``, or None (no such alias, or no such model)."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def stored_digests(model_uri: str, tracking_uri: str, model_dir: str | Path) -> dict[str, str]:
    """sha256 of every file of the logged model, read back from the artifact store, whose copy of the model
    folder must equal the local one (so the digests describe what was trained, not what reached the store)."""

    with tempfile.TemporaryDirectory(prefix="finetune-logged-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp, tracking_uri=tracking_uri)
        digests = integrity.folder_digests(local)
    prefix = f"artifacts/{Path(model_dir).resolve().name}/"  # MLflow copies the folder under its own name
    stored = {k[len(prefix):]: v for k, v in digests.items() if k.startswith(prefix)}
    if stored != integrity.folder_digests(model_dir):
        raise RegistryUnavailable(f"the model files in the artifact store differ from {model_dir} after upload")
    return digests


def delete_version(client, name: str, version: str) -> None:
    try:
        client.delete_model_version(name, version)
    except Exception:  # registry gone mid-way: the next attempt's _existing() removes it
        log.warning("could not delete unfinished version %s of %s", version, name)
