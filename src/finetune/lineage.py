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
    def run(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    commit = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit or "unknown", "git_dirty": bool(status) if status is not None else None}


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
