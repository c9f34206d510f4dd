"""MLflow location, configured by environment at the edge (CLI / KFP), never inside stage cores.

Default, for `dvc repro` on a laptop: a SQLite store ``mlflow.db`` and an artifact folder ``mlartifacts/``
in the project root (both git-ignored). ``MLFLOW_TRACKING_URI`` points everything at a server instead.
An experiment queued with `dvc exp run --queue` runs in a copy of the project under ``.dvc/tmp/exps/``; it
uses the project's store too, not one that would vanish with the copy.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
PROBE_TIMEOUT_S = 5.0


class TrackingUnreachable(RuntimeError):
    """The tracking server does not answer: said at once instead of after MLflow's minutes of retries."""


def redact_uri(uri: str) -> str:
    """``uri`` fit for messages: user and password replaced by ``***``, and every query value too."""
    parts = urlsplit(uri)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = urlencode([(k, "***") for k, _ in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def require_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise TrackingUnreachable unless the HTTP(S) tracking server at ``uri`` answers within ``timeout`` seconds.

    Any HTTP answer counts (401 behind a proxy too): the question is only whether the server is there. Local
    stores (sqlite:, file:) are not probed. TLS settings follow MLflow's own environment variables.
    """
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    import requests

    health = urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path.rstrip("/") + "/health", "", ""))
    verify: bool | str = True
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        verify = False
    elif os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
        verify = os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"]
    try:
        requests.get(health, timeout=timeout, verify=verify, allow_redirects=False)
    except requests.Timeout:
        reason = f"no answer within {timeout:g} s"
    except requests.exceptions.SSLError:
        reason = "TLS handshake failed (certificate?)"
    except requests.RequestException:
        reason = "connection refused or host unknown"
    else:
        return
    raise TrackingUnreachable(f"cannot reach the tracking server at {redact_uri(uri)}: {reason}; "
                              f"check MLFLOW_TRACKING_URI and that the server is up")


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
