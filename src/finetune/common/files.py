"""Reading raw tables with precise errors, and JSON files."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
from pathlib import Path
from typing import Any

import pandas as pd


class DataError(Exception):
    """Raw data that cannot be read at all. ``rule`` names what it broke; ``rows`` are 1-based data rows."""

    def __init__(self, rule: str, message: str, path: str | Path, rows: list[int] | None = None):
        super().__init__(f"{path}: {message}")
        self.rule, self.message, self.path, self.rows = rule, message, str(path), rows or []


_OPENERS = {".bz2": bz2.decompress, ".gz": gzip.decompress, ".xz": lzma.decompress}


FORMATS = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


def _format_of(path: Path) -> tuple[str, str | None]:
    suffixes = [s.lower() for s in path.suffixes]
    comp = suffixes[-1] if suffixes and suffixes[-1] in _OPENERS else None
    rest = suffixes[:-1] if comp else suffixes
    fmt = rest[-1] if rest else ""
    if fmt not in FORMATS:
        raise DataError("file_format", f"unsupported file type {''.join(suffixes) or '(none)'}; use one of "
                        f"{', '.join(FORMATS)} (optionally .gz/.bz2/.xz)", path)
    return fmt, comp


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8-sig")  # -sig: a leading BOM is dropped, not glued onto the first column name
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError("utf8_encoding", f"not valid UTF-8 at byte {exc.start} (line {line}): "
                        f"{raw[exc.start:exc.start + 4]!r}; re-save the file as UTF-8", path, [line]) from exc


def read_table(path: str | Path, workspace: str | Path | None = None) -> pd.DataFrame:
    """Read CSV/TSV/JSONL/Parquet (optionally compressed) into a frame whose index is the 1-based row number.

    ``workspace``: a relative path must stay inside it, neither through '..' nor through a symlink.
    Raises DataError with the rule broken, never a bare parser traceback.
    """
    p = Path(path)
    if workspace is not None and not p.is_absolute():
        ws = Path(workspace).resolve()
        lexical = Path(os.path.normpath(ws / p))
        real = (Path(workspace) / p).resolve()
        if ws not in lexical.parents and lexical != ws:
            raise DataError("path_in_workspace", f"is outside the project folder {ws} (it leads to {lexical}); "
                            f"copy the file into the project, or give an absolute path on purpose", p)
        if ws not in real.parents and real != ws:
            raise DataError("path_in_workspace", f"resolves to {real}, outside the workspace {ws} "
                            f"(a symlink pointing out of the project); copy the file in or pass its real path", p)
    if not p.exists():
        raise DataError("file_exists", "file not found", p)
    if p.is_dir():
        raise DataError("file_exists", "is a directory, expected a data file", p)
    if not p.is_file():  # a FIFO would block the read forever, a device never ends
        raise DataError("regular_file", "is not a regular file (a FIFO, socket or device); give a data file", p)
    fmt, comp = _format_of(p)
    raw = p.read_bytes()
    if comp:
        try:
            raw = _OPENERS[comp](raw)
        except (OSError, EOFError, ValueError, lzma.LZMAError) as exc:
            raise DataError("compression", f"cannot decompress {comp} data (truncated or corrupt): {exc}", p) from exc
    if not raw.strip():
        raise DataError("not_empty", "file is empty", p)
    if fmt == ".parquet":
        try:
            df = pd.read_parquet(io.BytesIO(raw))
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise DataError("parquet_format", f"not a readable Parquet file: {exc}", p) from exc
    elif fmt in (".jsonl", ".json"):
        df = _read_jsonl(_decode(raw, p), p)
    else:
        text = _decode(raw, p)
        if "\x00" in text:
            line = text[: text.index("\x00")].count("\n") + 1
            raise DataError("no_nul_bytes", f"NUL byte at line {line}: binary or corrupt file", p, [line])
        try:
            # Only truly empty fields are missing: a review that reads "NA" is text.
            df = pd.read_csv(io.StringIO(text), sep="\t" if fmt == ".tsv" else ",", dtype=str,
                             keep_default_na=False, na_values=[""], on_bad_lines="error")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
            raise DataError("csv_format", f"malformed CSV: {exc}", p) from exc
    if len(df) == 0:
        raise DataError("not_empty", "file has a header but no rows", p)
    df.index = pd.RangeIndex(1, len(df) + 1, name="row")
    return df


def split_lines(text: str) -> list[str]:
    """Lines ended by '\n' or '\r\n' only. str.splitlines() also breaks at '\x85', '\u2028', '\x0c'..., which
    occur inside real texts (and inside JSON strings), so it would cut one record into two."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _read_jsonl(text: str, p: Path) -> pd.DataFrame:
    records = []
    for n, line in enumerate(split_lines(text), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError("jsonl_format", f"line {n} is not valid JSON: {exc.msg}", p, [n]) from exc
        if not isinstance(rec, dict):
            raise DataError("jsonl_format", f"line {n} is a JSON {type(rec).__name__}, expected an object", p, [n])
        records.append(rec)
    return pd.DataFrame.from_records(records)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
