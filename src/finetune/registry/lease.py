"""The alias lease: one registration at a time may move a model's aliases."""

from __future__ import annotations

import contextlib
import logging
import random
import time
import uuid
from datetime import datetime, timezone

from finetune.registry.request import RegistryUnavailable

log = logging.getLogger(__name__)


LOCK_TAG = "finetune.alias_lock"


@contextlib.contextmanager
def alias_lock(client, name: str, owner: str, ttl: float = 120.0, settle: float = 0.5):
    """Serialize alias moves across concurrent pipelines with a lease kept as a registered-model tag.

    MLflow has no compare-and-set, so a writer sets the tag, waits ``settle`` seconds and reads it back: of
    two writers racing, only the last one's value survives and only that writer proceeds. A crashed holder's
    lease expires after ``ttl`` seconds, or as soon as its run is marked FAILED.
    """
    owner = f"{owner}.{uuid.uuid4().hex[:8]}"
    deadline = time.time() + 2 * ttl
    reported = None
    while True:
        held = (client.get_registered_model(name).tags or {}).get(LOCK_TAG, "")
        holder, _, expiry = held.partition("@")
        if not holder or float(expiry or 0) < time.time() or holder_failed(client, holder):
            client.set_registered_model_tag(name, LOCK_TAG, f"{owner}@{time.time() + ttl}")
            time.sleep(settle)
            if (client.get_registered_model(name).tags or {}).get(LOCK_TAG, "").startswith(owner + "@"):
                break
        elif held != reported:
            reported = held
            log.warning("waiting for the alias lock of %s: held by %s until %s (waiting at most until %s)", name,
                        holder, utc_text(float(expiry or 0)), utc_text(deadline))
        if time.time() > deadline:
            raise RegistryUnavailable(f"could not take the alias lock of {name} (held by {holder})")
        time.sleep(settle * (1 + random.random()))
    try:
        yield
    finally:
        try:
            client.delete_registered_model_tag(name, LOCK_TAG)
        except Exception:  # the lease expires by itself
            log.warning("could not release the alias lock of %s", name)


def utc_text(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%H:%M:%S UTC")


def holder_failed(client, holder: str) -> bool:
    """A lease whose holder is a register run already marked FAILED (a killed process) is free."""
    run_id = holder.partition(".")[0]
    try:
        return client.get_run(run_id).info.status in ("FAILED", "KILLED")
    except Exception:
        return False
