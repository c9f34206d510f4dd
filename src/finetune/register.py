"""register: log one MLflow run (params, metrics, loss curve, artifacts, lineage), register a model
version, and move the ``champion`` alias only when the gate passes; otherwise alias ``challenger``.

Nothing is half-written: a failure after the version was created deletes that version again, and no
alias moves before the version is complete.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import random
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

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


def gate(value: float, champion_value: float | None, cfg: RegisterConfig, macro_f1: float | None = None) -> Decision:
    """Promote when the metric clears the floor and beats the champion by more than min_improvement.

    A model whose macro-F1 is under ``min_macro_f1`` is refused whatever its primary metric: on a skewed test
    set a model that predicts one class only can have high accuracy.
    """
    m = cfg.metric
    if macro_f1 is not None and macro_f1 < cfg.min_macro_f1:
        return Decision(False, f"macro_f1={macro_f1:.4f} is below min_macro_f1 {cfg.min_macro_f1} "
                               f"(the model ignores some classes)")
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
    except MlflowException as exc:
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None, None
        raise
    info = {"version": str(mv.version), "run_id": mv.run_id}
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


def weights_sha256(model_dir: str | Path) -> dict[str, str]:
    """sha256 of each safetensors file: recorded with the version, checked when the model is loaded.
    Memoised on (path, mtime, size): registration needs it twice (run key, version tags) for ~100 MB of weights."""
    files = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in sorted(Path(model_dir).glob("*.safetensors")))
    return dict(_hash_files(files))


@functools.lru_cache(maxsize=8)
def _hash_files(files: tuple[tuple[str, int, int], ...]) -> tuple[tuple[str, str], ...]:
    out = []
    for path, _, _ in files:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        out.append((Path(path).name, h.hexdigest()))
    return tuple(out)


def register(model_dir: str | Path, metrics: dict[str, Any], cfg: RegisterConfig, *, tracking_uri: str,
             artifact_location: str | None = None, params: dict[str, Any] | None = None,
             lineage: dict[str, Any] | None = None, loss_history: list[dict[str, float]] | None = None,
             artifacts: dict[str, str | Path] | None = None, test_hash: str | None = None,
             test: tuple[list[str], list[str]] | None = None, max_length: int = 512,
             pipeline_run: str | None = None, model_card: Callable[[str, str], str] | None = None) -> Registration:
    """Log, register and gate one model. ``artifacts`` maps artifact sub-folder -> local file or folder.

    ``model_card(version, run_id)`` returns Markdown: logged as the run's ``model_card.md`` and set as the
    version's description before the version counts as complete.

    Idempotent per pipeline run: the run key hashes the weights, the test data, the register settings and
    ``pipeline_run`` (e.g. the KFP run name), so a rerun after an outage finds the finished version instead of
    registering a second one. Transient registry/storage failures are retried ``cfg.retries`` times with
    exponential backoff, then reported.
    """
    if cfg.metric not in metrics:
        raise RegistryError(f"metrics have no '{cfg.metric}' (register.metric); found {sorted(metrics)}")
    # Bound MLflow's own HTTP retries (its default waits minutes); ours wrap the whole registration.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    run_key = hashlib.sha256(json.dumps([weights_sha256(model_dir), test_hash, value_key(metrics), asdict(cfg),
                                         pipeline_run], sort_keys=True).encode()).hexdigest()[:32]
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(tracking_uri):  # restore the caller's tracking URI afterwards: no global side effect
        return _register_with_retries(model_dir, metrics, cfg, tracking_uri, artifact_location, params, lineage,
                                      loss_history, artifacts, test_hash, test, max_length, run_key, model_card)


def _register_with_retries(model_dir, metrics, cfg: RegisterConfig, tracking_uri, artifact_location, params, lineage,
                           loss_history, artifacts, test_hash, test, max_length, run_key, model_card) -> Registration:
    delay = cfg.retry_backoff
    for attempt in range(cfg.retries + 1):
        try:
            return _register_once(model_dir, metrics, cfg, tracking_uri, artifact_location, params or {},
                                  dict(lineage or {}), loss_history or [], artifacts or {}, test_hash, test,
                                  max_length, run_key, model_card)
        except RegistryUnavailable as exc:
            if attempt == cfg.retries:
                raise RegistryError(f"giving up after {cfg.retries + 1} attempt(s): {exc}") from exc
            log.warning("registry attempt %d failed (%s); retrying in %.1fs", attempt + 1, exc, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def value_key(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics.get(k) for k in ("accuracy", "macro_f1", "loss")}


class RegistryUnavailable(RegistryError):
    """The tracking server or its artifact store failed: worth retrying."""


def _existing(client, cfg: RegisterConfig, run_key: str | None):
    """The finished version of this pipeline run, if any, after deleting unfinished ones (no 'complete' tag)."""
    if not run_key:
        return None
    done = None
    for mv in client.search_model_versions(f"name = '{cfg.model_name}'"):
        tags = mv.tags or {}
        if tags.get("run_key") != run_key:
            continue
        if tags.get("complete") == "true":
            done = done or client.get_model_version(cfg.model_name, mv.version)
        else:
            client.delete_model_version(cfg.model_name, mv.version)
    return done


LOCK_TAG = "finetune.alias_lock"


@contextlib.contextmanager
def _alias_lock(client, name: str, ttl: float = 120.0, settle: float = 0.5):
    """Serialize alias moves across concurrent pipelines with a lease kept as a registered-model tag.

    MLflow has no compare-and-set, so a writer sets the tag, waits ``settle`` seconds and reads it back: of
    two writers racing, only the last one's value survives and only that writer proceeds. A crashed holder's
    lease expires after ``ttl`` seconds.
    """
    owner = uuid.uuid4().hex
    deadline = time.time() + 2 * ttl
    while True:
        held = (client.get_registered_model(name).tags or {}).get(LOCK_TAG, "")
        holder, _, expiry = held.partition("@")
        if not holder or float(expiry or 0) < time.time():
            client.set_registered_model_tag(name, LOCK_TAG, f"{owner}@{time.time() + ttl}")
            time.sleep(settle)
            if (client.get_registered_model(name).tags or {}).get(LOCK_TAG, "").startswith(owner + "@"):
                break
        if time.time() > deadline:
            raise RegistryUnavailable(f"could not take the alias lock of {name} (held by {holder})")
        time.sleep(settle * (1 + random.random()))
    try:
        yield
    finally:
        try:
            client.delete_registered_model_tag(name, LOCK_TAG)
        except Exception:  # the lease expires by itself
            log.warning("could not release the alias lock of %s", name)


def _move_alias(client, cfg: RegisterConfig, version: str, value: float, macro_f1: float | None, test_hash, test
                ) -> tuple[Decision, dict[str, Any] | None]:
    """Under the lock: gate against the champion as it is *now* (another pipeline may have promoted since this
    one started), then move the alias."""
    with _alias_lock(client, cfg.model_name):
        champ_info, champ_value = champion_score(client, cfg, test_hash, test)
        decision = gate(value, champ_value, cfg, macro_f1)
        time.sleep(float(os.environ.get("FINETUNE_ALIAS_DELAY", "0")))  # fault injection: widen the race window
        client.set_registered_model_alias(cfg.model_name, CHAMPION if decision.promote else CHALLENGER, version)
    return decision, champ_info


def _log_and_register(client, model_dir, metrics, cfg: RegisterConfig, exp_id, params, lineage, loss_history,
                      artifacts, test_hash, max_length, run_key, model_card=None) -> tuple[str, str]:
    """One MLflow run + one model version tagged complete, or nothing: a failure deletes the version."""
    import mlflow
    from mlflow.entities import Metric

    hashes = weights_sha256(model_dir)
    version = None
    try:
        with mlflow.start_run(experiment_id=exp_id) as run:
            mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
            flat = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            for lab, row in (metrics.get("per_class") or {}).items():
                flat.update({f"{k}_{lab}": float(v) for k, v in row.items()})
            mlflow.log_metrics(flat)
            stamp = int(time.time() * 1000)
            hist = [Metric("train_loss", h["loss"], stamp, int(h["step"])) for h in loss_history]
            for i in range(0, len(hist), 1000):
                client.log_batch(run.info.run_id, metrics=hist[i:i + 1000])
            mlflow.set_tags({f"lineage.{k}": str(v) for k, v in lineage.items()})
            for sub, path in artifacts.items():
                p = Path(path)
                (mlflow.log_artifacts if p.is_dir() else mlflow.log_artifact)(str(p), sub)
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(PYFUNC_CODE), artifacts={"model": str(model_dir)},
                model_config={"max_length": max_length, "weights_sha256": hashes},
                # (texts, params): MLflow infers the params schema from it, so predict(..., params=
                # {"probabilities": True}) and the serving endpoint's "params" reach the model
                input_example=(["An example review."], {"probabilities": False}),
                pip_requirements=_pip_requirements())
            tags = {"test_data_hash": test_hash or "", "run_id": run.info.run_id, "run_key": run_key or "",
                    "weights_sha256": ",".join(f"{k}={v}" for k, v in hashes.items())}
            tags.update({k: str(metrics[k]) for k in ("accuracy", "macro_f1") if k in metrics})
            version = str(mlflow.register_model(info.model_uri, cfg.model_name, tags=tags).version)
            if model_card is not None:
                card = model_card(version, run.info.run_id)
                mlflow.log_text(card, "model_card.md")
                client.update_model_version(cfg.model_name, version, description=card)
            client.set_model_version_tag(cfg.model_name, version, "complete", "true")
            return version, run.info.run_id
    except Exception as exc:
        if version is not None:  # never leave a version behind half-made
            try:
                client.delete_model_version(cfg.model_name, version)
            except Exception:  # registry gone mid-way: the next attempt's _existing() removes it
                log.warning("could not delete unfinished version %s", version)
        raise RegistryUnavailable(f"registering {cfg.model_name} failed: {type(exc).__name__}: {exc}") from exc


def _register_once(model_dir, metrics, cfg: RegisterConfig, tracking_uri, artifact_location, params, lineage,
                   loss_history, artifacts, test_hash, test, max_length, run_key, model_card=None) -> Registration:
    from mlflow import MlflowClient

    value = float(metrics[cfg.metric])
    client = MlflowClient(tracking_uri)
    try:  # fail early and clearly when the registry is unreachable, before anything is written
        exp = client.get_experiment_by_name(cfg.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(cfg.experiment, artifact_location)
        done = _existing(client, cfg, run_key)
    except Exception as exc:
        raise RegistryUnavailable(f"MLflow tracking server {tracking_uri} is unreachable or refused: {exc}") from exc
    if done is not None and set(done.aliases or []) & {CHAMPION, CHALLENGER}:
        alias = CHAMPION if CHAMPION in done.aliases else CHALLENGER
        log.info("pipeline run %s is already registered as version %s; nothing to do", run_key, done.version)
        return Registration(cfg.model_name, str(done.version), alias, alias == CHAMPION,
                            f"already registered: {(done.tags or {}).get('gate', '')}", cfg.metric, value, None,
                            done.run_id, tracking_uri, f"models:/{cfg.model_name}/{done.version}", lineage)
    if done is not None:
        version, run_id = str(done.version), done.run_id
    else:
        version, run_id = _log_and_register(client, model_dir, metrics, cfg, exp_id, params, lineage, loss_history,
                                            artifacts, test_hash, max_length, run_key, model_card)
    try:  # the alias moves last, once the version is complete
        decision, champ_info = _move_alias(client, cfg, version, value, metrics.get("macro_f1"), test_hash, test)
        client.set_model_version_tag(cfg.model_name, version, "gate", decision.reason)
        client.set_tag(run_id, "gate.promoted", str(decision.promote))
        client.set_tag(run_id, "gate.reason", decision.reason)
        client.set_tag(run_id, "model_version", version)
    except RegistryError:
        raise
    except Exception as exc:
        raise RegistryUnavailable(f"moving the alias of {cfg.model_name} v{version} failed: {exc}") from exc
    return Registration(cfg.model_name, version, CHAMPION if decision.promote else CHALLENGER, decision.promote,
                        decision.reason, cfg.metric, value, champ_info, run_id, tracking_uri,
                        f"models:/{cfg.model_name}/{version}", lineage)


def _pip_requirements() -> list[str]:
    # Explicit, so MLflow does not infer requirements by importing around (which fails offline).
    from importlib.metadata import version

    return [f"mlflow=={version('mlflow')}", f"torch=={version('torch').split('+')[0]}",
            f"transformers=={version('transformers')}", f"safetensors=={version('safetensors')}"]


def as_dict(reg: Registration) -> dict[str, Any]:
    return asdict(reg)
