"""monitor: load a registered version verified (with its reference profile), profile a batch of texts the same
way, run the drift tests, write out/monitor/metrics.json and report.html, and log the check as an MLflow run
tagged with the version. The exit status tells cron, CI and pipelines what happened: 0 no drift, 3 drift."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from finetune.common.config import Config
from finetune.common.files import write_json
from finetune.common.outputs import atomic_dir, check_output_dir
from finetune.common.redact import redact_text
from finetune.monitoring.batch import read_batch
from finetune.monitoring.drift import compare_profiles
from finetune.monitoring.profiling import PROFILE_FOLDER, encoder_from_pyfunc, load_reference, profile_texts
from finetune.monitoring.report import render_monitor_report
from finetune.monitoring.tasks import task_of
from finetune.registry.loading import load_verified_version
from finetune.registry.monitor_runs import log_monitor_run

log = logging.getLogger("finetune")

DRIFT_EXIT = 3  # cron, CI and the KFP loop branch on it


def monitor_batch(cfg: Config, model_uri: str, tracking_uri: str, batch: str | Path) -> tuple[dict, Any, Any]:
    """(result, reference profile, batch profile) of ``batch`` against the version ``model_uri`` names now."""
    texts, labels, rows, read = read_batch(batch, cfg.data.text_column, cfg.data.label_column,
                                           cfg.monitor.max_batch_rows, cfg.monitor.seed)
    with tempfile.TemporaryDirectory(prefix="finetune-monitor-") as tmp:
        model, name, version = load_verified_version(model_uri, tracking_uri, f"artifacts/{PROFILE_FOLDER}", tmp)
        ref_doc, ref_emb = load_reference(tmp)
    encoder = encoder_from_pyfunc(model, ref_doc["task"])
    ids = task_of(ref_doc["task"]).label_ids(labels, encoder.labels, str(batch), rows) if labels is not None else None
    profile = profile_texts(encoder, texts, ids, ref_doc["bigram_table"])
    result = compare_profiles(ref_doc, ref_emb, profile, cfg.monitor)
    result = {"model": name, "version": version, "input": str(batch), "rows_read": read, **result}
    return result, ref_doc, profile


def run_monitor(cfg: Config, model_uri: str | None, batch: str | Path, out: str | Path, tracking_uri: str
                ) -> dict[str, Any]:
    """Monitor ``batch``; writes ``out``/metrics.json and report.html (whole or not at all), logs the MLflow run.
    Returns the result; its ``drift`` decides the exit status."""
    model_uri = model_uri or f"models:/{cfg.register.model_name}@champion"
    check_output_dir(out, [batch])  # before any work
    result, ref_doc, profile = monitor_batch(cfg, model_uri, tracking_uri, batch)
    with atomic_dir(out, "monitor", [batch]) as tmp:
        write_json(tmp / "metrics.json", result)
        (tmp / "report.html").write_text(render_monitor_report(result, ref_doc, profile), encoding="utf-8")
    run_id = log_monitor_run(tracking_uri, cfg.monitor.experiment, result["model"], result["version"], result,
                             Path(out))
    result["run_id"] = run_id
    if result["drift"]:
        log.warning("drift in %s against %s version %s: %s", redact_text(str(batch)), result["model"],
                    result["version"], ", ".join(result["fired"]))
    else:
        log.info("no drift in %s against %s version %s (%d rows)", redact_text(str(batch)), result["model"],
                 result["version"], result["rows"])
    return result
