"""The two request formats a server answers, parsed into a list of texts and bounded; and their responses.

V1 (KServe's): ``{"instances": ["text", ...]}`` (or ``[{"text": "..."}]``) -> ``{"predictions": [{"label",
"probabilities"}]}``. Open inference protocol v2: one BYTES input of texts -> a ``label`` output (BYTES) and a
``probabilities`` output (FP64, ``[n, labels]``, column order in its ``parameters.labels``). A token (NER) model
answers v1 with ``{"entities": [{text, type, start, end, score}], "windows": n}`` per text, and v2 with an
``entities`` output (BYTES ``[n]``: each text's entity list as a JSON string) and a ``windows`` output (INT64 ``[n]``).
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np


class Refusal(Exception):
    """A request the server will not run: HTTP status, a metric reason and one line for the client."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


@dataclass(frozen=True)
class Limits:
    max_texts: int
    max_chars: int

    @property
    def max_body_bytes(self) -> int:
        # a JSON-escaped character takes at most 12 bytes (a surrogate pair written as two \uXXXX)
        return self.max_texts * (12 * self.max_chars + 64) + 65536


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Refusal(400, "malformed_json", f"the request body is not valid JSON: {exc}") from None


def check_texts(texts: Any, where: str, limits: Limits) -> list[str]:
    if not isinstance(texts, list) or not texts:
        raise Refusal(400, "bad_input", f"{where} must be a non-empty list of strings")
    if len(texts) > limits.max_texts:
        raise Refusal(413, "too_many_texts", f"{where} holds {len(texts)} texts; at most {limits.max_texts} per "
                                             f"request (serve.max_texts_per_request)")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise Refusal(400, "bad_input", f"{where}[{i}] is {type(text).__name__}, not a string")
        if len(text) > limits.max_chars:
            raise Refusal(413, "text_too_long", f"{where}[{i}] has {len(text)} characters; at most "
                                                f"{limits.max_chars} (serve.max_chars_per_text)")
    return texts


def v1_texts(payload: Any, limits: Limits) -> list[str]:
    if not isinstance(payload, dict) or "instances" not in payload:
        raise Refusal(400, "bad_input", 'V1 requests are {"instances": ["text", ...]}')
    instances = payload["instances"]
    if isinstance(instances, list):  # [{"text": "..."}] is the same as ["..."]
        instances = [x["text"] if isinstance(x, dict) and set(x) == {"text"} else x for x in instances]
    return check_texts(instances, "instances", limits)


def v1_response(labels: list[str], probs: np.ndarray) -> dict[str, Any]:
    return {"predictions": records(labels, probs)}


def v2_texts(payload: Any, limits: Limits) -> tuple[list[str], str | None]:
    """The texts of a v2 inference request, and its id (echoed in the response)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list) or len(payload["inputs"]) != 1:
        raise Refusal(400, "bad_input", 'v2 requests are {"inputs": [{"name": "text", "datatype": "BYTES", '
                                        '"shape": [n], "data": ["text", ...]}]} (one input)')
    tensor = payload["inputs"][0]
    if not isinstance(tensor, dict) or tensor.get("datatype") != "BYTES":
        raise Refusal(400, "bad_input", "inputs[0] must be a tensor of datatype BYTES")
    texts = check_texts(tensor.get("data"), "inputs[0].data", limits)
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape) or math.prod(shape) != len(texts):
        raise Refusal(400, "bad_input", f"inputs[0].shape {shape!r} does not match its {len(texts)} data items")
    req_id = payload.get("id")
    return texts, req_id if isinstance(req_id, str) else None


def v2_response(name: str, version: str, labels: list[str], probs: np.ndarray, req_id: str | None,
                decided: list[str] | None = None) -> dict:
    """``decided``: the label per text when argmax is not the rule (multi-label: the labels over their
    thresholds, joined by '|')."""
    n = len(probs)
    return {"model_name": name, "model_version": version, "id": req_id or str(uuid.uuid4()),
            "outputs": [{"name": "label", "datatype": "BYTES", "shape": [n],
                         "data": decided if decided is not None else [labels[int(i)] for i in probs.argmax(axis=1)]},
                        {"name": "probabilities", "datatype": "FP64", "shape": [n, len(labels)],
                         "data": [float(p) for p in probs.reshape(-1)], "parameters": {"labels": labels}}]}


V2_ENTITY_OUTPUTS = [{"name": "entities", "datatype": "BYTES", "shape": [-1]},
                     {"name": "windows", "datatype": "INT64", "shape": [-1]}]


def v2_entities_response(name: str, version: str, records: list[dict[str, Any]], req_id: str | None) -> dict:
    """Entities in the v2 protocol: per text, its entity list as one JSON string (v2 has no nested tensors)."""
    n = len(records)
    return {"model_name": name, "model_version": version, "id": req_id or str(uuid.uuid4()),
            "outputs": [{"name": "entities", "datatype": "BYTES", "shape": [n],
                         "data": [json.dumps(r["entities"], ensure_ascii=False) for r in records]},
                        {"name": "windows", "datatype": "INT64", "shape": [n],
                         "data": [int(r["windows"]) for r in records]}]}


def records(labels: list[str], probs: np.ndarray) -> list[dict[str, Any]]:
    return [{"label": labels[int(row.argmax())], "probabilities": {lab: float(p) for lab, p in zip(labels, row)}}
            for row in probs]
