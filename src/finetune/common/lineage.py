"""Where a model came from: git revision, data hashes, parameters. Read at the edge, passed into register."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd
import yaml


def file_md5(path: str | Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def split_hash(frame: pd.DataFrame) -> str:
    """Content hash of a split (label + text per row, order-free): 'the same test data' means equal hashes."""
    rows = sorted(f"{lab}\t{txt}" for lab, txt in zip(frame["label"], frame["text"]))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def git_info(root: str | Path = ".") -> dict[str, Any]:
    """The commit, and whether the code or params differ from it. The pipeline's own outputs (dvc.lock and every
    path dvc.yaml lists as an out, metric or plot) are rewritten by each `dvc repro`, so they do not count."""
    def run(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None

    commit = run("rev-parse", "HEAD")
    top = run("rev-parse", "--show-toplevel")
    status = run("status", "--porcelain=v1", "-z", "--untracked-files=no")
    if status is None or top is None:
        return {"git_commit": (commit or "").strip() or "unknown", "git_dirty": None}
    ignored = pipeline_outputs(root)
    entries, changed = iter(status.split("\0")), []
    for entry in entries:
        if len(entry) > 3:
            changed.append(Path(top.strip(), entry[3:]).resolve())
            if entry[0] in "RC":  # a rename's or copy's source path follows as its own entry
                changed.append(Path(top.strip(), next(entries, "")).resolve())
    dirty = any(not any(p == o or o in p.parents for o in ignored) for p in changed)
    return {"git_commit": commit.strip() or "unknown", "git_dirty": dirty}


def pipeline_outputs(root: str | Path = ".") -> set[Path]:
    """Absolute paths of dvc.lock and of every out, metric and plot that dvc.yaml declares (stages and top level)."""
    root = Path(root).resolve()
    out = {root / "dvc.lock"}
    p = root / "dvc.yaml"
    spec = (yaml.safe_load(p.read_text(encoding="utf-8")) or {}) if p.is_file() else {}

    def names(entries: Any) -> list[str]:  # entries are strings or one-key dicts {path: options}
        return [n for e in entries or [] for n in ([e] if isinstance(e, str) else e if isinstance(e, dict) else [])]

    for stage in (spec.get("stages") or {}).values():
        for kind in ("outs", "metrics", "plots"):
            out.update(root / n for n in names(stage.get(kind)))
    out.update(root / n for n in names(spec.get("metrics")) + names(spec.get("plots")))
    return {o.resolve() for o in out}


def dvc_data_hash(root: str | Path = ".") -> str | None:
    """The md5 that data.dvc records for the raw data (a directory hash ends in .dir)."""
    p = Path(root) / "data.dvc"
    if not p.is_file():
        return None
    outs = (yaml.safe_load(p.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


LINEAGE_KEYS = ("git_commit", "git_dirty", "data_uri", "data_md5", "data_dvc_md5", "kfp_run")


def collect(data_uri: str | Path, root: str | Path | None = None, *, data_md5: str | None = None,
            git_commit: str | None = None, kfp_run: str | None = None) -> dict[str, Any]:
    """Where a model came from, with the same keys on every path (unknown = None), so that local and cluster
    registrations can be compared. Local: ``root`` is the project (git state, data.dvc). Cluster: the
    submitted git rev and the KFP run name. The data md5 is computed when ``data_uri`` is a local file."""
    info: dict[str, Any] = dict.fromkeys(LINEAGE_KEYS)
    if root is not None:
        info.update(git_info(root), data_dvc_md5=dvc_data_hash(root))
    else:
        info["git_commit"] = git_commit
    local = Path(data_uri) if "://" not in str(data_uri) else None
    if data_md5 is None and local is not None and local.is_file():
        data_md5 = file_md5(local)
    info.update(data_uri=str(data_uri), data_md5=data_md5, kfp_run=kfp_run)
    return info
