"""Small MLflow operations the registry's modules share: retries, the current champion, deleting a
version, the digests stored with a version."""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import mlflow.artifacts
from mlflow.exceptions import MlflowException
from mlflow.tracking._tracking_service.utils import _use_tracking_uri

from finetune.common.config import RegisterConfig
from finetune.common.redact import redact_text
from finetune.registry import integrity
from finetune.registry.request import CHAMPION, RegistryError, RegistryUnavailable

log = logging.getLogger(__name__)


LOCK_WAIT = 600.0  # seconds a registration waits for an embedded (SQLite) store another process is writing to


def with_retries(cfg: RegisterConfig, tracking_uri: str, attempt_once: Callable[[], Any]) -> Any:
    """``attempt_once`` retried on RegistryUnavailable with exponential backoff, then reported. A SQLite store
    locked by another writer (MLflow's own busy timeout is 20 s) is waited for up to LOCK_WAIT seconds without
    using up ``cfg.retries``, then reported in one line naming the store and what holds it."""

    delay, attempt, waited_since = cfg.retry_backoff, 0, None
    with _use_tracking_uri(tracking_uri):  # restore the caller's tracking URI afterwards: no global side effect
        while True:
            try:
                return attempt_once()
            except RegistryUnavailable as exc:
                db = locked_sqlite(tracking_uri, exc)
                if db is not None:
                    waited_since = waited_since or time.time()
                    if time.time() - waited_since > LOCK_WAIT:
                        raise RegistryError(f"the MLflow store {db} stayed locked for {LOCK_WAIT:.0f} s: "
                                            f"{lock_holders(db)} holds a write on it; this registration did not "
                                            f"complete (rerun it once that process is done)") from None
                    log.warning("the MLflow store %s is locked by another writer (%s); waiting", db, lock_holders(db))
                    time.sleep(min(5.0, 0.5 + random.random()))
                    continue
                if attempt == cfg.retries:
                    raise RegistryError(redact_text(f"giving up after {cfg.retries + 1} attempt(s): {exc}")) from None
                attempt += 1
                log.warning("registry attempt %d failed (%s); retrying in %.1fs", attempt, redact_text(str(exc)),
                            delay)
                time.sleep(delay)
                delay *= 2


def locked_sqlite(tracking_uri: str, exc: BaseException) -> Path | None:
    """The database file when ``tracking_uri`` is a SQLite store and ``exc`` (or what caused it) says it is
    locked; else None."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    seen: BaseException | None = exc
    while seen is not None:
        if "database is locked" in str(seen):
            return Path(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0])  # sqlite:////abs or :///rel
        seen = seen.__cause__ or seen.__context__
    return None


def lock_holders(db: Path) -> str:
    """The other processes that have ``db`` (or its journal) open, as 'PID n (command)', read from /proc."""
    names = {str(db.resolve()), f"{db.resolve()}-journal", f"{db.resolve()}-wal"}
    found = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        pid = int(fd_dir.parent.name)
        if pid == os.getpid():
            continue
        try:
            if any(os.readlink(fd) in names for fd in fd_dir.iterdir()):
                cmd = (fd_dir.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"PID {pid} ({' '.join(cmd.split())[:80]})")  # one line, whatever the command
        except OSError:  # another user's process, or gone meanwhile
            continue
    return ", ".join(found) or "another process (not visible from here)"


def current_champion(client, name: str):
    return current_alias(client, name, CHAMPION)


def current_alias(client, name: str, alias: str):
    """The version of ``name`` holding ``alias``, or None (no such alias, or no such model)."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def stored_digests(model_uri: str, tracking_uri: str, model_dir: str | Path) -> dict[str, str]:
    """sha256 of every file of the logged model, read back from the artifact store, whose copy of the model
    folder must equal the local one (so the digests describe what was trained, not what reached the store)."""

    with tempfile.TemporaryDirectory(prefix="finetune-logged-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp, tracking_uri=tracking_uri)
        digests = integrity.folder_digests(local)
    prefix = f"artifacts/{Path(model_dir).resolve().name}/"  # MLflow copies the folder under its own name
    stored = {k[len(prefix):]: v for k, v in digests.items() if k.startswith(prefix)}
    if stored != integrity.folder_digests(model_dir):
        raise RegistryUnavailable(f"the model files in the artifact store differ from {model_dir} after upload")
    return digests


def delete_version(client, name: str, version: str) -> None:
    try:
        client.delete_model_version(name, version)
    except Exception:  # registry gone mid-way: the next attempt's _existing() removes it
        log.warning("could not delete unfinished version %s of %s", version, name)
