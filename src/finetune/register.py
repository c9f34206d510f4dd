"""register: log one MLflow run (params, metrics, loss curve, artifacts, lineage), register a model
version, and move the ``champion`` alias only when the gate passes; otherwise alias ``challenger``.

Nothing is half-written: a failure after the version was created deletes that version again, and no
alias moves before the version is complete.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import RegisterConfig

log = logging.getLogger(__name__)
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
CHAMPION, CHALLENGER = "champion", "challenger"


class RegistryError(RuntimeError):
    pass


@dataclass
class Decision:
    promote: bool
    reason: str


@dataclass
class Registration:
    model_name: str
    version: str
    alias: str
    promoted: bool
    reason: str
    metric: str
    value: float
    champion_before: dict[str, Any] | None
    run_id: str
    tracking_uri: str
    model_uri: str = ""
    lineage: dict[str, Any] = field(default_factory=dict)


def gate(value: float, champion_value: float | None, cfg: RegisterConfig) -> Decision:
    """Promote when the metric clears the floor and beats the champion by more than min_improvement."""
    m = cfg.metric
    if value < cfg.floor:
        return Decision(False, f"{m}={value:.4f} is below the floor {cfg.floor}")
    if champion_value is None:
        return Decision(True, f"no champion yet and {m}={value:.4f} clears the floor {cfg.floor}")
    if value > champion_value + cfg.min_improvement:
        return Decision(True, f"{m}={value:.4f} beats the champion's {champion_value:.4f} by more than "
                              f"{cfg.min_improvement}")
    return Decision(False, f"{m}={value:.4f} does not beat the champion's {champion_value:.4f} by more than "
                           f"{cfg.min_improvement}")


def _score_labels(metric: str, y_true: list[str], y_pred: list[str]) -> float:
    import numpy as np

    t, p = np.asarray(y_true), np.asarray(y_pred)
    if metric == "accuracy":
        return float((t == p).mean())
    f1s = []
    for lab in sorted(set(y_true)):
        tp = float(((t == lab) & (p == lab)).sum())
        prec = tp / max(1.0, float((p == lab).sum()))
        rec = tp / max(1.0, float((t == lab).sum()))
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return float(np.mean(f1s))


def champion_score(client, cfg: RegisterConfig, test_hash: str | None,
                   test: tuple[list[str], list[str]] | None) -> tuple[dict[str, Any] | None, float | None]:
    """The current champion and its metric on *our* test data: its logged value when it was evaluated on the
    same test split (equal content hash), else it is re-scored on our test texts."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(cfg.model_name, CHAMPION)
    except MlflowException:
        return None, None
    info = {"version": mv.version, "run_id": mv.run_id}
    tags = mv.tags or {}
    if test_hash and tags.get("test_data_hash") == test_hash and cfg.metric in tags:
        info["source"] = "logged on the same test data"
        info["value"] = float(tags[cfg.metric])
        return info, info["value"]
    if test is None:
        raise RegistryError(f"champion v{mv.version} was evaluated on other test data and no test split was "
                            f"given to re-score it")
    import mlflow.pyfunc

    texts, labels = test
    preds = mlflow.pyfunc.load_model(f"models:/{cfg.model_name}/{mv.version}").predict(list(texts))
    info["source"] = "re-scored on this run's test data"
    info["value"] = _score_labels(cfg.metric, labels, list(preds))
    return info, info["value"]


def register(model_dir: str | Path, metrics: dict[str, Any], cfg: RegisterConfig, *, tracking_uri: str,
             artifact_location: str | None = None, params: dict[str, Any] | None = None,
             lineage: dict[str, Any] | None = None, loss_history: list[dict[str, float]] | None = None,
             artifacts: dict[str, str | Path] | None = None, test_hash: str | None = None,
             test: tuple[list[str], list[str]] | None = None, max_length: int = 512) -> Registration:
    """Log, register and gate one model. ``artifacts`` maps artifact sub-folder -> local file or folder."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    if cfg.metric not in metrics:
        raise RegistryError(f"metrics have no '{cfg.metric}' (register.metric); found {sorted(metrics)}")
    value = float(metrics[cfg.metric])
    lineage = dict(lineage or {})
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    try:  # fail early and clearly when the registry is unreachable, before anything is written
        exp = client.get_experiment_by_name(cfg.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(cfg.experiment, artifact_location)
    except Exception as exc:
        raise RegistryError(f"MLflow tracking server {tracking_uri} is unreachable or refused: {exc}") from exc

    champ_info, champ_value = champion_score(client, cfg, test_hash, test)
    decision = gate(value, champ_value, cfg)
    version = None
    with mlflow.start_run(experiment_id=exp_id) as run:
        try:
            mlflow.log_params({k: str(v)[:6000] for k, v in (params or {}).items()})
            flat = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            for lab, row in (metrics.get("per_class") or {}).items():
                flat.update({f"{k}_{lab}": float(v) for k, v in row.items()})
            mlflow.log_metrics(flat)
            stamp = int(time.time() * 1000)
            hist = [Metric("train_loss", h["loss"], stamp, int(h["step"])) for h in loss_history or []]
            for i in range(0, len(hist), 1000):
                client.log_batch(run.info.run_id, metrics=hist[i:i + 1000])
            mlflow.set_tags({f"lineage.{k}": str(v) for k, v in lineage.items()})
            for sub, path in (artifacts or {}).items():
                p = Path(path)
                (mlflow.log_artifacts if p.is_dir() else mlflow.log_artifact)(str(p), sub)
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(PYFUNC_CODE), artifacts={"model": str(model_dir)},
                model_config={"max_length": max_length},
                pip_requirements=_pip_requirements())
            mv = mlflow.register_model(info.model_uri, cfg.model_name,
                                       tags={"test_data_hash": test_hash or "", cfg.metric: str(value),
                                             "run_id": run.info.run_id})
            version = mv.version
            client.set_model_version_tag(cfg.model_name, version, "gate", decision.reason)
            mlflow.set_tags({"gate.promoted": str(decision.promote), "gate.reason": decision.reason,
                             "model_version": version})
            # The alias moves last: once it points at the version, everything else is in place.
            client.set_registered_model_alias(cfg.model_name, CHAMPION if decision.promote else CHALLENGER, version)
        except Exception as exc:
            if version is not None:  # never leave a version behind that the gate did not finish with
                try:
                    client.delete_model_version(cfg.model_name, version)
                except Exception:  # registry gone mid-way: report the original error
                    log.warning("could not delete half-registered version %s", version)
            raise RegistryError(f"registering {cfg.model_name} failed: {exc}") from exc
    return Registration(cfg.model_name, str(version), CHAMPION if decision.promote else CHALLENGER,
                        decision.promote, decision.reason, cfg.metric, value, champ_info, run.info.run_id,
                        tracking_uri, f"models:/{cfg.model_name}/{version}", lineage)


def _pip_requirements() -> list[str]:
    # Explicit, so MLflow does not infer requirements by importing around (which fails offline).
    from importlib.metadata import version

    return [f"mlflow=={version('mlflow')}", f"torch=={version('torch').split('+')[0]}",
            f"transformers=={version('transformers')}", f"safetensors=={version('safetensors')}"]


def as_dict(reg: Registration) -> dict[str, Any]:
    return asdict(reg)
