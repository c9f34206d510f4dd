"""MLflow location, configured by environment at the edge (CLI / KFP), never inside stage cores.

Default, for `dvc repro` on a laptop: a SQLite store ``mlflow.db`` and an artifact folder ``mlartifacts/``
in the project root (both git-ignored). ``MLFLOW_TRACKING_URI`` points everything at a server instead.
An experiment queued with `dvc exp run --queue` runs in a copy of the project under ``.dvc/tmp/exps/``; it
uses the project's store too, not one that would vanish with the copy.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"


def project_root(path: str | Path) -> Path:
    """``path``, or, inside a DVC experiment's temporary workspace (``<root>/.dvc/tmp/exps/...``), ``<root>``."""
    p = Path(path).resolve()
    parts = p.parts
    for i in range(len(parts) - 3, 0, -1):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return p


def configure(root: str | Path = ".", require_env: bool = False) -> tuple[str, str | None]:
    """Return (tracking_uri, artifact_location for new experiments, or None to let the server decide).

    ``require_env``: on a cluster a local SQLite file would vanish with the pod, so insist on a server.
    """
    root = project_root(root)
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    if require_env:
        raise RuntimeError("MLFLOW_TRACKING_URI is not set: the register step needs the MLflow server's address "
                           "(see README, 'Run on Kubeflow': the finetune-mlflow secret)")
    uri = f"sqlite:///{root / DEFAULT_DB}"
    os.environ["MLFLOW_TRACKING_URI"] = uri  # so mlflow.pyfunc.load_model("models:/...") in-process agrees
    return uri, (root / DEFAULT_ARTIFACTS).as_uri()
