"""Optuna trials as nested MLflow runs under one parent run."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from finetune.common.redact import redact_values
from finetune.registry.hygiene import HEARTBEAT_TAG, STAGE_TAG, STALE_AFTER, heartbeat
from finetune.registry.lease import utc_text
from finetune.registry.request import experiment_id

log = logging.getLogger("finetune")

TRIAL_STATES = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}  # Optuna state -> MLflow run status
TUNE_STAGES = ("tune", "tune-trial")  # STAGE_TAG of the search's parent run and of its trials


class SearchLog:
    """MLflow runs of a search: ``parent`` (tags study, storage; reopened when the study resumes) and one run per
    trial nested under it (``mlflow.parentRunId``) with the sampled params, the validation metric per step and
    the trial's state. Every string is redacted before it leaves the process."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_location: str | None, parent_id: str | None,
                 tags: dict[str, str], params: dict[str, Any]):

        self.client, self.uri = MlflowClient(tracking_uri), tracking_uri
        self.exp_id = experiment_id(self.client, experiment, artifact_location)
        reap_stale_tune_runs(self.client, self.exp_id)
        self.parent = parent_id if parent_id and self._exists(parent_id) else None
        if self.parent is None:
            run = self.client.create_run(self.exp_id, tags={STAGE_TAG: "tune", HEARTBEAT_TAG: str(time.time()),
                                                            **redact_values(tags)},
                                         run_name=f"tune-{tags.get('study', '')}")
            self.parent = run.info.run_id
            self.client.log_batch(self.parent, params=_params(params))
        else:
            self.client.set_tag(self.parent, HEARTBEAT_TAG, str(time.time()))
            self.client.update_run(self.parent, "RUNNING")
        # heartbeats while the process lives: a later tune reaps the RUNNING runs of a killed one
        self._beats = {self.parent: _start(heartbeat(self.uri, self.parent))}

    def _exists(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id).info.experiment_id == self.exp_id
        except Exception:  # deleted, or a store the study's earlier runs did not use
            return False

    def start_trial(self, number: int, params: dict[str, Any]) -> str:
        run = self.client.create_run(self.exp_id, run_name=f"trial-{number}",
                                     tags={"mlflow.parentRunId": self.parent, STAGE_TAG: "tune-trial",
                                           "trial_number": str(number), HEARTBEAT_TAG: str(time.time())})
        self._beats[run.info.run_id] = _start(heartbeat(self.uri, run.info.run_id))
        self.client.log_batch(run.info.run_id, params=_params(params))
        return run.info.run_id

    def log_eval(self, run_id: str, row: dict[str, float]) -> None:

        stamp, step = int(time.time() * 1000), int(row["step"])
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, step) for k, v in row.items() if k != "step"])

    def end_trial(self, run_id: str, state: str, metrics: dict[str, float]) -> None:
        self.client.log_batch(run_id, metrics=_metrics(metrics))
        self.client.set_tag(run_id, "trial_state", state)
        self._stop(run_id)
        self.client.set_terminated(run_id, TRIAL_STATES[state])

    def finish(self, metrics: dict[str, float], tags: dict[str, str], folder: str | Path | None, status: str) -> None:
        self.client.log_batch(self.parent, metrics=_metrics(metrics))
        for k, v in redact_values(tags).items():
            self.client.set_tag(self.parent, k, v)
        if folder is not None:
            self.client.log_artifacts(self.parent, str(folder), "tune")
        for run_id in list(self._beats):
            self._stop(run_id)
        self.client.set_terminated(self.parent, status)

    def _stop(self, run_id: str) -> None:
        beat = self._beats.pop(run_id, None)
        if beat is not None:
            beat.close()


def _start(cm) -> contextlib.ExitStack:
    """``cm`` entered now, left by the returned stack's close()."""
    stack = contextlib.ExitStack()
    stack.enter_context(cm)
    return stack


def reap_stale_tune_runs(client, exp_id: str) -> list[str]:
    """Mark the search and trial runs left RUNNING by a killed tune (no heartbeat for STALE_AFTER seconds) FAILED,
    as register does with its own. Returns the run ids it reaped."""
    now, reaped = time.time(), []
    runs = [run for stage in TUNE_STAGES  # MLflow's filter has no IN for tags
            for run in client.search_runs([exp_id], f"tags.{STAGE_TAG} = '{stage}' and attributes.status = 'RUNNING'")]
    for run in runs:
        beat = float(run.data.tags.get(HEARTBEAT_TAG) or run.info.start_time / 1000)
        if now - beat < STALE_AFTER:
            continue  # a live tune (another study) beats every few seconds
        log.warning("tune run %s has had no heartbeat since %s: its process died; marking it FAILED",
                    run.info.run_id, utc_text(beat))
        client.set_tag(run.info.run_id, "finetune.failed", f"process died (no heartbeat since {utc_text(beat)}); "
                                                           f"marked FAILED by a later tune")
        client.set_terminated(run.info.run_id, "FAILED")
        reaped.append(run.info.run_id)
    return reaped


def _params(values: dict[str, Any]) -> list:

    return [Param(k, str(v)[:6000]) for k, v in redact_values(values).items()]


def _metrics(values: dict[str, float]) -> list:

    stamp = int(time.time() * 1000)
    return [Metric(k, float(v), stamp, 0) for k, v in values.items()]
