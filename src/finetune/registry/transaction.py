"""registry: the one module that talks to MLflow. It logs the run, registers the model version with its digests,
label set and task, moves the ``champion``/``challenger`` alias under a lease, uploads the run report, and
loads registered models only after checking every file against the registry.

Nothing is half-written: the label-set check runs before anything is logged, a failure after the version was
created deletes that version again, and no alias moves before the version is complete. Registration is
idempotent per pipeline run and retried on transient failures. Register runs of killed processes (RUNNING
with a stale heartbeat) are marked FAILED and their artifacts removed by the next registration.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric

from finetune.common.redact import redact_uri, redact_values
from finetune.registry import aliases, integrity
from finetune.registry.cards import card_description
from finetune.registry.gate import Decision, LineageMismatch, ModelKind, gate, same_lineage, score_predictions
from finetune.registry.hygiene import HEARTBEAT_TAG, STAGE_TAG, heartbeat, reap_stale_runs, remove_artifacts
from finetune.registry.lease import alias_lock
from finetune.registry.loading import load_verified
from finetune.registry.request import (
    CHALLENGER,
    CHAMPION,
    PYFUNC_CODE,
    LineageRefused,
    Registration,
    RegistrationRequest,
    RegistryError,
    RegistryUnavailable,
    experiment_id,
    pip_requirements,
    pyfunc_code_paths,
    training_metrics,
)
from finetune.registry.store import current_champion, delete_version, stored_digests, with_retries

log = logging.getLogger(__name__)


def register(req: RegistrationRequest) -> Registration:
    """Log, register and gate one model; transient registry/storage failures are retried ``cfg.retries`` times
    with exponential backoff, then reported. A champion with another label set or task stops it (LineageMismatch
    as a RegistryError) unless ``register.new_lineage``."""
    cfg = req.cfg
    if cfg.metric not in req.metrics:
        raise RegistryError(f"metrics have no '{cfg.metric}' (register.metric); found {sorted(req.metrics)}")
    # Bound MLflow's own HTTP retries (its default waits minutes); ours wrap the whole registration.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    run_key = req.run_key()
    return with_retries(cfg, req.tracking_uri, lambda: _register_once(req, run_key))




def _register_once(req: RegistrationRequest, run_key: str) -> Registration:

    cfg, safe_uri = req.cfg, redact_uri(req.tracking_uri)
    try:  # fail early and clearly when the registry is unreachable, before anything is written
        client = MlflowClient(req.tracking_uri)  # opens (and may find locked) an embedded store
        exp_id = experiment_id(client, cfg.experiment, req.artifact_location)
        reap_stale_runs(client, exp_id, cfg.model_name)
        done = _existing(client, cfg.model_name, run_key)
        champion = current_champion(client, cfg.model_name)
    except Exception as exc:
        raise RegistryUnavailable(f"MLflow tracking server {safe_uri} is unreachable or refused: {exc}") from exc
    lineage = redact_values(req.lineage)
    if done is not None and set(done.aliases or []) & {CHAMPION, CHALLENGER}:
        alias = CHAMPION if CHAMPION in done.aliases else CHALLENGER
        log.info("pipeline run %s is already registered as version %s; nothing to do", run_key, done.version)
        with alias_lock(client, cfg.model_name, done.run_id) as lease:  # repair what a killed run left
            int8 = aliases.sync_variant_aliases(client, cfg.model_name, lease)
        return Registration(cfg.model_name, str(done.version), alias, alias == CHAMPION,
                            f"already registered: {(done.tags or {}).get('gate', '')}", cfg.metric, req.value, None,
                            done.run_id, safe_uri, f"models:/{cfg.model_name}/{done.version}", lineage, int8)
    if champion is not None:
        _check_lineage(req, champion)  # before anything is logged: a refused model leaves no trace
    if done is not None:
        version, run_id = str(done.version), done.run_id
    else:
        version, run_id = _log_and_register(client, req, exp_id, run_key)
    try:  # the alias moves last, once the version is complete
        decision, champ_info, int8 = _move_alias(client, req, version)
        client.set_model_version_tag(cfg.model_name, version, "gate", decision.reason)
        client.set_tag(run_id, "gate.promoted", str(decision.promote))
        client.set_tag(run_id, "gate.reason", decision.reason)
        client.set_tag(run_id, "model_version", version)
    except RegistryError as exc:
        # a refusal (another lineage became champion meanwhile, an unverifiable champion) undoes this version;
        # a busy lease (RegistryUnavailable) keeps it for the retry to reuse
        if not isinstance(exc, RegistryUnavailable):
            delete_version(client, cfg.model_name, version)
        raise
    except Exception as exc:
        raise RegistryUnavailable(f"moving the alias of {cfg.model_name} v{version} failed: {exc}") from exc
    return Registration(cfg.model_name, version, CHAMPION if decision.promote else CHALLENGER, decision.promote,
                        decision.reason, cfg.metric, req.value, champ_info, run_id, safe_uri,
                        f"models:/{cfg.model_name}/{version}", lineage, int8)


def _existing(client, name: str, run_key: str):
    """The finished version of this pipeline run, if any, after deleting unfinished ones (no 'complete' tag)."""
    done = None
    for mv in client.search_model_versions(f"name = '{name}'"):
        tags = mv.tags or {}
        if tags.get("run_key") != run_key:
            continue
        if tags.get("complete") == "true":
            done = done or client.get_model_version(name, mv.version)
        else:
            client.delete_model_version(name, mv.version)
    return done




def _kind_of(mv) -> ModelKind | None:
    tags = mv.tags or {}
    if "labels" not in tags or "task" not in tags:
        return None
    return ModelKind(tags["task"], tuple(json.loads(tags["labels"])))


def _check_lineage(req: RegistrationRequest, champion) -> bool:
    try:
        return same_lineage(req.kind, _kind_of(champion), str(champion.version), req.cfg)
    except LineageMismatch as exc:
        raise LineageRefused(str(exc)) from None


def _champion_score(client, req: RegistrationRequest, mv) -> tuple[dict[str, Any], float]:
    """The champion's metric on *our* test data: its logged value when it was evaluated on the same test split
    (equal content hash), else it is re-scored on our test texts from a verified copy."""
    cfg = req.cfg
    info: dict[str, Any] = {"version": str(mv.version), "run_id": mv.run_id}
    tags = mv.tags or {}
    if req.test_hash and tags.get("test_data_hash") == req.test_hash and cfg.metric in tags:
        info.update(source="logged on the same test data", value=float(tags[cfg.metric]))
        return info, info["value"]
    if req.test is None:
        raise RegistryError(f"champion v{mv.version} was evaluated on other test data and no test split was "
                            f"given to re-score it")
    texts, labels = req.test
    preds = load_verified(f"models:/{cfg.model_name}/{mv.version}", req.tracking_uri).predict(list(texts))
    info.update(source="re-scored on this run's test data",
                value=score_predictions(cfg.metric, texts, labels, preds, req.kind.labels, req.kind.task))
    return info, info["value"]


def _move_alias(client, req: RegistrationRequest, version: str) -> tuple[Decision, dict[str, Any] | None, dict]:
    """Under the lock: check and gate against the champion as it is *now* (another pipeline may have promoted
    since this one started), then move the alias and derive the int8 model's aliases from the fp32 ones."""
    cfg = req.cfg
    run_id = client.get_model_version(cfg.model_name, version).run_id
    with alias_lock(client, cfg.model_name, run_id) as lease:
        champion = current_champion(client, cfg.model_name)
        champ_info, champ_value, note = None, None, ""
        if champion is not None and _check_lineage(req, champion):
            champ_info, champ_value = _champion_score(client, req, champion)
        elif champion is not None:  # register.new_lineage: the old champion is replaced, not compared
            champ_info = {"version": str(champion.version), "run_id": champion.run_id,
                          "source": "another lineage: not compared (register.new_lineage)"}
        decision = gate(req.value, champ_value, cfg, req.metrics.get("macro_f1"))
        if champion is not None and champ_value is None:
            old = _kind_of(champion)
            was = f"labels {list(old.labels)}" if old else "no recorded labels"
            fate = (f"loses @champion (kept as version {champion.version}, tagged superseded_by={version})"
                    if decision.promote else "stays @champion")
            note = (f"register.new_lineage: the previous champion v{champion.version} ({was}) was not compared "
                    f"and {fate}; ")
            decision = Decision(decision.promote, note + decision.reason)
        time.sleep(float(os.environ.get("FINETUNE_ALIAS_DELAY", "0")))  # fault injection: widen the race window
        lease.check()  # re-scoring may have outlasted the lease: never move an alias on a lease now another's
        client.set_registered_model_alias(cfg.model_name, CHAMPION if decision.promote else CHALLENGER, version)
        if note and decision.promote:  # only once this version really took @champion from the other lineage
            client.set_model_version_tag(cfg.model_name, str(champion.version), "superseded_by", version)
        time.sleep(float(os.environ.get("FINETUNE_VARIANT_ALIAS_DELAY", "0")))  # fault injection: a kill lands here
        int8 = aliases.sync_variant_aliases(client, cfg.model_name, lease)  # same leased step
    if note:
        log.warning(note.rstrip("; "))
    return decision, champ_info, int8


def _log_and_register(client, req: RegistrationRequest, exp_id: str, run_key: str) -> tuple[str, str]:
    """One MLflow run + one model version tagged complete, or nothing: a failure deletes the version, marks the
    run FAILED and removes its artifacts."""

    cfg = req.cfg
    weights = {k: v for k, v in integrity.folder_digests(req.model_dir).items() if k.endswith(".safetensors")}
    version, run_id = None, None
    try:
        with mlflow.start_run(experiment_id=exp_id, tags={STAGE_TAG: "register", HEARTBEAT_TAG: str(time.time())}
                              ) as run, heartbeat(req.tracking_uri, run.info.run_id):
            run_id = run.info.run_id
            mlflow.log_params({k: str(v)[:6000] for k, v in redact_values(req.params).items()})
            flat = {k: float(v) for k, v in req.metrics.items() if isinstance(v, (int, float))}
            for lab, row in (req.metrics.get("per_class") or {}).items():
                flat.update({f"{k}_{lab}": float(v) for k, v in row.items()})
            mlflow.log_metrics(flat)
            stamp = int(time.time() * 1000)
            hist = [Metric("train_loss", h["loss"], stamp, int(h["step"])) for h in req.loss_history]
            for i in range(0, len(hist), 1000):
                client.log_batch(run_id, metrics=hist[i:i + 1000])
            if req.training:
                mlflow.log_metrics(training_metrics(req.training))
                mlflow.set_tag("train.stop_reason", str(req.training.get("stop_reason", ""))[:5000])
            mlflow.set_tags({f"lineage.{k}": str(v) for k, v in redact_values(req.lineage).items()})
            for sub, path in req.artifacts.items():
                p = Path(path)
                (mlflow.log_artifacts if p.is_dir() else mlflow.log_artifact)(str(p), sub)
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(PYFUNC_CODE), artifacts=_model_artifacts(req),
                code_paths=pyfunc_code_paths(),
                model_config={"max_length": req.max_length, "weights_sha256": weights,
                              "files_sha256": integrity.folder_digests(req.model_dir)},  # checked at load
                # (texts, params): MLflow infers the params schema from it, so predict(..., params=
                # {"probabilities": True}) and the serving endpoint's "params" reach the model
                input_example=(["An example review."], {"probabilities": False}),
                pip_requirements=pip_requirements())
            time.sleep(float(os.environ.get("FINETUNE_REGISTER_DELAY", "0")))  # fault injection: a kill lands here
            tags = {"test_data_hash": req.test_hash or "", "run_id": run_id, "run_key": run_key,
                    "weights_sha256": ",".join(f"{k}={v}" for k, v in weights.items()),
                    "task": req.kind.task, "labels": json.dumps(list(req.kind.labels))}
            tags.update({k: str(req.metrics[k]) for k in ("accuracy", "macro_f1", cfg.metric) if k in req.metrics})
            version = str(mlflow.register_model(info.model_uri, cfg.model_name, tags=tags).version)
            # after registration, which rewrites the model's registered_model_meta file
            for key, digest in integrity.as_tags(_logged_digests(f"models:/{cfg.model_name}/{version}", req)).items():
                client.set_model_version_tag(cfg.model_name, version, key, digest)
            if req.model_card is not None:
                card = req.model_card(version, run_id)
                mlflow.log_text(card, "model_card.md")
                client.update_model_version(cfg.model_name, version, description=card_description(card))
            client.set_model_version_tag(cfg.model_name, version, "complete", "true")
            return version, run_id
    except Exception as exc:
        if version is not None:  # never leave a version behind half-made
            delete_version(client, cfg.model_name, version)
        if run_id is not None:  # start_run marked it FAILED; its uploads are of no use now
            remove_artifacts(client, run_id, exp_id)
        raise RegistryUnavailable(f"registering {cfg.model_name} failed: {type(exc).__name__}: {exc}") from exc


def _model_artifacts(req: RegistrationRequest) -> dict[str, str]:
    """The model folder, and the reference profile beside it: inside the logged model, so the version's sha256
    tags cover it and load_verified checks it."""
    out = {"model": str(req.model_dir)}
    if req.reference_profile is not None:
        out["reference_profile"] = str(req.reference_profile)
    return out


def _logged_digests(model_uri: str, req: RegistrationRequest) -> dict[str, str]:
    return stored_digests(model_uri, req.tracking_uri, req.model_dir)




