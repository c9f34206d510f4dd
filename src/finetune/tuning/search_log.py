"""Optuna trials as nested MLflow runs under one parent run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from finetune.common.redact import redact_values
from finetune.registry.hygiene import STAGE_TAG
from finetune.registry.request import experiment_id

TRIAL_STATES = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}  # Optuna state -> MLflow run status


class SearchLog:
    """MLflow runs of a search: ``parent`` (tags study, storage; reopened when the study resumes) and one run per
    trial nested under it (``mlflow.parentRunId``) with the sampled params, the validation metric per step and
    the trial's state. Every string is redacted before it leaves the process."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_location: str | None, parent_id: str | None,
                 tags: dict[str, str], params: dict[str, Any]):

        self.client = MlflowClient(tracking_uri)
        self.exp_id = experiment_id(self.client, experiment, artifact_location)
        self.parent = parent_id if parent_id and self._exists(parent_id) else None
        if self.parent is None:
            run = self.client.create_run(self.exp_id, tags={STAGE_TAG: "tune", **redact_values(tags)},
                                         run_name=f"tune-{tags.get('study', '')}")
            self.parent = run.info.run_id
            self.client.log_batch(self.parent, params=_params(params))
        else:
            self.client.update_run(self.parent, "RUNNING")

    def _exists(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id).info.experiment_id == self.exp_id
        except Exception:  # deleted, or a store the study's earlier runs did not use
            return False

    def start_trial(self, number: int, params: dict[str, Any]) -> str:
        run = self.client.create_run(self.exp_id, run_name=f"trial-{number}",
                                     tags={"mlflow.parentRunId": self.parent, STAGE_TAG: "tune-trial",
                                           "trial_number": str(number)})
        self.client.log_batch(run.info.run_id, params=_params(params))
        return run.info.run_id

    def log_eval(self, run_id: str, row: dict[str, float]) -> None:

        stamp, step = int(time.time() * 1000), int(row["step"])
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, step) for k, v in row.items() if k != "step"])

    def end_trial(self, run_id: str, state: str, metrics: dict[str, float]) -> None:
        self.client.log_batch(run_id, metrics=_metrics(metrics))
        self.client.set_tag(run_id, "trial_state", state)
        self.client.set_terminated(run_id, TRIAL_STATES[state])

    def finish(self, metrics: dict[str, float], tags: dict[str, str], folder: str | Path | None, status: str) -> None:
        self.client.log_batch(self.parent, metrics=_metrics(metrics))
        for k, v in redact_values(tags).items():
            self.client.set_tag(self.parent, k, v)
        if folder is not None:
            self.client.log_artifacts(self.parent, str(folder), "tune")
        self.client.set_terminated(self.parent, status)


def _params(values: dict[str, Any]) -> list:

    return [Param(k, str(v)[:6000]) for k, v in redact_values(values).items()]


def _metrics(values: dict[str, float]) -> list:

    stamp = int(time.time() * 1000)
    return [Metric(k, float(v), stamp, 0) for k, v in values.items()]
