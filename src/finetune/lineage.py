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


def collect(data_path: str | Path, root: str | Path = ".") -> dict[str, Any]:
    info = git_info(root)
    info.update({"data_path": str(data_path), "data_md5": file_md5(data_path) if Path(data_path).is_file() else None,
                 "data_dvc_md5": dvc_data_hash(root)})
    return info
