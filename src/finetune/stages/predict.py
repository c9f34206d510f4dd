"""predict: label texts with a registered model (``models:/<name>@champion``, ``models:/<name>/<version>``).

One record per text: ``{"text", "label", "probabilities": {label: p}}`` (multi-label: ``"labels"``, a list; token
models: ``{"text", "entities": [{text, type, start, end, score}], "windows": n}``, offsets into ``text``). The
model is the registry's pyfunc (registry/pyfunc_model.py), asked for probabilities through
``params={"probabilities": True}``.

Streamed: texts are read, labelled and written batch by batch (one text per line is read line by line; a table
is read whole, its predictions streamed), so memory does not grow with the input. ``--output`` is written to a
temporary sibling renamed over the final name at the end: killed, only the temporary file holds what was done.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import IO, Any, Iterable, Iterator
from urllib.parse import unquote, urlsplit

from finetune.common import tracking
from finetune.common.config import Config
from finetune.common.files import FORMATS, read_table, split_lines
from finetune.common.outputs import MARKER, process_alive
from finetune.common.progress import Progress
from finetune.registry.loading import load_verified

log = logging.getLogger("finetune")


class PredictInputError(ValueError):
    """An input file that cannot be read as texts."""


def read_texts(path: str | Path, stream: IO[str] | None = None, text_column: str = "text") -> list[str]:
    """Every text of ``path`` (see iter_texts) as a list."""
    return list(iter_texts(path, stream, text_column))


def iter_texts(path: str | Path, stream: IO[str] | None = None, text_column: str = "text") -> Iterator[str]:
    """Texts from a table's ``text_column`` (.jsonl, .csv, .tsv, .parquet, optionally compressed: read as the
    validate stage reads data, with the same precise errors), or from any other file, one text per line (blank
    lines skipped), read line by line. ``stream`` replaces the file (``--input -`` reads stdin).
    Raises PredictInputError when there is no text at all."""

    p = Path(path)
    if stream is None and any(s.lower() in FORMATS for s in p.suffixes):
        yield from _table_texts(p, text_column)
        return
    n = 0
    for line in (_stream_lines(stream) if stream is not None else _file_lines(p)):
        if line.strip():
            n += 1
            yield line
    if not n:
        raise PredictInputError(f"{'stdin' if stream is not None else p}: no texts to label (the input is empty "
                                f"or blank)")


def _table_texts(p: Path, text_column: str) -> list[str]:
    frame = read_table(p)
    if text_column not in frame.columns:
        raise PredictInputError(f"{p}: no \"{text_column}\" column (found {', '.join(map(str, frame.columns))}); "
                                f"name the text column with --text-column")
    bad = [int(i) for i, v in frame[text_column].items() if not isinstance(v, str)]
    if bad:
        raise PredictInputError(f"{p}: \"{text_column}\" is missing or not a string in row(s) {bad[:5]}")
    return frame[text_column].tolist()


def _file_lines(p: Path) -> Iterator[str]:
    # binary: a line ends at '\n' only ('\x85', '\u2028' are inside a text), '\r\n' too; no newline translation
    with open(p, "rb") as fh:
        for i, raw in enumerate(fh):
            try:
                line = raw.decode("utf-8-sig" if i == 0 else "utf-8")
            except UnicodeDecodeError as exc:
                raise PredictInputError(f"{p}: line {i + 1} is not valid UTF-8 ({raw[exc.start:exc.start + 4]!r}); "
                                        f"re-save the file as UTF-8") from None
            yield from split_lines(line)


def _stream_lines(stream: IO[str]) -> Iterator[str]:
    for chunk in iter(lambda: stream.readline(), ""):
        yield from split_lines(chunk)


def count_texts(path: str | Path) -> int:
    """At most how many texts ``path`` holds, for progress, without decoding it: its lines for a one-text-per-line
    file, 0 (unknown) for stdin ('-') and tables (read whole later)."""
    p = Path(path)
    if str(path) == "-" or any(s.lower() in FORMATS for s in p.suffixes):
        return 0
    n, last = 0, b"\n"
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            n, last = n + block.count(b"\n"), block[-1:]
    return n + (last != b"\n")


def predict(model, texts: Iterable[str], batch_size: int = 256) -> list[dict[str, Any]]:
    """Label ``texts`` with a loaded pyfunc model, in batches (all records in memory: see predict_stream)."""
    return [rec for batch in predict_batches(model, texts, batch_size) for rec in batch]


def predict_batches(model, texts: Iterable[str], batch_size: int = 256) -> Iterator[list[dict[str, Any]]]:
    """The records of ``texts``, one list per batch, reading ``texts`` only as far as needed. Versions registered
    before the model could return probabilities give only the label (``probabilities`` is then None)."""
    batch: list[str] = []
    warned = False
    for text in _with_end(texts):
        if text is not None:
            batch.append(text)
        if batch and (len(batch) == batch_size or text is None):
            out = model.predict(batch, params={"probabilities": True})
            records = [{"text": t, **item}  # label (multi-label: labels) and probabilities; token: entities
                       if isinstance(item, dict) else {"text": t, "label": str(item), "probabilities": None}
                       for t, item in zip(batch, out)]  # not a dict: an older version without probabilities
            if not warned and records[0].get("probabilities", {}) is None:
                warned = True
                log.warning("this model version returns labels only (registered before probabilities were supported)")
            yield records
            batch = []


def _with_end(texts: Iterable[str]) -> Iterator[str | None]:
    yield from texts
    yield None


def predict_stream(model, texts: Iterable[str], fh: IO[str], batch_size: int = 256, total: int = 0) -> int:
    """Label ``texts`` batch by batch, writing each batch's JSON lines to ``fh`` as it is done; progress lines
    (of at most ``total`` texts; none when 0, unknown) on stderr. Returns the number of records written."""
    n = 0
    progress = Progress(total, "predict", "texts") if total else None
    try:
        for records in predict_batches(model, texts, batch_size):
            n += write_jsonl(records, fh)
            fh.flush()
            if progress is not None:
                progress.update(len(records))
    finally:
        if progress is not None:
            progress.close()
    return n


def write_jsonl(records: Iterable[dict[str, Any]], fh: IO[str]) -> int:
    n = 0
    for rec in records:
        fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        n += 1
    return n


# Files and folders the project's own stores use: a prediction file never replaces one of them.
STORE_FILES = ("mlflow.db", "optuna.db", "dvc.lock", "dvc.yaml", "params.yaml")


STORE_FOLDERS = ("mlartifacts", "mlruns", ".dvc", ".git")


def check_output(output: str | Path, inputs: Iterable[str | Path] = (), force: bool = False,
                 stores: Iterable[str | Path] = ()) -> Path:
    """Return ``output`` if predictions may be written there, else raise PredictInputError naming the rule:
    never a folder, never an input file, never a file of the project's stores (``stores``: more such files, e.g.
    a SQLite tracking store), nor anything inside a store folder or a stage's output folder; an existing file
    only with ``force``."""
    out = Path(output)
    real = out.resolve()
    if out.is_dir():
        raise PredictInputError(f"--output {out}: is a folder; give a file, e.g. {out / 'predictions.jsonl'}")
    for src in inputs:
        if src != "-" and Path(src).exists() and real == Path(src).resolve():
            raise PredictInputError(f"--output {out}: is the --input file; write the predictions elsewhere")
    extra = {Path(s).resolve() for s in stores}
    for place in {out.absolute(), real}:
        base = place.name.removesuffix("-journal").removesuffix("-wal").removesuffix("-shm")
        if base in STORE_FILES or place in extra or place.with_name(base) in extra:
            raise PredictInputError(f"--output {out}: is {base}, a file of the project's own stores; refusing to "
                                    f"replace it")
        for folder in place.parents:
            if folder.name in STORE_FOLDERS or (folder / MARKER).is_file():
                what = f"{folder.name}/" if folder.name in STORE_FOLDERS else f"the stage output folder {folder}"
                raise PredictInputError(f"--output {out}: is inside {what}, which the project's own stages "
                                        f"write; give a file outside it")
    if (out.exists() or out.is_symlink()) and not force:
        raise PredictInputError(f"--output {out}: exists; give --force to replace it")
    return out


def sqlite_paths(*uris: str | None) -> list[Path]:
    """The files of ``sqlite:///...`` URIs among ``uris`` (tracking stores a prediction must not replace)."""
    found = []
    for uri in uris:
        parts = urlsplit(uri or "")
        if parts.scheme == "sqlite" and parts.path:
            found.append(Path(unquote(parts.path[1:])))  # sqlite:///rel.db, sqlite:////abs/x.db
    return found


def write_predictions(model, texts: Iterable[str], output: Path, batch_size: int, total: int = 0) -> int:
    """Stream the predictions into a temporary sibling of ``output``, renamed over it once all are written: a
    failure removes it, a kill leaves only the temporary file (never a half-written ``output``)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in output.parent.glob(f".{output.name}.part-*"):  # of a killed predict into the same output
        pid = stale.name.rpartition("-")[2]
        if stale.is_file() and not stale.is_symlink() and pid.isdigit() and not process_alive(int(pid)):
            log.info("predict: removing %s, left by a predict run that was killed (pid %s)", stale, pid)
            stale.unlink()
    tmp = output.with_name(f".{output.name}.part-{os.getpid()}")
    log.info("predict: writing %s (renamed to %s when complete)", tmp, output)
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            n = predict_stream(model, texts, fh, batch_size, total)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, output)
    return n


def run_predict(cfg: Config, texts: list[str], input_path: str | None, text_column: str | None, model: str | None,
                output: str | None, batch_size: int, force: bool = False) -> int:
    """`finetune predict`: label TEXT arguments or the texts of ``input_path`` ('-' = stdin) with a registered
    model (default: the champion), streamed as JSON lines to ``output`` or stdout; returns how many were written.
    Every refusal (arguments, output place) comes before the model is loaded."""
    if bool(texts) == bool(input_path):
        raise PredictInputError("give either TEXT arguments or --input FILE")
    if not 1 <= batch_size <= 1000:  # the pyfunc refuses a request of more than 1000 texts
        raise PredictInputError(f"--batch-size {batch_size}: give 1 to 1000")
    uri = model or f"models:/{cfg.register.model_name}@champion"
    store, _ = tracking.configure(".")
    out = output and check_output(output, [input_path or "-"], force, [*sqlite_paths(store), Path(cfg.tune.storage)])
    tracking.require_reachable(store)  # fail fast when the server is down, not after MLflow's retries
    loaded = load_verified(uri, store)  # every file checked against the registry's digests before loading
    stream = texts or iter_texts(input_path, sys.stdin if input_path == "-" else None,
                                 text_column or cfg.data.text_column)
    total = len(texts) if texts else count_texts(input_path)
    if not out:
        return predict_stream(loaded, stream, sys.stdout, batch_size, total)
    n = write_predictions(loaded, stream, out, batch_size, total)
    log.info("wrote %d predictions to %s", n, out)
    return n
