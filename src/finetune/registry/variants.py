"""The variants: each a registered model of its own whose champion follows the fp32 one. ``<name>-int8`` holds
the teacher's int8 ONNX file (registered whenever compress passed it); ``<name>-student`` (or ``<name>-onnx``) the
variant compress chose to serve when it is a student's (or the teacher's fp32) ONNX file. Which of them serves a
version is recorded on the fp32 version (``record_serving``) and resolved by ``models:/<name>-serving@<alias>``
(registry/loading.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient

from finetune.common.outputs import MARKER, METRICS, ONNX_INT8
from finetune.common.redact import redact_uri
from finetune.common.tokens import load_tokenizer
from finetune.registry import aliases, integrity
from finetune.registry.binding import BindingError, check_compress_files
from finetune.registry.hygiene import HEARTBEAT_TAG, STAGE_TAG, heartbeat, remove_artifacts
from finetune.registry.lease import alias_lock
from finetune.registry.request import (
    CHALLENGER,
    CHAMPION,
    INT8_SUFFIX,
    ONNX_PYFUNC_CODE,
    ONNX_SUFFIX,
    SERVING_TAG,
    STUDENT_SUFFIX,
    Registration,
    RegistrationRequest,
    RegistryError,
    RegistryUnavailable,
    pyfunc_code_paths,
)
from finetune.registry.store import delete_version, stored_digests, with_retries


@dataclass(frozen=True)
class VariantRequest:
    """The ONNX variant ``variant`` (compress's name; its file ``onnx_file``) of the fp32 version ``parent`` (a
    Registration of ``fp32``): ``folder`` is the compress stage's output, ``metrics`` its metrics.json."""
    fp32: RegistrationRequest
    parent: Registration
    folder: Path
    metrics: dict[str, Any]
    variant: str = "onnx_int8"
    onnx_file: str = ONNX_INT8

    @property
    def suffix(self) -> str:
        return variant_suffix(self.variant)

    @property
    def model_name(self) -> str:
        return self.fp32.cfg.model_name + self.suffix


def variant_suffix(variant: str) -> str:
    """The registered model a compress variant goes to: the teacher's int8 and fp32 ONNX files, or a student."""
    return {"onnx_int8": INT8_SUFFIX, "onnx_fp32": ONNX_SUFFIX}.get(variant, STUDENT_SUFFIX)


def register_variant(vreq: VariantRequest) -> dict[str, Any]:
    """Register the int8 variant as a version of ``<model_name>-int8`` whose alias follows its fp32 parent:
    ``champion`` when the parent was promoted in this registration, else ``challenger``. Same retries, digest
    tags and all-or-nothing rule as the fp32 registration; idempotent per fp32 version."""
    return with_retries(vreq.fp32.cfg, vreq.fp32.tracking_uri, lambda: _register_variant_once(vreq))


def _register_variant_once(vreq: VariantRequest) -> dict[str, Any]:

    req, parent, name = vreq.fp32, vreq.parent, vreq.model_name
    try:
        client = MlflowClient(req.tracking_uri)  # opens (and may find locked) an embedded store
        done = None
        for mv in client.search_model_versions(f"name = '{name}'"):
            tags = mv.tags or {}
            if tags.get("fp32_model") == f"{parent.model_name}/{parent.version}":
                if tags.get("complete") == "true":
                    done = done or str(mv.version)
                else:
                    client.delete_model_version(name, mv.version)
        exp_id = client.get_run(parent.run_id).info.experiment_id
    except Exception as exc:
        raise RegistryUnavailable(f"MLflow tracking server {redact_uri(req.tracking_uri)} is unreachable or "
                                  f"refused: {exc}") from exc
    version, run_id = done, None
    if version is None:
        version, run_id = _log_variant(client, vreq, exp_id)
    try:
        client.set_model_version_tag(parent.model_name, parent.version, f"{vreq.suffix[1:]}_version",
                                     f"{name}/{version}")
        # the alias is derived from the fp32 aliases as they are now, under the same lease as the fp32 move
        with alias_lock(client, parent.model_name, parent.run_id) as lease:
            aliases.sync_variant_aliases(client, parent.model_name, lease)
        mv = client.get_model_version(name, version)
    except RegistryError:
        raise
    except Exception as exc:
        raise RegistryUnavailable(f"moving the alias of {name} v{version} failed: {exc}") from exc
    alias = next((a for a in (CHAMPION, CHALLENGER) if a in (mv.aliases or [])), None)
    follows = (f"alias follows fp32 v{parent.version} (@{alias})" if alias else
               f"no alias: fp32 v{parent.version} holds neither @{CHAMPION} nor @{CHALLENGER} now")
    why = (vreq.metrics.get("message", "int8 variant passed") if vreq.variant == "onnx_int8"
           else (vreq.metrics.get("serving") or {}).get("reason", f"{vreq.variant} chosen to serve"))
    return {"registered": True, "model_name": name, "version": version, "alias": alias, "variant": vreq.variant,
            "run_id": run_id or mv.run_id, "model_uri": f"models:/{name}/{version}", "reason": f"{why}; {follows}"}


def _variant_files(folder: Path, dst: Path, onnx_file: str = ONNX_INT8) -> Path:
    """Only what serving the variant needs: its one ONNX file, tokenizer and config (no other ONNX file)."""

    dst.mkdir()
    for f in folder.iterdir():
        if f.is_file() and f.name not in (METRICS, MARKER) and (f.suffix != ".onnx" or f.name == onnx_file):
            shutil.copy2(f, dst / f.name)
    return dst


def _log_variant(client, vreq: VariantRequest, exp_id: str) -> tuple[str, str]:
    """One run + one complete version of the int8 model, or nothing (as _log_and_register)."""


    req, parent, name = vreq.fp32, vreq.parent, vreq.model_name
    version, run_id = None, None
    try:
        with tempfile.TemporaryDirectory(prefix=f"finetune{vreq.suffix}-") as tmp:
            files = _variant_files(Path(vreq.folder), Path(tmp) / "onnx", vreq.onnx_file)
            # what is logged is exactly what compress measured (checked on the copy, before any run starts)
            check_compress_files(files, vreq.metrics, only=tuple(sorted(p.name for p in files.iterdir())))
            with mlflow.start_run(experiment_id=exp_id, tags={STAGE_TAG: f"register{vreq.suffix}",
                                                              HEARTBEAT_TAG: str(time.time())}
                                  ) as run, heartbeat(req.tracking_uri, run.info.run_id):
                run_id = run.info.run_id
                variant = (vreq.metrics.get("variants") or {}).get(vreq.variant, {})
                mlflow.log_metrics({k: float(v) for k, v in variant.items() if isinstance(v, (int, float))})
                mlflow.log_artifact(str(Path(vreq.folder) / "metrics.json"), "compress")
                mlflow.set_tags({"fp32_model": f"{parent.model_name}/{parent.version}", "fp32_run_id": parent.run_id})
                model_config = pyfunc_model_config(files, vreq.onnx_file, req.max_length)
                model_config["files_sha256"] = integrity.folder_digests(files)  # the pyfunc checks them at load
                info = mlflow.pyfunc.log_model(
                    name="model", python_model=str(ONNX_PYFUNC_CODE), artifacts={"model": str(files)},
                    model_config=model_config, code_paths=pyfunc_code_paths(),
                    input_example=(["An example review."], {"probabilities": False}),
                    pip_requirements=pyfunc_requirements())
                tags = {"fp32_model": f"{parent.model_name}/{parent.version}", "fp32_run_id": parent.run_id,
                        "run_id": run_id, "task": req.kind.task, "labels": json.dumps(list(req.kind.labels)),
                        "onnx_sha256": model_config["onnx_sha256"], "test_data_hash": req.test_hash or ""}
                tags.update({k: str(variant[k]) for k in ("accuracy", "macro_f1", "accuracy_delta", "made_by")
                             if k in variant})
                tags["variant"] = vreq.variant  # lineage: compress's name for it, and how it was made (made_by)
                version = str(mlflow.register_model(info.model_uri, name, tags=tags).version)
                digests = stored_digests(f"models:/{name}/{version}", req.tracking_uri, files)
                for key, digest in integrity.as_tags(digests).items():
                    client.set_model_version_tag(name, version, key, digest)
                client.set_model_version_tag(name, version, "complete", "true")
                return version, run_id
    except BindingError:
        raise  # a file that is not the one compress measured: nothing was logged, and a retry cannot help
    except Exception as exc:
        if version is not None:
            delete_version(client, name, version)
        if run_id is not None:
            remove_artifacts(client, run_id, exp_id)
        raise RegistryUnavailable(f"registering {name} failed: {type(exc).__name__}: {exc}") from exc


def pyfunc_model_config(folder: str | Path, onnx_file: str = ONNX_INT8, max_length: int = 512) -> dict[str, Any]:
    """model_config for onnx_pyfunc_model.OnnxTextClassifier over a compress output folder."""
    tok = load_tokenizer(folder)
    return {"onnx_file": onnx_file, "onnx_sha256": _file_sha256(Path(folder) / onnx_file), "max_length": max_length,
            "pad_token": tok.pad_token, "pad_token_id": int(tok.pad_token_id or 0)}


def pyfunc_requirements() -> list[str]:
    """What serving the ONNX pyfunc needs (explicit: MLflow's inference imports around, which fails offline)."""
    return [f"{name}=={metadata.version(name)}" for name in ("mlflow", "onnxruntime", "tokenizers", "numpy")]


def _file_sha256(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def record_serving(req: RegistrationRequest, parent: Registration, served: str, variant: str, reason: str) -> None:
    """Tag the fp32 version with what serves it (``served``: ``<model>/<version>``), compress's variant name and
    why: ``models:/<name>-serving@<alias>`` resolves through this tag (registry/loading.py)."""
    def tag() -> None:
        try:
            client = MlflowClient(req.tracking_uri)
            for key, value in ((SERVING_TAG, served), ("serving_variant", variant), ("serving_reason", reason[:4000])):
                client.set_model_version_tag(parent.model_name, parent.version, key, value)
        except Exception as exc:
            raise RegistryUnavailable(f"tagging {parent.model_name} v{parent.version} with its serving variant "
                                      f"failed: {exc}") from exc
    with_retries(req.cfg, req.tracking_uri, tag)
