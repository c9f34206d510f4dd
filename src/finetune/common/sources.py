"""Bring raw data to a local file from where it lives: a local path, s3://bucket/key, or a DVC-tracked path
at a git revision (dvc://path/in/repo?repo=<git url>&rev=<rev>). Shared by the CLI and the KFP validate step."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import parse_qs, urlparse


class SourceError(RuntimeError):
    pass


def is_remote(uri: str) -> bool:
    return urlparse(str(uri)).scheme in ("s3", "dvc")


def fetch(uri: str, dest_dir: str | Path) -> Path:
    """Return a local path holding the data at ``uri`` (the path itself for local files)."""
    u = urlparse(str(uri))
    if u.scheme in ("", "file"):
        return Path(u.path if u.scheme else uri)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    name = Path(u.path).name or "data"
    dest = dest_dir / name
    tmp = dest_dir / f".{name}.part"
    try:
        if u.scheme == "s3":
            import boto3
            from botocore.config import Config

            # AWS_ENDPOINT_URL (or MLflow's MLFLOW_S3_ENDPOINT_URL) points boto3 at any S3-compatible store.
            endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
            s3 = boto3.client("s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"}))
            s3.download_file(u.netloc, u.path.lstrip("/"), str(tmp))
        elif u.scheme == "dvc":
            import dvc.api

            q = parse_qs(u.query)
            path = (u.netloc + u.path).lstrip("/")
            with dvc.api.open(path, repo=q.get("repo", [None])[0], rev=q.get("rev", [None])[0], mode="rb") as src, \
                    tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            raise SourceError(f"unsupported data URI scheme '{u.scheme}' in {uri}: use a path, s3:// or dvc://")
    except SourceError:
        raise
    except Exception as exc:  # boto/dvc raise many types; the user needs the URI and the reason
        tmp.unlink(missing_ok=True)
        raise SourceError(f"cannot fetch {uri}: {exc}") from exc
    tmp.replace(dest)
    return dest
