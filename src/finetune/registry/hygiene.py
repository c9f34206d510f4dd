"""Heartbeats of live register runs, and reaping the runs of killed processes."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from mlflow import MlflowClient
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from finetune.common.redact import redact_text
from finetune.registry.lease import utc_text
from finetune.registry.request import VARIANT_SUFFIXES
from finetune.registry.store import delete_version

log = logging.getLogger(__name__)


STAGE_TAG, HEARTBEAT_TAG = "finetune.stage", "finetune.heartbeat"


HEARTBEAT_EVERY = 30.0  # seconds between a live register run's heartbeats


STALE_AFTER = 300.0  # a RUNNING register run without a heartbeat for this long belongs to a killed process


@contextlib.contextmanager
def heartbeat(tracking_uri: str, run_id: str):
    """Refresh the run's heartbeat tag while it registers, so a later registration can tell a live run from
    the RUNNING leftover of a killed process."""

    stop = threading.Event()

    def beat() -> None:
        client = MlflowClient(tracking_uri)
        while not stop.wait(HEARTBEAT_EVERY):
            with contextlib.suppress(Exception):
                client.set_tag(run_id, HEARTBEAT_TAG, str(time.time()))

    thread = threading.Thread(target=beat, name=f"heartbeat-{run_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


def reap_stale_runs(client, exp_id: str, model_name: str) -> list[str]:
    """Mark register runs left RUNNING by killed processes FAILED, delete their unfinished model versions and
    their uploaded artifacts. Returns the run ids it reaped."""
    now = time.time()
    reaped = []
    # the fp32 run registers versions of model_name, a variant's run (register-int8, register-student, ...)
    # versions of model_name + its suffix
    stages = [("register", model_name)] + [(f"register{sfx}", model_name + sfx) for sfx in VARIANT_SUFFIXES]
    runs = [(run, name) for stage, name in stages
            for run in client.search_runs([exp_id], f"tags.{STAGE_TAG} = '{stage}' and attributes.status = 'RUNNING'")]
    for run, name in runs:
        beat = float(run.data.tags.get(HEARTBEAT_TAG) or run.info.start_time / 1000)
        if now - beat < STALE_AFTER:
            continue
        run_id = run.info.run_id
        log.warning("register run %s has had no heartbeat since %s: its process died; marking it FAILED and "
                    "removing its artifacts", run_id, utc_text(beat))
        for mv in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
            if (mv.tags or {}).get("complete") != "true":
                delete_version(client, name, str(mv.version))
        client.set_tag(run_id, "finetune.failed", f"process died (no heartbeat since {utc_text(beat)}); "
                                                  f"marked FAILED by a later registration")
        client.set_terminated(run_id, "FAILED")
        remove_artifacts(client, run_id, exp_id)
        reaped.append(run_id)
    return reaped


def remove_artifacts(client, run_id: str, exp_id: str) -> None:
    """Delete what a failed run uploaded (its artifacts and the models it logged), as far as the store allows."""

    try:
        locations = [client.get_run(run_id).info.artifact_uri]
        for lm in client.search_logged_models([exp_id], filter_string=f"source_run_id = '{run_id}'"):
            client.finalize_logged_model(lm.model_id, "FAILED")
            locations.append(lm.artifact_location)
        for uri in locations:
            get_artifact_repository(uri).delete_artifacts()
    except Exception as exc:  # e.g. a store without delete: the run is FAILED anyway, `mlflow gc` can follow
        log.warning("could not remove the artifacts of failed run %s: %s", run_id, redact_text(str(exc)))
