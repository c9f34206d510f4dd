"""The monitor's MLflow side: one run per monitor check in the ``monitor.experiment`` experiment, tagged with the
model version it checked (its metrics over time are that experiment's runs), and the version's own tags pointing
at its latest check."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from finetune.common.redact import redact_text, redact_uri
from finetune.registry.loading import pinned_version
from finetune.registry.request import RegistryError, experiment_id


def log_monitor_run(tracking_uri: str, experiment: str, model_name: str, version: str, result: dict[str, Any],
                    report_dir: str | Path) -> str:
    """Log one monitor check; returns its run id."""
    tags = {"finetune.stage": "monitor", "model_name": model_name, "model_version": version,
            "model_uri": f"models:/{model_name}/{version}", "drift": str(result["drift"]).lower(),
            "fired": ",".join(result["fired"])[:5000], "input": redact_text(str(result.get("input", "")))[:5000],
            "labelled": str(result["labelled"]).lower()}
    metrics = {"rows": float(result["rows"]), "drift": float(result["drift"])}
    for test in result["tests"]:
        key = test["test"].replace(":", "_")
        metrics[key] = float(test["statistic"])
        if "p_value" in test:
            metrics[f"{key}_p"] = float(test["p_value"])
    try:
        client = MlflowClient(tracking_uri)
        exp = experiment_id(client, experiment, None)
        run = client.create_run(exp, tags=tags)
        run_id = run.info.run_id
        client.log_batch(run_id, metrics=[Metric(k, v, int(time.time() * 1000), 0) for k, v in metrics.items()])
        for f in sorted(Path(report_dir).iterdir()):  # metrics.json and report.html, not the stage's marker
            if f.suffix in (".json", ".html"):
                client.log_artifact(run_id, str(f))
        client.set_terminated(run_id, "FINISHED")
        client.set_model_version_tag(model_name, version, "monitor.last_run_id", run_id)
        client.set_model_version_tag(model_name, version, "monitor.last_drift", tags["drift"])
        return run_id
    except (MlflowException, OSError) as exc:
        raise RegistryError(redact_text(f"cannot log the monitor run to {redact_uri(tracking_uri)}: {exc}")) from None



def int8_parent(model_uri: str, tracking_uri: str) -> str | None:
    """``<name>/<version>`` of the fp32 version whose int8 variant ``model_uri`` names (its ``fp32_model`` tag), or
    None for any other version."""
    name, version = pinned_version(model_uri, tracking_uri)
    try:
        return (MlflowClient(tracking_uri).get_model_version(name, version).tags or {}).get("fp32_model")
    except MlflowException as exc:
        raise RegistryError(redact_text(f"cannot read {model_uri} in {redact_uri(tracking_uri)}: {exc}")) from None
