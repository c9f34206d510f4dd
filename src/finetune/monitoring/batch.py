"""Reading a batch to monitor: a CSV, JSONL or Parquet file of texts (labels optional), or a folder of the model
server's request log (``requests-*.jsonl``: records with ``text`` and the served ``label``). Streamed in chunks and
reservoir-sampled down to ``max_rows``, so a batch larger than memory is read with memory bounded by ``max_rows``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from finetune.monitoring.tasks import MonitorInputError

CHUNK = 5000


def _chunks(path: Path) -> Iterator[pd.DataFrame]:
    """The file's rows in chunks of CHUNK, each with a ``_row`` column (1-based row of the file)."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        yield from pd.read_csv(path, chunksize=CHUNK, dtype=object, keep_default_na=False)
    elif suffix in (".jsonl", ".json"):
        yield from pd.read_json(path, lines=True, chunksize=CHUNK, dtype=False)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=CHUNK):
            yield batch.to_pandas()
    else:
        raise MonitorInputError(f"{path}: not a .csv, .jsonl or .parquet file, nor a request-log folder")


def _request_log_chunks(folder: Path) -> Iterator[pd.DataFrame]:
    """Records of the request log's files; ``label`` there is what the model served, not feedback: dropped."""
    files = sorted(folder.glob("requests-*.jsonl"))
    if not files:
        raise MonitorInputError(f"{folder}: no requests-*.jsonl files (the model server's request log) in it")
    for f in files:
        with f.open(encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        if rows and "text" not in rows[0]:
            raise MonitorInputError(f"{f}: its records hold no text (serve.log_text is sha256 or drop); the monitor "
                                    f"needs serve.log_text: keep")
        yield pd.DataFrame({"text": [r.get("text") for r in rows]})


def read_batch(path: str | Path, text_column: str, label_column: str, max_rows: int, seed: int = 0
               ) -> tuple[list[str], list[object] | None, list[int], int]:
    """(texts, labels or None, their 1-based rows, rows read): every row when there are at most ``max_rows``,
    else a uniform sample of ``max_rows`` (reservoir sampling over the stream)."""
    path = Path(path)
    if not path.exists():
        raise MonitorInputError(f"{path}: no such file or folder")
    chunks = _request_log_chunks(path) if path.is_dir() else _chunks(path)
    rng = np.random.default_rng(seed)
    kept: list[tuple[int, object, object]] = []
    seen, has_labels = 0, None
    try:
        for chunk in chunks:
            if text_column not in chunk.columns:
                raise MonitorInputError(f"{path}: no '{text_column}' column (found {list(chunk.columns)[:10]})")
            has_labels = label_column in chunk.columns if has_labels is None else has_labels
            labels = chunk[label_column].tolist() if has_labels else [None] * len(chunk)
            for text, label in zip(chunk[text_column].tolist(), labels):
                seen += 1
                if len(kept) < max_rows:
                    kept.append((seen, text, label))
                elif (j := int(rng.integers(0, seen))) < max_rows:
                    kept[j] = (seen, text, label)
    except (ValueError, OSError) as exc:
        if isinstance(exc, MonitorInputError):
            raise
        raise MonitorInputError(f"{path}: cannot be read as a table: {str(exc).splitlines()[0][:200]}") from None
    if not kept:
        raise MonitorInputError(f"{path}: the batch is empty (no rows to monitor)")
    kept.sort(key=lambda r: r[0])
    _check_texts(path, kept)
    rows = [r[0] for r in kept]
    return [r[1] for r in kept], ([r[2] for r in kept] if has_labels else None), rows, seen


def _check_texts(path: Path, kept: list[tuple[int, object, object]]) -> None:
    for row, text, _ in kept:
        if not isinstance(text, str):
            raise MonitorInputError(f"{path}: row {row}: the text is {type(text).__name__} {str(text)[:40]!r}, "
                                    f"not a string")
        if not text.strip():
            raise MonitorInputError(f"{path}: row {row}: the text is empty")
