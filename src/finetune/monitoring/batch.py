"""Reading a batch to monitor: a CSV, JSONL or Parquet file of texts (labels optional), or a folder of the model
server's request log (``requests-*.jsonl``: records with ``ts``, ``text`` and the served ``label`` and
``probabilities``; optionally only the records since a time). Streamed in chunks and reservoir-sampled down to
``max_rows``, so a batch larger than memory is read with memory bounded by ``max_rows``. A request log written
without texts (``serve.log_text: sha256`` or ``drop``) is read as its logged predictions only."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from finetune.common.files import DataError
from finetune.common.token_files import TOKEN_COLUMNS, is_conll, read_tagged
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


def _log_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("requests-*.jsonl"))
    if not files:
        raise MonitorInputError(f"{folder}: no requests-*.jsonl files (the model server's request log) in it")
    return files


def _log_records(folder: Path, with_text: bool, since: float | None) -> Iterator[tuple[Path, dict]]:
    """Each record of the request log (at or after ``since``, epoch seconds), with its file; every record must
    hold a text or none may (a log switched between ``log_text`` modes is two batches, not one)."""
    for f in _log_files(folder):
        with f.open(encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                record = json.loads(line)
                if ("text" in record) != with_text:
                    raise MonitorInputError(f"{f}: its records {'hold no' if with_text else 'hold a'} text, unlike "
                                            f"the log's first file: monitor each serve.log_text mode apart")
                if since is None or float(record.get("ts", 0)) >= since:
                    yield f, record


def log_has_texts(folder: str | Path) -> bool:
    """Whether a request-log folder was written with ``serve.log_text: keep`` (by its first record)."""
    for f in _log_files(Path(folder)):
        with f.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    return "text" in json.loads(line)
    raise MonitorInputError(f"{folder}: the batch is empty (no rows to monitor)")


def _request_log_chunks(folder: Path, since: float | None) -> Iterator[pd.DataFrame]:
    """Records of the request log's files; ``label`` there is what the model served, not feedback: dropped."""
    texts: list[object] = []
    for _, record in _log_records(folder, True, since):
        texts.append(record.get("text"))
        if len(texts) == CHUNK:
            yield pd.DataFrame({"text": texts})
            texts = []
    if texts:
        yield pd.DataFrame({"text": texts})


def _reservoir(items: Iterable[tuple], max_rows: int, seed: int) -> tuple[list[tuple], int]:
    """(a uniform sample of at most ``max_rows`` items, in their order, items seen); item[0] is its row."""
    rng = np.random.default_rng(seed)
    kept: list[tuple] = []
    seen = 0
    for item in items:
        seen += 1
        if len(kept) < max_rows:
            kept.append(item)
        elif (j := int(rng.integers(0, seen))) < max_rows:
            kept[j] = item
    kept.sort(key=lambda r: r[0])
    return kept, seen


def read_logged_predictions(folder: str | Path, labels: list[str], max_rows: int, seed: int = 0,
                            since: float | None = None) -> tuple[np.ndarray, int]:
    """(the served probabilities in the version's label order, records read) of a request log without texts."""
    folder = Path(folder)
    kept, seen = _reservoir(((i, f, r) for i, (f, r) in enumerate(_log_records(folder, False, since), 1)),
                            max_rows, seed)
    if not kept:
        raise MonitorInputError(f"{folder}: the batch is empty (no rows to monitor)")
    probs = np.empty((len(kept), len(labels)))
    for n, (row, f, record) in enumerate(kept):
        served = record.get("probabilities")
        if not isinstance(served, dict) or sorted(served) != sorted(labels):
            raise MonitorInputError(f"{f}: record {row}: probabilities over {sorted(served or {})[:10]}, not the "
                                    f"model's labels {labels} (another model's log?)")
        probs[n] = [float(served[lab]) for lab in labels]
    return probs, seen


def read_batch(path: str | Path, text_column: str, label_column: str, max_rows: int, seed: int = 0,
               since: float | None = None) -> tuple[list[str], list[object] | None, list[int], int]:
    """(texts, labels or None, their 1-based rows, rows read): every row when there are at most ``max_rows``,
    else a uniform sample of ``max_rows`` (reservoir sampling over the stream)."""
    path = Path(path)
    if not path.exists():
        raise MonitorInputError(f"{path}: no such file or folder")
    if since is not None and not path.is_dir():
        raise MonitorInputError(f"{path}: a time window (--since) applies to a request-log folder, not a file")
    if not path.is_dir() and _is_tagged(path, text_column):
        return read_tagged_batch(path, max_rows, seed)
    chunks = _request_log_chunks(path, since) if path.is_dir() else _chunks(path)
    has_labels: list[bool] = []

    def rows_of(chunks: Iterator[pd.DataFrame]) -> Iterator[tuple[int, object, object]]:
        row = 0
        for chunk in chunks:
            if text_column not in chunk.columns:
                raise MonitorInputError(f"{path}: no '{text_column}' column (found {list(chunk.columns)[:10]})")
            has_labels.append(label_column in chunk.columns if not has_labels else has_labels[0])
            labels = chunk[label_column].tolist() if has_labels[0] else [None] * len(chunk)
            for text, label in zip(chunk[text_column].tolist(), labels):
                row += 1
                yield row, text, label

    try:
        kept, seen = _reservoir(rows_of(chunks), max_rows, seed)
    except (ValueError, OSError) as exc:
        if isinstance(exc, MonitorInputError):
            raise
        raise MonitorInputError(f"{path}: cannot be read as a table: {str(exc).splitlines()[0][:200]}") from None
    if not kept:
        raise MonitorInputError(f"{path}: the batch is empty (no rows to monitor)")
    _check_texts(path, kept)
    rows = [r[0] for r in kept]
    return [r[1] for r in kept], ([r[2] for r in kept] if has_labels[0] else None), rows, seen


def _check_texts(path: Path, kept: list[tuple[int, object, object]]) -> None:
    for row, text, _ in kept:
        if not isinstance(text, str):
            raise MonitorInputError(f"{path}: row {row}: the text is {type(text).__name__} {str(text)[:40]!r}, "
                                    f"not a string")
        if not text.strip():
            raise MonitorInputError(f"{path}: row {row}: the text is empty")


def _is_tagged(path: Path, text_column: str) -> bool:
    """A NER batch with feedback: a CoNLL-style file, or a JSONL/Parquet table of token lists with no text column.
    Not .txt (validate reads it as CoNLL for task token): the monitor does not know the task yet, and a .txt of
    plain texts must stay refused as not a table."""
    if is_conll(path):
        return ".txt" not in [s.lower() for s in path.suffixes]
    if path.suffix.lower() not in (".jsonl", ".json", ".parquet"):
        return False
    try:
        columns = next(iter(_chunks(path))).columns
    except (StopIteration, ValueError, OSError):
        return False  # read_batch says what is wrong with it
    return text_column not in columns and any(c in columns for c in TOKEN_COLUMNS)


def read_tagged_batch(path: Path, max_rows: int, seed: int = 0) -> tuple[list[str], list[object], list[int], int]:
    """A tagged NER batch (the formats validate reads, common/token_files.py) as read_batch's (texts: tokens joined
    by single spaces, as validate stores them; tag lists; each sentence's first line or row; sentences read).
    Read whole (a tagged file is feedback, not the request stream), then sampled down to ``max_rows``."""
    try:
        sentences = read_tagged(path)
    except DataError as exc:
        raise MonitorInputError(str(exc)) from None
    for s in sentences:
        bad = next((t for t in s.tokens if not t.strip() or any(c.isspace() for c in t)), None)
        if not s.tokens or bad is not None or len(s.tags) != len(s.tokens):
            raise MonitorInputError(f"{path}: row {s.line}: a sentence needs one tag per token and tokens without "
                                    f"whitespace (found {bad!r}, {len(s.tokens)} tokens, {len(s.tags)} tags)")
    kept, seen = _reservoir(((s.line, " ".join(s.tokens), s.tags) for s in sentences), max_rows, seed)
    if not kept:
        raise MonitorInputError(f"{path}: the batch is empty (no rows to monitor)")
    return [k[1] for k in kept], [k[2] for k in kept], [k[0] for k in kept], seen
