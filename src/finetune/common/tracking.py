"""MLflow location, configured by environment at the edge (CLI / KFP), never inside stage cores.

Default, for `dvc repro` on a laptop: a SQLite store ``mlflow.db`` and an artifact folder ``mlartifacts/``
in the project root (both git-ignored). ``MLFLOW_TRACKING_URI`` points everything at a server instead.
An experiment queued with `dvc exp run --queue` runs in a copy of the project under ``.dvc/tmp/exps/``; it
uses the project's store too, not one that would vanish with the copy.
MLflow stores absolute artifact paths in ``mlflow.db``; when the project folder was moved or copied, they are
pointed at this folder's ``mlartifacts/`` before use (``rebase_default_store``), so a copy never writes into the
folder it was copied from.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import requests

from finetune.common.redact import redact_uri  # one redaction rule for every message

DEFAULT_DB = "mlflow.db"


DEFAULT_ARTIFACTS = "mlartifacts"


PROBE_TIMEOUT_S = 5.0


log = logging.getLogger("finetune")


class TrackingUnreachable(RuntimeError):
    """The tracking server does not answer: said at once instead of after MLflow's minutes of retries."""


def require_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise TrackingUnreachable unless the HTTP(S) tracking server at ``uri`` answers within ``timeout`` seconds.

    Any HTTP answer counts (401 behind a proxy too): the question is only whether the server is there. Local
    stores (sqlite:, file:) are not probed. TLS settings follow MLflow's own environment variables.
    """
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return

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
    # MLflow prints "View run <name> at: <tracking URI>/#/..." with print-like writes to stdout, past the redacting
    # log handler: with http://user:password@host the password would reach the console and pod logs. Off, always.
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    root = project_root(root)
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    if require_env:
        raise RuntimeError("MLFLOW_TRACKING_URI is not set: the register step needs the MLflow server's address "
                           "(see README, 'Run on Kubeflow': the finetune-mlflow secret)")
    uri = f"sqlite:///{root / DEFAULT_DB}"
    os.environ["MLFLOW_TRACKING_URI"] = uri  # so mlflow.pyfunc.load_model("models:/...") in-process agrees
    rebase_default_store(root)
    return uri, (root / DEFAULT_ARTIFACTS).as_uri()


def rebase_default_store(root: str | Path) -> int:
    """Point the absolute artifact paths in ``root``/mlflow.db that lead into another folder's ``mlartifacts/``
    (the project was moved or copied) at ``root``/mlartifacts. Returns the number of values changed.

    MLflow keeps no relative locations (it makes them absolute when an experiment is created) and has no API to
    move an experiment, so the stored values are rewritten: every text column of every table, only values that
    start with the old folder's ``mlartifacts`` path, in one transaction.
    """
    root = Path(root)
    db = root / DEFAULT_DB
    if not db.is_file():
        return 0
    new_uri, new_path = (root.resolve() / DEFAULT_ARTIFACTS).as_uri(), str(root.resolve() / DEFAULT_ARTIFACTS)
    con = sqlite3.connect(db, timeout=30)
    try:
        try:
            rows = con.execute("SELECT artifact_location FROM experiments").fetchall()
        except sqlite3.DatabaseError:
            return 0  # not (yet) an MLflow store: MLflow itself will say what is wrong
        old_uris = {_artifacts_prefix(loc) for (loc,) in rows} - {None, new_uri}
        changed = 0
        with con:
            for old_uri in old_uris:
                old_path = unquote(old_uri[len("file://"):])
                for old, new in ((old_uri, new_uri), (old_path, new_path)):
                    changed += _replace_prefix(con, old, new)
        if changed:
            log.info("the project folder moved or was copied: %d MLflow artifact location(s) in %s now point at %s "
                     "(were under %s)", changed, db, new_path, ", ".join(sorted(old_uris)))
        return changed
    finally:
        con.close()


def _artifacts_prefix(location: str | None) -> str | None:
    """``file:///x/proj/mlartifacts/1`` -> ``file:///x/proj/mlartifacts``; None for any other kind of location."""
    if not location or not location.startswith("file://"):
        return None
    head, sep, _ = location.partition(f"/{DEFAULT_ARTIFACTS}/")
    if sep:
        return head + f"/{DEFAULT_ARTIFACTS}"
    return location if location.endswith(f"/{DEFAULT_ARTIFACTS}") else None


def _replace_prefix(con: sqlite3.Connection, old: str, new: str) -> int:
    """Replace the prefix ``old`` (followed by '/' or nothing) by ``new`` in every text column of every table."""
    n = 0
    tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    for table in tables:
        for col in con.execute(f'PRAGMA table_info("{table}")').fetchall():
            name, decl = col[1], (col[2] or "").upper()
            if not any(t in decl for t in ("CHAR", "TEXT", "CLOB")):
                continue
            cur = con.execute(f'UPDATE "{table}" SET "{name}" = ? || substr("{name}", ?) '
                              f'WHERE "{name}" = ? OR substr("{name}", 1, ?) = ?',
                              (new, len(old) + 1, old, len(old) + 1, old + "/"))
            n += cur.rowcount
    return n
