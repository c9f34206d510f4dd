"""predict: label texts with a registered model (``models:/<name>@champion``, ``models:/<name>/<version>``).

One record per text: ``{"text", "label", "probabilities": {label: p}}``. The model is the registry's pyfunc
(src/finetune/registry/pyfunc_model.py), asked for probabilities through ``params={"probabilities": True}``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import IO, Any, Iterable

from finetune.common import tracking
from finetune.common.config import Config
from finetune.common.files import FORMATS, read_table, split_lines
from finetune.registry.loading import load_verified

log = logging.getLogger("finetune")


class PredictInputError(ValueError):
    """An input file that cannot be read as texts."""


def read_texts(path: str | Path, stream: IO[str] | None = None, text_column: str = "text") -> list[str]:
    """Texts from a table's ``text_column`` (.jsonl, .csv, .tsv, .parquet, optionally compressed: read as the
    validate stage reads data, with the same precise errors), or from any other file, one text per line (blank
    lines skipped). ``stream`` replaces the file and is read line by line (``--input -`` reads stdin).
    Raises PredictInputError when there is no text at all."""

    p = Path(path)
    if stream is None and any(s.lower() in FORMATS for s in p.suffixes):
        frame = read_table(p)
        if text_column not in frame.columns:
            raise PredictInputError(f"{p}: no \"{text_column}\" column (found {', '.join(map(str, frame.columns))}); "
                                    f"name the text column with --text-column")
        bad = [int(i) for i, v in frame[text_column].items() if not isinstance(v, str)]
        if bad:
            raise PredictInputError(f"{p}: \"{text_column}\" is missing or not a string in row(s) {bad[:5]}")
        return frame[text_column].tolist()
    # bytes, not read_text: no newline translation; split_lines ends a text at '\n' only ('\x85' is inside one)
    text = stream.read() if stream is not None else p.read_bytes().decode("utf-8-sig")
    texts = [line for line in split_lines(text) if line.strip()]
    if not texts:
        raise PredictInputError(f"{'stdin' if stream is not None else p}: no texts to label (the input is empty "
                                f"or blank)")
    return texts


def predict(model, texts: list[str], batch_size: int = 256) -> list[dict[str, Any]]:
    """Label ``texts`` with a loaded pyfunc model, in batches. Versions registered before the model could return
    probabilities give only the label (``probabilities`` is then None)."""
    records: list[dict[str, Any]] = []
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start:start + batch_size])
        out = model.predict(batch, params={"probabilities": True})
        for text, item in zip(batch, out):
            if isinstance(item, dict):
                records.append({"text": text, "label": item["label"], "probabilities": item["probabilities"]})
            else:  # an older version: MLflow dropped the params it has no schema for
                records.append({"text": text, "label": str(item), "probabilities": None})
    if records and records[0]["probabilities"] is None:
        log.warning("this model version returns labels only (registered before probabilities were supported)")
    return records


def write_jsonl(records: Iterable[dict[str, Any]], fh: IO[str]) -> int:
    n = 0
    for rec in records:
        fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        n += 1
    return n


def run_predict(cfg: Config, texts: list[str], input_path: str | None, text_column: str | None, model: str | None,
                output: str | None, batch_size: int) -> int:
    """`finetune predict`: label TEXT arguments or the texts of ``input_path`` ('-' = stdin) with a registered
    model (default: the champion), as JSON lines to ``output`` or stdout; returns how many were written."""
    if bool(texts) == bool(input_path):
        raise PredictInputError("give either TEXT arguments or --input FILE")
    texts = texts or read_texts(input_path, sys.stdin if input_path == "-" else None,
                                text_column or cfg.data.text_column)
    uri = model or f"models:/{cfg.register.model_name}@champion"
    store, _ = tracking.configure(".")
    tracking.require_reachable(store)  # fail fast when the server is down, not after MLflow's retries
    loaded = load_verified(uri, store)  # every file checked against the registry's digests before loading
    records = predict(loaded, texts, batch_size)
    if not output:
        return write_jsonl(records, sys.stdout)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", encoding="utf-8") as fh:
        n = write_jsonl(records, fh)
    log.info("wrote %d predictions to %s", len(records), output)
    return n
