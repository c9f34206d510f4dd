"""The five stages as ``run_<verb>(cfg, paths...)``: read inputs, call the pure core, write outputs.

This is the one place where stage I/O happens. The `finetune` CLI (and so dvc.yaml) and the Kubeflow
components both call these functions and nothing else, so the local and cluster paths cannot drift.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .config import Config

log = logging.getLogger("finetune")


class StageFailed(Exception):
    """A stage refused its input: message for the user, no traceback."""


def run_validate(cfg: Config, data: str | Path, out: str | Path, report: str | Path | None = None,
                 expected_md5: str | None = None) -> dict[str, Any]:
    """``data`` is a path or a URI (s3://, dvc://). ``expected_md5``, when given, must match the fetched bytes."""
    import tempfile

    from .io import check_output_dir, write_json
    from .lineage import file_md5
    from .sources import fetch
    from .validate import failure_message, floor_warning, validate, write_splits

    inputs = [] if "://" in str(data) else [data]  # a URI is fetched into a temp folder: nothing local to protect
    check_output_dir(out, inputs)  # before any work: a refused folder fails in a second, not after validation
    with tempfile.TemporaryDirectory(prefix="finetune-data-") as tmp:
        local = fetch(str(data), tmp)
        md5 = file_md5(local) if local.is_file() else None
        if expected_md5 and md5 != expected_md5:
            raise StageFailed(f"{data}: content md5 {md5} differs from the expected {expected_md5}: "
                              f"the data changed since the run was submitted")
        result = validate(local, cfg.data, cfg.validate, workspace=Path.cwd())
    result.report.update(data=str(data), data_md5=md5)
    if report is not None:  # the report is wanted even (especially) when validation fails
        write_json(report, result.report)
    if not result.ok:
        raise StageFailed("validation failed, no splits written:\n" + failure_message(result.report))
    write_splits(result, out, inputs)
    log.info("validation passed: %s", {s: v["rows"] for s, v in result.report["splits"].items()})
    # the floor check is logged, not written: register.floor must not make the splits (and training) stale
    floor = floor_warning(result.report["class_balance"], cfg.register.floor, cfg.register.metric)
    for warning in result.report["warnings"] + ([floor] if floor else []):
        log.warning(warning)
    return result.report


def run_tokenize(cfg: Config, splits: str | Path, out: str | Path) -> dict[str, Any]:
    from .base_model import resolve_base
    from .config import check_model_limits
    from .io import check_output_dir
    from .tokenize import read_splits, tokenize, write_tokens

    check_output_dir(out, [splits])
    base = resolve_base(cfg.model.base)
    check_model_limits(cfg, base)
    frames, labels = read_splits(splits)
    tokens, meta = tokenize(frames, labels, base, cfg.tokenize)
    write_tokens(tokens, meta, out, [splits])
    log.info("tokenized: %s", meta["stats"])
    return meta


def run_train(cfg: Config, tokens: str | Path, model: str | Path, logs: str | Path,
              checkpoints: str | Path | None = None) -> dict[str, Any]:
    from dataclasses import asdict

    from .base_model import resolve_base
    from .config import check_model_limits
    from .io import check_output_dir, check_output_place, write_json
    from .tokenize import read_tokens
    from .train import train, write_history

    base = resolve_base(cfg.model.base)
    check_model_limits(cfg, base)
    # train replaces the model folder (io.atomic_dir) only after training: refuse a wrong --model before it
    check_output_dir(model, [tokens, base, *([checkpoints] if checkpoints else []), logs])
    check_output_place(logs, [tokens, base, model])  # the logs are written by name; still never the project root
    toks, meta = read_tokens(tokens)
    result = train(toks, meta, base, cfg.train, model, checkpoints)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 writes
        return {}
    write_json(Path(model) / "finetune_config.json", cfg.to_dict())  # the resolved config travels with the model
    write_history(result, logs)
    log.info("trained %d steps in this run (steps %d-%d; %d before the resume) in %.1fs (%.1f samples/s), "
             "%d trainable parameters; %s; exported step %d: val accuracy %.4f", result.steps_run,
             result.resumed_from_step + 1, result.steps, result.resumed_from_step, result.seconds,
             result.samples_per_second, result.trainable_parameters, result.stop_reason, result.exported_step,
             result.val_accuracy)
    return {k: v for k, v in asdict(result).items() if k != "history"}


def run_tune(raw: dict[str, Any], tokens: str | Path, out: str | Path,
             tracking: tuple[str, str | None] | None) -> dict[str, Any]:
    """The search of ``tune:`` on the train and val splits (the test split is not even read), trials logged as
    nested MLflow runs under one parent (``tracking``: (uri, artifact location), or None for no MLflow);
    ``out``: best_params.yaml, trials.csv, search.png. ``raw``: params.yaml with any --set applied."""
    import json

    from .base_model import resolve_base
    from .config import check_model_limits, config_from_dict
    from .io import atomic_dir, check_output_dir
    from .redact import redact_uri
    from .tokenize import read_tokens
    from .tracking import project_root
    from .tune import tune, write_outputs

    cfg = config_from_dict(raw)
    base = resolve_base(cfg.model.base)
    check_model_limits(cfg, base)
    check_output_dir(out, [tokens, base])
    toks, meta = read_tokens(tokens, names=("train", "val"))
    storage = project_root(".") / cfg.tune.storage
    logs = []

    def open_log(parent: str | None):
        from .registry import SearchLog

        t = cfg.tune
        logs.append(SearchLog(tracking[0], cfg.register.experiment, tracking[1], parent,
                              tags={"study": t.study, "storage": str(storage)},
                              params={**{f"tune.{k}": v for k, v in vars(t).items() if k != "space"},
                                      "tune.space": json.dumps(t.space)}))
        return logs[-1]

    try:
        result = tune(raw, toks, meta, base, storage, open_log if tracking else None)
        with atomic_dir(out, "tune", [tokens, base]) as tmp:
            write_outputs(result, tmp, cfg.tune.storage)
    except BaseException:
        if logs:
            logs[-1].finish({}, {}, None, "FAILED")
        raise
    if logs:
        logs[-1].finish({f"best_{result.metric}": result.best_value},
                        {"best_trial": str(result.best_number), "best_params": json.dumps(result.best_params)},
                        out, "FINISHED")
        log.info("tune: MLflow parent run %s at %s", logs[-1].parent, redact_uri(tracking[0]))
    log.info("tune: best %s %.4f (trial %d): %s; wrote %s/best_params.yaml", result.metric, result.best_value,
             result.best_number, result.best_params, out)
    return {"best_number": result.best_number, "best_value": result.best_value, "best_params": result.best_params,
            "trials": result.trials, "parent_run": result.parent_run}


def run_tune_trial(raw: dict[str, Any], tokens: str | Path, emit=print) -> dict[str, float]:
    """One trial as Katib runs it: params (+ its --set values) with the tune budget, trained on the train split;
    each validation row printed as ``val_accuracy=0.83`` lines (Katib's StdOut metrics collector reads them)."""
    import tempfile

    from .base_model import resolve_base
    from .config import check_model_limits, config_from_dict
    from .tokenize import read_tokens
    from .train import train
    from .tune import trial_config

    tune_cfg = config_from_dict(raw).tune
    cfg = trial_config(raw, tune_cfg, {})  # the budget; the trial's values are already in raw (--set)
    base = resolve_base(cfg.model.base)
    check_model_limits(cfg, base)
    toks, meta = read_tokens(tokens, names=("train", "val"))

    def line(row: dict[str, float]) -> str:
        return " ".join(f"{k}={v:.6g}" for k, v in row.items() if k != "step")

    with tempfile.TemporaryDirectory(prefix="finetune-trial-") as tmp:
        result = train(toks, meta, base, cfg.train, Path(tmp) / "model", None,
                       on_eval=lambda row: emit(f"{line(row)} step={row['step']}"))
    final = {k: float(v) for k, v in result.val_history[-1].items() if k != "step"}
    emit(line(final))
    return final


def run_evaluate(cfg: Config, model: str | Path, tokens: str | Path, out: str | Path) -> dict[str, Any]:
    from .evaluate import evaluate, write_evaluation
    from .io import check_output_dir
    from .tokenize import read_tokens

    check_output_dir(out, [model, tokens])  # before the work, not after it
    toks, meta = read_tokens(tokens, names=("test",))
    result = evaluate(model, toks["test"], meta, cfg.evaluate, device=cfg.train.device)
    write_evaluation(result, out, [model, tokens])
    log.info("test accuracy %.4f, macro-F1 %.4f", result.metrics["accuracy"], result.metrics["macro_f1"])
    return result.metrics


def run_register(cfg: Config, model: str | Path, evaluation: str | Path, splits: str | Path,
                 train_logs: str | Path | None, out: str | Path, lineage: dict[str, Any],
                 tracking_uri: str, artifact_location: str | None = None,
                 tokens: str | Path | None = None, compress: str | Path | None = None) -> dict[str, Any]:
    """Register the model, then write ``out``/registration.json, model_card.md and report.html; the card goes
    with the model version, the report (and its plots) into the version's MLflow run under ``report/``.
    ``tokens`` (the tokenize output) only adds token-length statistics to the card and report. ``compress``
    (the compress output): its int8 variant, when it passed its gate, is registered as ``<name>-int8`` and
    its figures go into the card and report; registration.json["int8"] says what happened to it."""
    import csv
    from dataclasses import asdict

    import pandas as pd

    from .config import config_from_dict
    from .io import check_output_place, read_json, write_json
    from .lineage import split_hash
    from .modelcard import model_card
    from .redact import redact_values
    from .registry import RegistrationRequest, RegistryError, register, update_model_card

    # register writes its three files by name (deletes nothing), but never into the project root or an input
    check_output_place(out, [p for p in (model, evaluation, splits, train_logs, tokens, compress) if p])
    metrics = read_json(Path(evaluation) / "metrics.json")
    test = pd.read_parquet(Path(splits) / "test.parquet")
    history = []
    artifacts: dict[str, Path] = {"evaluation": Path(evaluation), "validation": Path(splits) / "report.json"}
    if train_logs and Path(train_logs).is_dir():
        with (Path(train_logs) / "loss.csv").open(encoding="utf-8") as fh:
            history = [{"step": int(r["step"]), "loss": float(r["loss"])} for r in csv.DictReader(fh)]
        artifacts["training"] = Path(train_logs)
    # Log the config the model was really trained with (saved beside it), plus this run's register settings.
    trained = Path(model) / "finetune_config.json"
    logged = config_from_dict({**read_json(trained), "register": asdict(cfg.register)}) if trained.is_file() else cfg
    params = redact_values(logged.flat())
    lineage = redact_values(lineage)
    validation = _optional_json(Path(splits) / "report.json")
    token_meta = _optional_json(Path(tokens) / "meta.json") if tokens else None
    token_stats = (token_meta or {}).get("stats")
    compressed = _optional_json(Path(compress) / "metrics.json") if compress else None
    summary = _optional_json(Path(train_logs) / "summary.json") if train_logs else None
    int8: dict[str, Any] = {}  # filled once the variant is registered (or refused): the card shows it

    def card(version: str, run_id: str | None) -> str:
        return model_card(cfg.register.model_name, version, metrics, validation, params, lineage, run_id,
                          token_stats, compressed, int8)

    request = RegistrationRequest.for_model(
        model, metrics, cfg.register, tracking_uri, artifact_location=artifact_location, params=params,
        lineage=lineage, loss_history=history, training=summary, artifacts=artifacts, test_hash=split_hash(test),
        test=(test["text"].tolist(), test["label"].tolist()), max_length=cfg.tokenize.max_length,
        pipeline_run=lineage.get("kfp_run"), model_card=card)
    reg = register(request)
    int8.update(_register_int8(request, reg, compress, compressed))
    final_card = card(reg.version, reg.run_id)
    if compressed is not None:  # the card registered with the version did not know the int8 outcome yet
        try:
            update_model_card(request, reg.version, reg.run_id, final_card)
        except RegistryError as exc:  # the version stands; out/register/model_card.md has the whole card
            log.error("%s", exc)
    out_dict = {**asdict(reg), "int8": int8}
    write_json(Path(out) / "registration.json", out_dict)
    (Path(out) / "model_card.md").write_text(final_card, encoding="utf-8")
    _write_report(out_dict, metrics, validation, token_meta, tokens, summary, history, params, evaluation,
                  Path(out), tracking_uri, compressed)
    log.info("registered %s version %s as @%s: %s", reg.model_name, reg.version, reg.alias, reg.reason)
    return out_dict


def _register_int8(request, reg, folder: str | Path | None, compressed: dict[str, Any] | None) -> dict[str, Any]:
    """The int8 variant of ``reg``, registered when the compress stage passed it; else why not. A registry
    failure here does not undo the fp32 version: it is reported in registration.json and the log (a rerun
    registers the variant)."""
    from .registry import RegistryError, VariantRequest, drop_int8_champion, register_variant

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
    if reg.promoted:  # the new champion has no variant: -int8@champion must not name the old champion's
        try:
            dropped = drop_int8_champion(request)
        except RegistryError as exc:
            dropped = None
            out["reason"] += f"; {exc}"
        if dropped:
            out["reason"] += f"; @champion removed from version {dropped} of the int8 model"
    return out


def _optional_json(path: Path) -> Any:
    from .io import read_json

    return read_json(path) if path.is_file() else None


def _write_report(reg: dict[str, Any], metrics, validation, token_meta, tokens, summary, history, params,
                  evaluation: str | Path, out: Path, tracking_uri: str, compressed: dict[str, Any] | None = None
                  ) -> None:
    """out/report.html, and the report with its plots into the MLflow run under report/."""
    import csv
    import shutil
    import tempfile
    from datetime import datetime, timezone

    from . import plots
    from .registry import upload_report
    from .report import ReportData, render_report

    images = {"training": plots.training_curves(history, (summary or {}).get("val_history")) if history else b""}
    lengths_csv = Path(tokens) / "lengths.csv" if tokens else None
    if lengths_csv and lengths_csv.is_file():
        with lengths_csv.open(encoding="utf-8") as fh:
            rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(fh)]
        images["lengths"] = plots.length_distribution(rows, (token_meta or {}).get("max_length"))
    for key in ("roc", "calibration"):
        png = Path(evaluation) / f"{key}.png"
        images[key] = png.read_bytes() if png.is_file() else b""
    page = render_report(ReportData(reg, metrics, validation, (token_meta or {}).get("stats"), summary, params,
                                    images, datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), compressed))
    (out / "report.html").write_text(page, encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="finetune-report-") as tmp:
        shutil.copy2(out / "report.html", tmp)
        for name, key in (("training_curves.png", "training"), ("token_lengths.png", "lengths")):
            if images.get(key):
                (Path(tmp) / name).write_bytes(images[key])
        upload_report(tracking_uri, reg["run_id"], tmp)


def run_compress(cfg: Config, model: str | Path, tokens: str | Path, out: str | Path) -> dict[str, Any]:
    """ONNX + int8 variants of ``model``, measured on the test split. Never fails the pipeline for a model that
    cannot be exported or an int8 variant past the gate: metrics.json and the log say so."""
    from .compress import compress
    from .io import check_output_dir
    from .tokenize import read_tokens

    check_output_dir(out, [model, tokens])
    toks, meta = read_tokens(tokens, names=("test",))
    result = compress(model, toks["test"], meta, cfg.compress, out, model_name=Path(model).name)
    (log.info if result.passed else log.warning)("compress: %s", result.message)
    if result.exported:
        v = result.metrics["variants"]
        log.info("compress: int8 %.1f MB (%.1fx smaller), %.1f texts/s (%.2fx fp32 PyTorch), p50 %.1f ms",
                 v["onnx_int8"]["size_mb"], v["onnx_int8"]["size_ratio"], v["onnx_int8"]["texts_per_s"],
                 v["onnx_int8"]["speedup"], v["onnx_int8"]["latency_ms_p50"])
    return result.metrics


def run_deploy(registration: str | Path, name: str, namespace: str, artifacts_destination: str,
               api: Any = None) -> dict[str, Any]:
    """Point InferenceService ``namespace/name`` at the version ``registration`` (registration.json) promoted.
    ``api``: a kubernetes CustomObjectsApi; by default the in-cluster one (the pod's service account)."""
    from .deploy import deploy_champion, version_storage_uri
    from .io import read_json

    reg = read_json(Path(registration) / "registration.json" if Path(registration).is_dir() else registration)
    uri = None
    if reg.get("promoted"):
        uri = version_storage_uri(reg["tracking_uri"], reg["model_name"], reg["version"], artifacts_destination)
    if api is None and reg.get("promoted"):
        from kubernetes import client, config

        config.load_incluster_config()
        api = client.CustomObjectsApi()
    result = deploy_champion(reg, uri, api, name, namespace)
    log.info("deploy: %s", result.message)
    return {"changed": result.changed, "message": result.message, "storage_uri": result.storage_uri}
