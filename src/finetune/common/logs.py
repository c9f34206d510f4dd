"""The command line's log: one format on stderr, credentials redacted from every record (ours and the libraries'),
library INFO chatter only with -v."""

from __future__ import annotations

import logging
import os
import sys

from finetune.common.redact import redact_text

NOISY = ("great_expectations", "mlflow", "urllib3", "alembic", "httpx", "matplotlib")


class _LibraryFilter(logging.Filter):
    """Drops library records below ``level``. On the handler, not on the libraries' loggers: Great Expectations
    sets INFO on its own module loggers when imported, which would undo a level set here beforehand."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "mlflow.store.db.utils" and _store_locked(record):
            return False  # MLflow's ERROR + tracebacks for a locked SQLite store: registry/store.py waits, says it once
        return record.levelno >= self.level or record.name.partition(".")[0] not in NOISY


def _store_locked(record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return "database is locked" in f"{record.getMessage()} {error}"


class _RedactFilter(logging.Filter):
    """Credentials in a URI never reach the log, whoever logs it (our code, MLflow, urllib3...)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        safe = redact_text(message)
        if safe != message:
            record.msg, record.args = safe, None
        return True


def setup_logging(verbosity: int) -> None:
    level = {-1: logging.WARNING, 0: logging.INFO}.get(max(-1, min(verbosity, 1)), logging.DEBUG)
    # MLflow installs its own INFO handler (propagate=False) when imported unless told not to: its records then
    # come through ours and obey -q/-v like the rest.
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    if "mlflow" in sys.modules:  # imported already (in-process callers): undo what its import configured
        logging.getLogger("mlflow").handlers, logging.getLogger("mlflow").propagate = [], True
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.StreamHandler) or handler.stream not in (sys.stderr, sys.__stderr__):
            continue  # e.g. pytest's capture handlers
        for old in [f for f in handler.filters if isinstance(f, _LibraryFilter)]:
            handler.removeFilter(old)
        handler.addFilter(_LibraryFilter(max(level, logging.WARNING)))
        if not any(isinstance(f, _RedactFilter) for f in handler.filters):
            handler.addFilter(_RedactFilter())
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # Library progress bars and load reports are noise in a pipeline log; ours stay.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
