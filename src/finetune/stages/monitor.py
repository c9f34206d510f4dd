"""monitor: load a registered version verified (with its reference profile), profile a batch of texts the same
way, run the drift tests, write out/monitor/metrics.json and report.html, and log the check as an MLflow run
tagged with the version. The exit status tells cron, CI and pipelines what happened: 0 no drift, 3 drift."""

from __future__ import annotations

import logging
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from finetune.common.coercion import ConfigError
from finetune.common.config import Config
from finetune.common.files import write_json
from finetune.common.outputs import atomic_dir, check_output_dir
from finetune.common.redact import redact_text
from finetune.monitoring.batch import log_has_texts, read_batch, read_logged_predictions
from finetune.monitoring.drift import compare_profiles
from finetune.monitoring.profiling import PROFILE_FOLDER, Profile, encoder_from_pyfunc, load_reference, profile_texts
from finetune.monitoring.report import render_monitor_report
from finetune.monitoring.tasks import MonitorInputError, task_of
from finetune.registry.loading import load_verified_version
from finetune.registry.monitor_runs import int8_parent, log_monitor_run

log = logging.getLogger("finetune")

DRIFT_EXIT = 3  # cron, CI and the KFP loop branch on it


def parse_since(since: str | None) -> float | None:
    """``--since`` (ISO 8601, UTC when it names no zone) as epoch seconds."""
    if since is None:
        return None
    try:
        when = datetime.fromisoformat(since)
    except ValueError:
        raise ConfigError(f"--since {since!r}: not an ISO 8601 date or time (e.g. 2026-12-03 or "
                          f"2026-12-03T02:30)") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _refuse_int8(model_uri: str, tracking_uri: str) -> None:
    """The int8 ONNX variant has no embeddings and no reference profile: the monitor checks its fp32 parent."""
    parent = int8_parent(model_uri, tracking_uri)
    if parent:
        name, _, version = parent.rpartition("/")
        alias = model_uri.partition("@")[2]
        fp32 = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
        raise MonitorInputError(f"{model_uri}: the int8 ONNX variant of {parent} has no embeddings or reference "
                                f"profile; monitor the fp32 version instead: --model {fp32}")


def _logged_predictions(cfg: Config, batch: Path, ref_doc: dict, since: float | None) -> tuple[Profile, int]:
    """A request log without texts: the served probabilities only (prediction tests; no text features, no
    embeddings)."""
    probs, read = read_logged_predictions(batch, ref_doc["labels"], cfg.monitor.max_batch_rows, cfg.monitor.seed,
                                          since)
    features = task_of(ref_doc["task"]).prediction_features(probs)
    return Profile(features, probs, np.zeros((0, 1), dtype=np.float16), None), read


def monitor_batch(cfg: Config, model_uri: str, tracking_uri: str, batch: str | Path, since: str | None = None
                  ) -> tuple[dict, Any, Any]:
    """(result, reference profile, batch profile) of ``batch`` against the version ``model_uri`` names now."""
    start = parse_since(since)
    texts_given = not Path(batch).is_dir() or log_has_texts(batch)
    if texts_given:  # read (and refuse) the batch before the model loads
        texts, labels, rows, read = read_batch(batch, cfg.data.text_column, cfg.data.label_column,
                                               cfg.monitor.max_batch_rows, cfg.monitor.seed, start)
    _refuse_int8(model_uri, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="finetune-monitor-") as tmp:
        model, name, version = load_verified_version(model_uri, tracking_uri, f"artifacts/{PROFILE_FOLDER}", tmp)
        ref_doc, ref_emb = load_reference(tmp)
    if texts_given:
        encoder = encoder_from_pyfunc(model, ref_doc["task"])
        task = task_of(ref_doc["task"])
        ids = (task.label_ids(labels, encoder.labels, str(batch), rows, cfg.data.label_separator)
               if labels is not None else None)
        profile = profile_texts(encoder, texts, ids, ref_doc["bigram_table"])
    else:
        profile, read = _logged_predictions(cfg, Path(batch), ref_doc, start)
    result = compare_profiles(ref_doc, ref_emb, profile, cfg.monitor)
    result = {"model": name, "version": version, "input": str(batch), "rows_read": read, **result}
    return result, ref_doc, profile


def run_monitor(cfg: Config, model_uri: str | None, batch: str | Path, out: str | Path, tracking_uri: str,
                since: str | None = None) -> dict[str, Any]:
    """Monitor ``batch``; writes ``out``/metrics.json and report.html (whole or not at all), logs the MLflow run.
    Returns the result; its ``drift`` decides the exit status."""
    model_uri = model_uri or f"models:/{cfg.register.model_name}@champion"
    check_output_dir(out, [batch])  # before any work
    result, ref_doc, profile = monitor_batch(cfg, model_uri, tracking_uri, batch, since)
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
