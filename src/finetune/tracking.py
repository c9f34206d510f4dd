"""MLflow location, configured by environment at the edge (CLI / KFP), never inside stage cores.

Default, for `dvc repro` on a laptop: a SQLite store ``mlflow.db`` and an artifact folder ``mlartifacts/``
in the project root (both git-ignored). ``MLFLOW_TRACKING_URI`` points everything at a server instead.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"


def configure(root: str | Path = ".") -> tuple[str, str | None]:
    """Return (tracking_uri, artifact_location for new experiments, or None to let the server decide)."""
    root = Path(root).resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    uri = f"sqlite:///{root / DEFAULT_DB}"
    os.environ["MLFLOW_TRACKING_URI"] = uri  # so mlflow.pyfunc.load_model("models:/...") in-process agrees
    return uri, (root / DEFAULT_ARTIFACTS).as_uri()
