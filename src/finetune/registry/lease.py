"""The alias lease: one registration at a time may move a model's aliases."""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
import uuid
from datetime import datetime, timezone

from finetune.registry.request import RegistryUnavailable

log = logging.getLogger(__name__)


LOCK_TAG = "finetune.alias_lock"


LEASE_TTL = 120.0  # seconds a lease lasts unless its holder renews it (every LEASE_TTL / 4 while it works)


LEASE_WAIT = 900.0  # seconds a registration waits for a live (renewing) holder before it gives up


class LeaseLost(RegistryUnavailable):
    """Another registration holds the alias lease now (ours expired, e.g. the process was paused): nothing moved."""


class Lease:
    """A held alias lease: renewed by a heartbeat thread while the holder works; ``check()`` before each alias
    move, since MLflow has no compare-and-set and an expired lease may have been taken by another registration."""

    def __init__(self, client, name: str, owner: str, ttl: float):
        self.client, self.name, self.owner, self.ttl = client, name, owner, ttl
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{name}", daemon=True)

    def value(self) -> str:
        return (self.client.get_registered_model(self.name).tags or {}).get(LOCK_TAG, "")

    def ours(self, held: str) -> bool:
        holder, _, expiry = held.partition("@")
        return holder == self.owner and float(expiry or 0) > time.time()

    def check(self) -> None:
        held = self.value()
        if not self.ours(held):
            raise LeaseLost(f"the alias lease of {self.name} was lost before the alias move (now "
                            f"{held.partition('@')[0] or 'free'}; ours, {self.owner}, had expired): no alias moved")

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                if not self.ours(self.value()):
                    return  # lost: check() says so before the next alias move
                self.client.set_registered_model_tag(self.name, LOCK_TAG, f"{self.owner}@{time.time() + self.ttl}")
            except Exception:  # a registry hiccup: the next beat tries again, check() decides
                log.debug("renewing the alias lease of %s failed", self.name)

    def release(self) -> None:
        """Stop renewing; delete the lease tag only while it is still ours (never another holder's)."""
        self._stop.set()
        self._thread.join(timeout=30)
        try:
            if self.value().partition("@")[0] == self.owner:
                self.client.delete_registered_model_tag(self.name, LOCK_TAG)
        except Exception:  # the lease expires by itself
            log.warning("could not release the alias lock of %s", self.name)


@contextlib.contextmanager
def alias_lock(client, name: str, owner: str, ttl: float | None = None, settle: float = 0.5):
    """Serialize alias moves across concurrent pipelines with a lease kept as a registered-model tag; yields
    the Lease (renewed while held: call ``check()`` right before moving an alias).

    MLflow has no compare-and-set, so a writer sets the tag, waits ``settle`` seconds and reads it back: of
    two writers racing, only the last one's value survives and only that writer proceeds. A crashed holder's
    lease expires after ``ttl`` seconds (it is not renewed any more), or as soon as its run is marked FAILED.
    """
    ttl = LEASE_TTL if ttl is None else ttl
    owner = f"{owner}.{uuid.uuid4().hex[:8]}"
    deadline = time.time() + max(2 * ttl, LEASE_WAIT)
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
    lease = Lease(client, name, owner, ttl)
    lease._thread.start()
    try:
        yield lease
    finally:
        lease.release()


def utc_text(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%H:%M:%S UTC")


def holder_failed(client, holder: str) -> bool:
    """A lease whose holder is a register run already marked FAILED (a killed process) is free."""
    run_id = holder.partition(".")[0]
    try:
        return client.get_run(run_id).info.status in ("FAILED", "KILLED")
    except Exception:
        return False
