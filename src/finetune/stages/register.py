"""register: log the run, register the model version, let the gate move the champion alias,
register the int8 variant, and write the run report (registration.json, report.html)."""

from __future__ import annotations

import csv
import logging
import shutil
import tempfile
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from finetune.common.base_model import base_facts
from finetune.common.config import Config
from finetune.common.files import read_json, write_json
from finetune.common.lineage import split_hash
from finetune.common.outputs import check_output_place
from finetune.common.params import config_from_dict
from finetune.common.redact import redact_values
from finetune.monitoring.profiling import PROFILE_FOLDER, reference_profile
from finetune.monitoring.tasks import TASKS as MONITORED_TASKS
from finetune.registry.binding import check_inputs
from finetune.registry.cards import update_model_card, upload_report
from finetune.registry.request import RegistrationRequest, RegistryError
from finetune.registry.transaction import register
from finetune.registry.variants import VariantRequest, record_serving, register_variant
from finetune.reporting import plots
from finetune.reporting.model_card import model_card
from finetune.reporting.report import ReportData, render_report
from finetune.stages import StageFailed
from finetune.tasks import task_for

log = logging.getLogger("finetune")


def run_register(cfg: Config, model: str | Path, evaluation: str | Path, splits: str | Path,
                 train_logs: str | Path | None, out: str | Path, lineage: dict[str, Any],
                 tracking_uri: str, artifact_location: str | None = None,
                 tokens: str | Path | None = None, compress: str | Path | None = None) -> dict[str, Any]:
    """Register the model, then write ``out``/registration.json, model_card.md and report.html; the card goes
    with the model version, the report (and its plots) into the version's MLflow run under ``report/``.
    ``tokens`` (the tokenize output) only adds token-length statistics to the card and report. ``compress``
    (the compress output): its int8 variant, when it passed its gate, is registered as ``<name>-int8`` and
    its figures go into the card and report; registration.json["int8"] says what happened to it."""
    # register writes its three files by name (deletes nothing), but never into the project root or an input
    check_output_place(out, [p for p in (model, evaluation, splits, train_logs, tokens, compress) if p])
    gate_metrics = task_for(cfg.task).GATE_METRICS
    if cfg.register.metric not in gate_metrics:  # before anything is logged
        raise StageFailed(f"register.metric = {cfg.register.metric!r}: task {cfg.task} gates on one of "
                          f"{', '.join(gate_metrics)} (e.g. -S register.metric={gate_metrics[0]})")
    metrics = read_json(Path(evaluation) / "metrics.json")
    test = pd.read_parquet(Path(splits) / "test.parquet")
    history, artifacts = _training_history(evaluation, splits, train_logs)
    params = _logged_params(cfg, model)
    lineage = redact_values(lineage)
    validation = _optional_json(Path(splits) / "report.json")
    token_meta = _optional_json(Path(tokens) / "meta.json") if tokens else None
    token_stats = (token_meta or {}).get("stats")
    compressed = _optional_json(Path(compress) / "metrics.json") if compress else None
    check_inputs(model, evaluation, metrics, compress, compressed)  # before anything is logged
    summary = _optional_json(Path(train_logs) / "summary.json") if train_logs else None
    base = base_facts(model, cfg.model.base, summary)
    int8: dict[str, Any] = {}  # filled once the variant is registered (or refused): the card shows it

    def card(version: str, run_id: str | None) -> str:
        return model_card(cfg.register.model_name, version, metrics, validation, params, lineage, run_id,
                          token_stats, compressed, int8, base)

    with tempfile.TemporaryDirectory(prefix="finetune-profile-") as tmp:  # the monitor's reference, logged in the model
        profile = _reference_profile(cfg, model, test, Path(tmp) / PROFILE_FOLDER)
        request = RegistrationRequest.for_model(
            model, metrics, cfg.register, tracking_uri, artifact_location=artifact_location, params=params,
            lineage=lineage, loss_history=history, training=summary, artifacts=artifacts, test_hash=split_hash(test),
            test=(test["text"].tolist(), test["label"].tolist()), max_length=cfg.tokenize.max_length,
            model_card=card, reference_profile=profile)
        reg = register(request)
    int8.update(_register_int8(request, reg, compress, compressed))
    serving = _register_serving(request, reg, compress, compressed, int8)
    final_card = card(reg.version, reg.run_id)
    if compressed is not None:  # the card registered with the version did not know the int8 outcome yet
        try:
            update_model_card(request, reg.version, reg.run_id, final_card)
        except RegistryError as exc:  # the version stands; out/register/model_card.md has the whole card
            log.error("%s", exc)
    out_dict = {**asdict(reg), "int8": int8, "serving": serving}
    write_json(Path(out) / "registration.json", out_dict)
    (Path(out) / "model_card.md").write_text(final_card, encoding="utf-8")
    _write_report(out_dict, metrics, validation, token_meta, tokens, summary, history, params, evaluation,
                  Path(out), tracking_uri, compressed)
    log.info("registered %s version %s as @%s: %s", reg.model_name, reg.version, reg.alias, reg.reason)
    return out_dict


def _training_history(evaluation: str | Path, splits: str | Path,
                      train_logs: str | Path | None) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """The loss curve (when train's logs are at hand) and the folders logged as run artifacts."""
    history = []
    artifacts: dict[str, Path] = {"evaluation": Path(evaluation), "validation": Path(splits) / "report.json"}
    if train_logs and Path(train_logs).is_dir():
        with (Path(train_logs) / "loss.csv").open(encoding="utf-8") as fh:
            history = [{"step": int(r["step"]), "loss": float(r["loss"])} for r in csv.DictReader(fh)]
        artifacts["training"] = Path(train_logs)
    return history, artifacts


def _logged_params(cfg: Config, model: str | Path) -> dict[str, Any]:
    """The config the model was really trained with (saved beside it), plus this run's register settings;
    credentials redacted."""
    trained = Path(model) / "finetune_config.json"
    logged = config_from_dict({**read_json(trained), "register": asdict(cfg.register)}) if trained.is_file() else cfg
    return redact_values(logged.flat())


def _register_int8(request, reg, folder: str | Path | None, compressed: dict[str, Any] | None) -> dict[str, Any]:
    """The int8 variant of ``reg``, registered when the compress stage passed it; else why not. A registry
    failure here does not undo the fp32 version: it is reported in registration.json and the log (a rerun
    registers the variant)."""

    why = None
    if compressed is None:
        why = "no compress output was given" if not folder else f"{folder}/metrics.json does not exist"
    elif not (compressed.get("exported") and compressed.get("int8_passed")):
        why = compressed.get("message", "not passed")
    else:
        try:
            result = register_variant(VariantRequest(request, reg, Path(folder), compressed))
            log.info("registered %s version %s as @%s", result["model_name"], result["version"], result["alias"])
            return result
        except RegistryError as exc:
            log.error("the int8 variant was not registered: %s", exc)
            why = f"registering it failed: {exc}"
    out = {"registered": False, "reason": f"no int8 variant: {why}"}
    # the leased step removed -int8@champion when the new champion has no variant (registry.aliases)
    dropped = (reg.int8_aliases.get("champion") or {}) if reg.promoted else {}
    if dropped.get("from") and not dropped.get("to"):
        out["reason"] += f"; @champion removed from version {dropped['from']} of the int8 model"
    return out


def _register_serving(request, reg, folder: str | Path | None, compressed: dict[str, Any] | None,
                      int8: dict[str, Any]) -> dict[str, Any]:
    """What serves ``reg``: compress's choice (metrics.json ``serving``), registered when it is a student's or the
    teacher's fp32 ONNX file (the teacher's int8 is the int8 variant above), else the fp32 version itself, and
    recorded on the fp32 version, so ``models:/<name>-serving@champion`` loads it. Like the int8 variant, a registry
    failure leaves the fp32 version standing (served, and said)."""
    chosen = (compressed or {}).get("serving") or {}
    variant, why = chosen.get("variant", "pytorch_fp32"), chosen.get("reason", "compress chose no variant")
    served = {"model_name": reg.model_name, "version": reg.version, "variant": "pytorch_fp32"}
    try:
        if variant == "onnx_int8" and int8.get("registered"):
            served = {k: int8[k] for k in ("model_name", "version")} | {"variant": variant}
        elif variant == "onnx_int8":
            why = f"{variant} was chosen but not registered ({int8.get('reason')}): the fp32 model serves"
        elif variant != "pytorch_fp32":
            got = register_variant(VariantRequest(request, reg, Path(folder), compressed, variant, chosen["file"]))
            served = {k: got[k] for k in ("model_name", "version", "variant")}
        record_serving(request, reg, f"{served['model_name']}/{served['version']}", served["variant"], why)
    except RegistryError as exc:
        log.error("the serving variant %s was not registered: %s", variant, exc)
        return {**served, "recorded": False, "reason": f"{variant} not registered ({exc}): the fp32 model serves"}
    log.info("serving %s v%s (%s): %s", served["model_name"], served["version"], served["variant"], why)
    return {**served, "recorded": True, "reason": why,
            "model_uri": f"models:/{reg.model_name}-serving/{reg.version}"}


def _optional_json(path: Path) -> Any:

    return read_json(path) if path.is_file() else None


def _write_report(reg: dict[str, Any], metrics, validation, token_meta, tokens, summary, history, params,
                  evaluation: str | Path, out: Path, tracking_uri: str, compressed: dict[str, Any] | None = None
                  ) -> None:
    """out/report.html, and the report with its plots into the MLflow run under report/."""


    images = {"training": plots.training_curves(history, (summary or {}).get("val_history")) if history else b""}
    lengths_csv = Path(tokens) / "lengths.csv" if tokens else None
    if lengths_csv and lengths_csv.is_file():
        with lengths_csv.open(encoding="utf-8") as fh:
            rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(fh)]
        images["lengths"] = plots.length_distribution(rows, (token_meta or {}).get("max_length"))
    for key in ("roc", "calibration"):
        png = Path(evaluation) / f"{key}.png"
        images[key] = png.read_bytes() if png.is_file() else b""
    if (compressed or {}).get("variants"):  # the front: accuracy against texts/s, the served variant starred
        images["front"] = plots.serving_front(compressed["variants"], (compressed.get("serving") or {}).get("variant"))
    page = render_report(ReportData(reg, metrics, validation, (token_meta or {}).get("stats"), summary, params,
                                    images, datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), compressed))
    (out / "report.html").write_text(page, encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="finetune-report-") as tmp:
        shutil.copy2(out / "report.html", tmp)
        for name, key in (("training_curves.png", "training"), ("token_lengths.png", "lengths"),
                          ("serving_front.png", "front")):
            if images.get(key):
                (Path(tmp) / name).write_bytes(images[key])
        upload_report(tracking_uri, reg["run_id"], tmp)


def _reference_profile(cfg: Config, model: str | Path, test: pd.DataFrame, out: Path) -> Path | None:
    """The monitor's reference profile of the test split; None (said in the log) for a task it cannot profile yet."""
    if cfg.task not in MONITORED_TASKS:
        log.warning("no reference profile for finetune monitor: it profiles task %s, not %r",
                    ", ".join(MONITORED_TASKS), cfg.task)
        return None
    return reference_profile(model, test["text"].tolist(), test["label"].tolist(), cfg.tokenize.max_length,
                             cfg.monitor.reference_rows, out, cfg.monitor.seed, cfg.task)
