"""The command line's log filters, in a real process (the CLI's handler on stderr)."""

from __future__ import annotations

import subprocess
import sys

EMIT = """
import logging, sqlite3
from finetune.common.logs import setup_logging
setup_logging(0)
for text in ("database is locked", "disk I/O error"):
    try:
        raise sqlite3.OperationalError(text)
    except sqlite3.OperationalError:
        logging.getLogger("mlflow.store.db.utils").exception(
            "SQLAlchemy database error. The following exception is caught.")
"""


def test_mlflows_locked_store_tracebacks_are_dropped_and_other_store_errors_kept():
    """Issue 27, second pass: a registration that waited for a locked SQLite store (and then completed) printed 91
    lines of MLflow's ERROR record with two SQLAlchemy tracebacks before its own one-line warning. The registry's
    wait says it once; MLflow's record of that lock is dropped, any other store error still shows."""
    err = subprocess.run([sys.executable, "-c", EMIT], capture_output=True, text=True, timeout=120, check=True).stderr
    assert "database is locked" not in err
    assert err.count("ERROR mlflow.store.db.utils: SQLAlchemy database error") == 1 and "disk I/O error" in err
