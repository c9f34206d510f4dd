"""The model a server answers with: loaded (verified against the registry first), warmed up, and called on a
list of texts for one probability row per text.

A registered model (``models:/<name>@<alias>`` or ``models:/<name>/<version>``) is pinned to one version
before it loads, so the version a response names is the one that answered. A local folder is an MLflow model
folder (its ``MLmodel`` file): nothing in the registry vouches for it, only the pyfunc's own weight check.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finetune.registry.loading import load_local, load_verified, pinned_version
from finetune.serving import protocol

log = logging.getLogger("finetune")

WARMUP_TEXT = "warm-up request"
# texts per model call within a batch, after sorting the batch by length: each call pads to its own longest text
# instead of the batch's (single reviews in one batch differ 2x in length and more)
SORTED_CHUNK = 8


class ServeError(RuntimeError):
    """The server cannot start or serve this model: one line for the user."""


@dataclass
class ServedModel:
    name: str  # the name in the protocol routes: /v1/models/<name>:predict
    version: str  # "3" for a registered version, "local" for a folder
    variant: str  # "fp32" (PyTorch) or "int8" (ONNX Runtime)
    labels: list[str]
    impl: Any  # the pyfunc's python model: predict_proba(texts) -> (n, labels) array

    @property
    def version_tag(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def multi_label(self) -> bool:
        return bool(getattr(self.impl, "multi_label", False))

    def predict_batch(self, texts: list[str]) -> np.ndarray | list[dict[str, Any]]:
        """What the batcher slices per request, in the order given: one probability row per text."""
        return self.predict_proba(texts)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """One row per text, in the order given: the model is called on length-sorted chunks (less padding)."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        chunks = [self.impl.predict_proba([texts[i] for i in order[start:start + SORTED_CHUNK]])
                  for start in range(0, len(order), SORTED_CHUNK)]
        probs = np.empty((len(texts), len(self.labels)), dtype=np.float64)
        probs[order] = np.concatenate(chunks)
        if self.multi_label:  # one sigmoid per label: rows do not sum to 1
            return probs
        return probs / probs.sum(axis=1, keepdims=True)  # float32 softmax rows: exactly 1 in float64 again

    def records(self, out: np.ndarray | list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One answer per text: the model's own decision rule (multi-label: its stored per-label thresholds,
        ``labels`` a list) with every label's probability."""
        if self.multi_label:
            return self.impl._decide(out, True)
        return protocol.records(self.labels, out)

    def predicted_labels(self, records: list[dict[str, Any]]) -> list[str]:
        """The labels the answers name, for the per-label counter."""
        return [lab for r in records for lab in r.get("labels", [r.get("label")])]

    def v2_response(self, out: np.ndarray | list[dict[str, Any]], req_id: str | None) -> dict[str, Any]:
        decided = ["|".join(r["labels"]) for r in self.records(out)] if self.multi_label else None
        return protocol.v2_response(self.name, self.version, self.labels, out, req_id, decided)

    def v2_outputs(self) -> list[dict[str, Any]]:
        """The outputs the v2 metadata route lists."""
        return [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP64", "shape": [-1, len(self.labels)]}]

    def warm_up(self) -> None:
        """One inference before the server says it is ready: first-call costs (allocations, ONNX Runtime's
        graph setup) land here, and a model that loads but cannot predict never becomes ready."""
        probs = self.predict_proba([WARMUP_TEXT])
        if probs.shape != (1, len(self.labels)) or not np.isfinite(probs).all():
            raise ServeError(f"{self.version_tag}: the warm-up inference returned {probs.shape} values, "
                             f"expected one finite row of {len(self.labels)} probabilities")


class EntityServedModel(ServedModel):
    """A token-classification (NER) model: it answers entity records per text, not a probability row."""

    def predict_batch(self, texts: list[str]) -> list[dict[str, Any]]:
        return self.impl.predict_records(texts)

    def records(self, out: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(out)

    def predicted_labels(self, records: list[dict[str, Any]]) -> list[str]:
        return [e["type"] for r in records for e in r["entities"]]

    def v2_response(self, out: list[dict[str, Any]], req_id: str | None) -> dict[str, Any]:
        return protocol.v2_entities_response(self.name, self.version, list(out), req_id)

    def v2_outputs(self) -> list[dict[str, Any]]:
        return protocol.V2_ENTITY_OUTPUTS

    def warm_up(self) -> None:
        out = self.impl.predict_records([WARMUP_TEXT])
        if len(out) != 1 or not isinstance(out[0].get("entities"), list):
            raise ServeError(f"{self.version_tag}: the warm-up inference returned {out!r:.200}, expected one "
                             f"record with an entities list")


def init_torch_threads(threads: int) -> None:
    """Set PyTorch's intra-op threads per model call (serve.torch_threads; 0 keeps PyTorch's default, one per
    core) and start its pool from the main thread, if PyTorch is installed. Measured: when torch is first run in
    a background thread (the server loads the model in one, so that it can answer readiness meanwhile), later
    inferences in the model thread took 5-8x longer on 2 busy cores (MiniLM-L6, one text: ~150 ms instead of
    ~20 ms). One small op here keeps them at the main-thread speed."""
    if importlib.util.find_spec("torch") is None:  # an int8-only image: ONNX Runtime needs none of this
        return
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    torch.ones(256, 256) @ torch.ones(256, 256)


def load_served(spec: str, tracking_uri: str | None) -> ServedModel:
    """``spec``: ``models:/...`` (checked against the registry's digests before loading) or a local MLflow
    model folder. Raises RegistryError (tampered, missing) or ServeError."""
    if spec.startswith("models:/"):
        if not tracking_uri:
            raise ServeError(f"{spec}: a registered model needs a tracking URI")
        name, version = pinned_version(spec, tracking_uri)
        pyfunc = load_verified(f"models:/{name}/{version}", tracking_uri)
    else:
        folder = Path(spec)
        if not (folder / "MLmodel").is_file():
            raise ServeError(f"{folder}: not an MLflow model folder (no MLmodel file); give models:/<name>@champion "
                             f"or a folder downloaded from the registry")
        log.warning("%s: a local folder is not checked against the registry's digests", folder)
        name, version = folder.resolve().name, "local"
        pyfunc = load_local(str(folder))
    return _wrap(pyfunc, name, version)


def _wrap(pyfunc, name: str, version: str) -> ServedModel:
    impl = pyfunc.unwrap_python_model()
    if not hasattr(impl, "predict_proba") or not getattr(impl, "labels", None):
        raise ServeError(f"{name} version {version}: not a finetune text classifier (its pyfunc has no "
                         f"predict_proba/labels); registered before probabilities were supported?")
    # ONNX pyfuncs: run_logits (row_parallel.py); versions registered before it hold a bare session
    variant = "int8" if hasattr(impl, "run_logits") or hasattr(impl, "session") else "fp32"
    kind = EntityServedModel if getattr(impl, "token_level", False) else ServedModel
    return kind(name=name, version=version, variant=variant, labels=list(impl.labels), impl=impl)
