"""registry: the one module that talks to MLflow. It logs the run, registers the model version with its digests,
label set and task, moves the ``champion``/``challenger`` alias under a lease, uploads the run report, and
loads registered models only after checking every file against the registry.

Nothing is half-written: the label-set check runs before anything is logged, a failure after the version was
created deletes that version again, and no alias moves before the version is complete. Registration is
idempotent per pipeline run and retried on transient failures. Register runs of killed processes (RUNNING
with a stale heartbeat) are marked FAILED and their artifacts removed by the next registration.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from . import integrity
from .config import RegisterConfig
from .gate import Decision, LineageMismatch, ModelKind, gate, kind_from_config, same_lineage, score_predictions
from .redact import redact_text, redact_uri, redact_values

log = logging.getLogger(__name__)
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
ONNX_PYFUNC_CODE = Path(__file__).with_name("onnx_pyfunc_model.py")
INT8_SUFFIX = "-int8"  # the int8 variant is a registered model of its own: <register.model_name>-int8
CHAMPION, CHALLENGER = "champion", "challenger"
LOCK_TAG = "finetune.alias_lock"
STAGE_TAG, HEARTBEAT_TAG = "finetune.stage", "finetune.heartbeat"
HEARTBEAT_EVERY = 30.0  # seconds between a live register run's heartbeats
STALE_AFTER = 300.0  # a RUNNING register run without a heartbeat for this long belongs to a killed process


class RegistryError(RuntimeError):
    pass


class RegistryUnavailable(RegistryError):
    """The tracking server or its artifact store failed: worth retrying."""


class LineageRefused(RegistryError):
    """The champion has another label set or task (gate.LineageMismatch): nothing may be registered."""


@dataclass(frozen=True)
class RegistrationRequest:
    """Everything one registration needs, built once by stages.run_register.

    ``artifacts`` maps artifact sub-folder -> local file or folder; ``test`` is (texts, labels) of this run's
    test split, used to re-score a champion evaluated on other data; ``model_card(version, run_id)`` returns
    the Markdown logged as ``model_card.md`` and set as the version's description."""
    model_dir: Path
    metrics: dict[str, Any]
    cfg: RegisterConfig
    tracking_uri: str
    kind: ModelKind
    artifact_location: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    loss_history: list[dict[str, float]] = field(default_factory=list)
    training: dict[str, Any] | None = None  # train's summary.json: its selection facts go on the run
    artifacts: dict[str, str | Path] = field(default_factory=dict)
    test_hash: str | None = None
    test: tuple[list[str], list[str]] | None = None
    max_length: int = 512
    pipeline_run: str | None = None
    model_card: Callable[[str, str], str] | None = None

    @classmethod
    def for_model(cls, model_dir: str | Path, metrics: dict[str, Any], cfg: RegisterConfig, tracking_uri: str,
                  **fields: Any) -> "RegistrationRequest":
        """A request for the classifier saved in ``model_dir``, its label set read from its config.json."""
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        return cls(Path(model_dir), metrics, cfg, tracking_uri, kind_from_config(config), **fields)

    @property
    def value(self) -> float:
        return float(self.metrics[self.cfg.metric])

    def run_key(self) -> str:
        """Hash of the weights, the test data, the metrics, the register settings and the pipeline run."""
        weights = {k: v for k, v in integrity.folder_digests(self.model_dir).items() if k.endswith(".safetensors")}
        values = {k: self.metrics.get(k) for k in ("accuracy", "macro_f1", "loss")}
        return hashlib.sha256(json.dumps([weights, self.test_hash, values, asdict(self.cfg), self.pipeline_run],
                                         sort_keys=True).encode()).hexdigest()[:32]


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
    tracking_uri: str  # redacted
    model_uri: str = ""
    lineage: dict[str, Any] = field(default_factory=dict)


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
    return _with_retries(cfg, req.tracking_uri, lambda: _register_once(req, run_key))


def _with_retries(cfg: RegisterConfig, tracking_uri: str, attempt_once: Callable[[], Any]) -> Any:
    """``attempt_once`` retried on RegistryUnavailable with exponential backoff, then reported."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    delay = cfg.retry_backoff
    with _use_tracking_uri(tracking_uri):  # restore the caller's tracking URI afterwards: no global side effect
        for attempt in range(cfg.retries + 1):
            try:
                return attempt_once()
            except RegistryUnavailable as exc:
                if attempt == cfg.retries:
                    raise RegistryError(redact_text(f"giving up after {cfg.retries + 1} attempt(s): {exc}")) from None
                log.warning("registry attempt %d failed (%s); retrying in %.1fs", attempt + 1, redact_text(str(exc)),
                            delay)
                time.sleep(delay)
                delay *= 2
    raise AssertionError("unreachable")


def _register_once(req: RegistrationRequest, run_key: str) -> Registration:
    from mlflow import MlflowClient

    cfg, safe_uri = req.cfg, redact_uri(req.tracking_uri)
    client = MlflowClient(req.tracking_uri)
    try:  # fail early and clearly when the registry is unreachable, before anything is written
        exp_id = experiment_id(client, cfg.experiment, req.artifact_location)
        reap_stale_runs(client, exp_id, cfg.model_name)
        done = _existing(client, cfg.model_name, run_key)
        champion = _champion(client, cfg.model_name)
    except Exception as exc:
        raise RegistryUnavailable(f"MLflow tracking server {safe_uri} is unreachable or refused: {exc}") from exc
    lineage = redact_values(req.lineage)
    if done is not None and set(done.aliases or []) & {CHAMPION, CHALLENGER}:
        alias = CHAMPION if CHAMPION in done.aliases else CHALLENGER
        log.info("pipeline run %s is already registered as version %s; nothing to do", run_key, done.version)
        return Registration(cfg.model_name, str(done.version), alias, alias == CHAMPION,
                            f"already registered: {(done.tags or {}).get('gate', '')}", cfg.metric, req.value, None,
                            done.run_id, safe_uri, f"models:/{cfg.model_name}/{done.version}", lineage)
    if champion is not None:
        _check_lineage(req, champion)  # before anything is logged: a refused model leaves no trace
    if done is not None:
        version, run_id = str(done.version), done.run_id
    else:
        version, run_id = _log_and_register(client, req, exp_id, run_key)
    try:  # the alias moves last, once the version is complete
        decision, champ_info = _move_alias(client, req, version)
        client.set_model_version_tag(cfg.model_name, version, "gate", decision.reason)
        client.set_tag(run_id, "gate.promoted", str(decision.promote))
        client.set_tag(run_id, "gate.reason", decision.reason)
        client.set_tag(run_id, "model_version", version)
    except RegistryError as exc:
        # a refusal (another lineage became champion meanwhile, an unverifiable champion) undoes this version;
        # a busy lease (RegistryUnavailable) keeps it for the retry to reuse
        if not isinstance(exc, RegistryUnavailable):
            _delete_version(client, cfg.model_name, version)
        raise
    except Exception as exc:
        raise RegistryUnavailable(f"moving the alias of {cfg.model_name} v{version} failed: {exc}") from exc
    return Registration(cfg.model_name, version, CHAMPION if decision.promote else CHALLENGER, decision.promote,
                        decision.reason, cfg.metric, req.value, champ_info, run_id, safe_uri,
                        f"models:/{cfg.model_name}/{version}", lineage)


def experiment_id(client, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name`` (register.experiment), created on first use."""
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(name, artifact_location)


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


def _champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


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
                value=score_predictions(cfg.metric, labels, [str(p) for p in preds], req.kind.labels))
    return info, info["value"]


@contextlib.contextmanager
def _alias_lock(client, name: str, owner: str, ttl: float = 120.0, settle: float = 0.5):
    """Serialize alias moves across concurrent pipelines with a lease kept as a registered-model tag.

    MLflow has no compare-and-set, so a writer sets the tag, waits ``settle`` seconds and reads it back: of
    two writers racing, only the last one's value survives and only that writer proceeds. A crashed holder's
    lease expires after ``ttl`` seconds, or as soon as its run is marked FAILED.
    """
    owner = f"{owner}.{uuid.uuid4().hex[:8]}"
    deadline = time.time() + 2 * ttl
    reported = None
    while True:
        held = (client.get_registered_model(name).tags or {}).get(LOCK_TAG, "")
        holder, _, expiry = held.partition("@")
        if not holder or float(expiry or 0) < time.time() or _holder_failed(client, holder):
            client.set_registered_model_tag(name, LOCK_TAG, f"{owner}@{time.time() + ttl}")
            time.sleep(settle)
            if (client.get_registered_model(name).tags or {}).get(LOCK_TAG, "").startswith(owner + "@"):
                break
        elif held != reported:
            reported = held
            log.warning("waiting for the alias lock of %s: held by %s until %s (waiting at most until %s)", name,
                        holder, _utc(float(expiry or 0)), _utc(deadline))
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


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%H:%M:%S UTC")


def _holder_failed(client, holder: str) -> bool:
    """A lease whose holder is a register run already marked FAILED (a killed process) is free."""
    run_id = holder.partition(".")[0]
    try:
        return client.get_run(run_id).info.status in ("FAILED", "KILLED")
    except Exception:
        return False


def _move_alias(client, req: RegistrationRequest, version: str) -> tuple[Decision, dict[str, Any] | None]:
    """Under the lock: check and gate against the champion as it is *now* (another pipeline may have promoted
    since this one started), then move the alias."""
    cfg = req.cfg
    run_id = client.get_model_version(cfg.model_name, version).run_id
    with _alias_lock(client, cfg.model_name, run_id):
        champion = _champion(client, cfg.model_name)
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
            if decision.promote:
                client.set_model_version_tag(cfg.model_name, str(champion.version), "superseded_by", version)
        time.sleep(float(os.environ.get("FINETUNE_ALIAS_DELAY", "0")))  # fault injection: widen the race window
        client.set_registered_model_alias(cfg.model_name, CHAMPION if decision.promote else CHALLENGER, version)
    if note:
        log.warning(note.rstrip("; "))
    return decision, champ_info


def training_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The training facts a run compares by: which step was exported and why, how much of the model trained."""
    keys = ("best_step", "best_value", "exported_step", "steps", "trainable_parameters", "parameters")
    return {f"train_{k}": float(summary[k]) for k in keys if isinstance(summary.get(k), (int, float))}


def _log_and_register(client, req: RegistrationRequest, exp_id: str, run_key: str) -> tuple[str, str]:
    """One MLflow run + one model version tagged complete, or nothing: a failure deletes the version, marks the
    run FAILED and removes its artifacts."""
    import mlflow
    from mlflow.entities import Metric

    cfg = req.cfg
    weights = {k: v for k, v in integrity.folder_digests(req.model_dir).items() if k.endswith(".safetensors")}
    version, run_id = None, None
    try:
        with mlflow.start_run(experiment_id=exp_id, tags={STAGE_TAG: "register", HEARTBEAT_TAG: str(time.time())}
                              ) as run, _heartbeat(req.tracking_uri, run.info.run_id):
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
                name="model", python_model=str(PYFUNC_CODE), artifacts={"model": str(req.model_dir)},
                model_config={"max_length": req.max_length, "weights_sha256": weights},
                # (texts, params): MLflow infers the params schema from it, so predict(..., params=
                # {"probabilities": True}) and the serving endpoint's "params" reach the model
                input_example=(["An example review."], {"probabilities": False}),
                pip_requirements=_pip_requirements())
            time.sleep(float(os.environ.get("FINETUNE_REGISTER_DELAY", "0")))  # fault injection: a kill lands here
            tags = {"test_data_hash": req.test_hash or "", "run_id": run_id, "run_key": run_key,
                    "weights_sha256": ",".join(f"{k}={v}" for k, v in weights.items()),
                    "task": req.kind.task, "labels": json.dumps(list(req.kind.labels))}
            tags.update({k: str(req.metrics[k]) for k in ("accuracy", "macro_f1") if k in req.metrics})
            version = str(mlflow.register_model(info.model_uri, cfg.model_name, tags=tags).version)
            # after registration, which rewrites the model's registered_model_meta file
            for key, digest in integrity.as_tags(_logged_digests(f"models:/{cfg.model_name}/{version}", req)).items():
                client.set_model_version_tag(cfg.model_name, version, key, digest)
            if req.model_card is not None:
                card = req.model_card(version, run_id)
                mlflow.log_text(card, "model_card.md")
                client.update_model_version(cfg.model_name, version, description=card)
            client.set_model_version_tag(cfg.model_name, version, "complete", "true")
            return version, run_id
    except Exception as exc:
        if version is not None:  # never leave a version behind half-made
            _delete_version(client, cfg.model_name, version)
        if run_id is not None:  # start_run marked it FAILED; its uploads are of no use now
            _remove_artifacts(client, run_id, exp_id)
        raise RegistryUnavailable(f"registering {cfg.model_name} failed: {type(exc).__name__}: {exc}") from exc


def _logged_digests(model_uri: str, req: RegistrationRequest) -> dict[str, str]:
    return _stored_digests(model_uri, req.tracking_uri, req.model_dir)


def _stored_digests(model_uri: str, tracking_uri: str, model_dir: str | Path) -> dict[str, str]:
    """sha256 of every file of the logged model, read back from the artifact store, whose copy of the model
    folder must equal the local one (so the digests describe what was trained, not what reached the store)."""
    import mlflow.artifacts

    with tempfile.TemporaryDirectory(prefix="finetune-logged-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp, tracking_uri=tracking_uri)
        digests = integrity.folder_digests(local)
    prefix = f"artifacts/{Path(model_dir).resolve().name}/"  # MLflow copies the folder under its own name
    stored = {k[len(prefix):]: v for k, v in digests.items() if k.startswith(prefix)}
    if stored != integrity.folder_digests(model_dir):
        raise RegistryUnavailable(f"the model files in the artifact store differ from {model_dir} after upload")
    return digests


def _delete_version(client, name: str, version: str) -> None:
    try:
        client.delete_model_version(name, version)
    except Exception:  # registry gone mid-way: the next attempt's _existing() removes it
        log.warning("could not delete unfinished version %s of %s", version, name)


@contextlib.contextmanager
def _heartbeat(tracking_uri: str, run_id: str):
    """Refresh the run's heartbeat tag while it registers, so a later registration can tell a live run from
    the RUNNING leftover of a killed process."""
    from mlflow import MlflowClient

    stop = threading.Event()

    def beat() -> None:
        client = MlflowClient(tracking_uri)
        while not stop.wait(HEARTBEAT_EVERY):
            with contextlib.suppress(Exception):
                client.set_tag(run_id, HEARTBEAT_TAG, str(time.time()))

    thread = threading.Thread(target=beat, name=f"heartbeat-{run_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


def reap_stale_runs(client, exp_id: str, model_name: str) -> list[str]:
    """Mark register runs left RUNNING by killed processes FAILED, delete their unfinished model versions and
    their uploaded artifacts. Returns the run ids it reaped."""
    now = time.time()
    reaped = []
    # the fp32 run registers versions of model_name, the int8 run versions of model_name + INT8_SUFFIX
    runs = [(run, name) for stage, name in (("register", model_name), ("register-int8", model_name + INT8_SUFFIX))
            for run in client.search_runs([exp_id], f"tags.{STAGE_TAG} = '{stage}' and attributes.status = 'RUNNING'")]
    for run, name in runs:
        beat = float(run.data.tags.get(HEARTBEAT_TAG) or run.info.start_time / 1000)
        if now - beat < STALE_AFTER:
            continue
        run_id = run.info.run_id
        log.warning("register run %s has had no heartbeat since %s: its process died; marking it FAILED and "
                    "removing its artifacts", run_id, _utc(beat))
        for mv in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
            if (mv.tags or {}).get("complete") != "true":
                _delete_version(client, name, str(mv.version))
        client.set_tag(run_id, "finetune.failed", f"process died (no heartbeat since {_utc(beat)}); "
                                                  f"marked FAILED by a later registration")
        client.set_terminated(run_id, "FAILED")
        _remove_artifacts(client, run_id, exp_id)
        reaped.append(run_id)
    return reaped


def _remove_artifacts(client, run_id: str, exp_id: str) -> None:
    """Delete what a failed run uploaded (its artifacts and the models it logged), as far as the store allows."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        locations = [client.get_run(run_id).info.artifact_uri]
        for lm in client.search_logged_models([exp_id], filter_string=f"source_run_id = '{run_id}'"):
            client.finalize_logged_model(lm.model_id, "FAILED")
            locations.append(lm.artifact_location)
        for uri in locations:
            get_artifact_repository(uri).delete_artifacts()
    except Exception as exc:  # e.g. a store without delete: the run is FAILED anyway, `mlflow gc` can follow
        log.warning("could not remove the artifacts of failed run %s: %s", run_id, redact_text(str(exc)))


@dataclass(frozen=True)
class VariantRequest:
    """The int8 ONNX variant of the fp32 version ``parent`` (a Registration of ``fp32``): ``folder`` is the
    compress stage's output, ``metrics`` its metrics.json."""
    fp32: RegistrationRequest
    parent: Registration
    folder: Path
    metrics: dict[str, Any]

    @property
    def model_name(self) -> str:
        return self.fp32.cfg.model_name + INT8_SUFFIX


def register_variant(vreq: VariantRequest) -> dict[str, Any]:
    """Register the int8 variant as a version of ``<model_name>-int8`` whose alias follows its fp32 parent:
    ``champion`` when the parent was promoted in this registration, else ``challenger``. Same retries, digest
    tags and all-or-nothing rule as the fp32 registration; idempotent per fp32 version."""
    return _with_retries(vreq.fp32.cfg, vreq.fp32.tracking_uri, lambda: _register_variant_once(vreq))


def _register_variant_once(vreq: VariantRequest) -> dict[str, Any]:
    from mlflow import MlflowClient

    req, parent, name = vreq.fp32, vreq.parent, vreq.model_name
    client = MlflowClient(req.tracking_uri)
    alias = CHAMPION if parent.promoted else CHALLENGER
    try:
        done = None
        for mv in client.search_model_versions(f"name = '{name}'"):
            tags = mv.tags or {}
            if tags.get("fp32_model") == f"{parent.model_name}/{parent.version}":
                if tags.get("complete") == "true":
                    done = done or str(mv.version)
                else:
                    client.delete_model_version(name, mv.version)
        exp_id = client.get_run(parent.run_id).info.experiment_id
    except Exception as exc:
        raise RegistryUnavailable(f"MLflow tracking server {redact_uri(req.tracking_uri)} is unreachable or "
                                  f"refused: {exc}") from exc
    version, run_id = done, None
    if version is None:
        version, run_id = _log_variant(client, vreq, exp_id)
    try:
        client.set_registered_model_alias(name, alias, version)
        client.set_model_version_tag(parent.model_name, parent.version, "int8_version", f"{name}/{version}")
    except Exception as exc:
        raise RegistryUnavailable(f"moving the alias of {name} v{version} failed: {exc}") from exc
    run_id = run_id or client.get_model_version(name, version).run_id
    return {"registered": True, "model_name": name, "version": version, "alias": alias, "run_id": run_id,
            "model_uri": f"models:/{name}/{version}",
            "reason": f"{vreq.metrics.get('message', 'int8 variant passed')}; alias follows fp32 "
                      f"v{parent.version} (@{parent.alias})"}


def drop_int8_champion(req: RegistrationRequest) -> str | None:
    """The fp32 version of ``req`` was promoted without an int8 variant: ``<name>-int8@champion`` would still
    name the variant of the previous champion, so the alias is removed. Returns the version it named."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name = req.cfg.model_name + INT8_SUFFIX
    client = MlflowClient(req.tracking_uri)
    try:
        if not client.search_registered_models(f"name = '{name}'"):
            return None
        old = _champion(client, name)
        if old is not None:
            client.delete_registered_model_alias(name, CHAMPION)
        return None if old is None else str(old.version)
    except MlflowException as exc:
        raise RegistryError(redact_text(f"removing {name}@{CHAMPION} failed: {exc}")) from None


def _variant_files(folder: Path, dst: Path) -> Path:
    """Only what serving the int8 model needs: the int8 ONNX file, tokenizer and config (not the fp32 ONNX)."""
    from .compress import METRICS, ONNX_FP32
    from .io import MARKER

    dst.mkdir()
    for f in folder.iterdir():
        if f.is_file() and f.name not in (ONNX_FP32, METRICS, MARKER):
            shutil.copy2(f, dst / f.name)
    return dst


def _log_variant(client, vreq: VariantRequest, exp_id: str) -> tuple[str, str]:
    """One run + one complete version of the int8 model, or nothing (as _log_and_register)."""
    import mlflow

    from .compress import ONNX_INT8, pyfunc_model_config, pyfunc_requirements

    req, parent, name = vreq.fp32, vreq.parent, vreq.model_name
    version, run_id = None, None
    try:
        with tempfile.TemporaryDirectory(prefix="finetune-int8-") as tmp, \
                mlflow.start_run(experiment_id=exp_id, tags={STAGE_TAG: "register-int8", HEARTBEAT_TAG: str(time.time())}
                                 ) as run, _heartbeat(req.tracking_uri, run.info.run_id):
            run_id = run.info.run_id
            files = _variant_files(Path(vreq.folder), Path(tmp) / "onnx")
            variant = (vreq.metrics.get("variants") or {}).get("onnx_int8", {})
            mlflow.log_metrics({k: float(v) for k, v in variant.items() if isinstance(v, (int, float))})
            mlflow.log_artifact(str(Path(vreq.folder) / "metrics.json"), "compress")
            mlflow.set_tags({"fp32_model": f"{parent.model_name}/{parent.version}", "fp32_run_id": parent.run_id})
            model_config = pyfunc_model_config(files, ONNX_INT8, req.max_length)
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(ONNX_PYFUNC_CODE), artifacts={"model": str(files)},
                model_config=model_config,
                input_example=(["An example review."], {"probabilities": False}),
                pip_requirements=pyfunc_requirements())
            tags = {"fp32_model": f"{parent.model_name}/{parent.version}", "fp32_run_id": parent.run_id,
                    "run_id": run_id, "task": req.kind.task, "labels": json.dumps(list(req.kind.labels)),
                    "onnx_sha256": model_config["onnx_sha256"], "test_data_hash": req.test_hash or ""}
            tags.update({k: str(variant[k]) for k in ("accuracy", "macro_f1", "accuracy_delta") if k in variant})
            version = str(mlflow.register_model(info.model_uri, name, tags=tags).version)
            digests = _stored_digests(f"models:/{name}/{version}", req.tracking_uri, files)
            for key, digest in integrity.as_tags(digests).items():
                client.set_model_version_tag(name, version, key, digest)
            client.set_model_version_tag(name, version, "complete", "true")
            return version, run_id
    except Exception as exc:
        if version is not None:
            _delete_version(client, name, version)
        if run_id is not None:
            _remove_artifacts(client, run_id, exp_id)
        raise RegistryUnavailable(f"registering {name} failed: {type(exc).__name__}: {exc}") from exc


def update_model_card(req: RegistrationRequest, version: str, run_id: str, card: str) -> None:
    """Replace the card of a registered version (its description and the run's model_card.md): the card written
    at registration cannot know yet what became of the int8 variant."""
    from mlflow import MlflowClient

    def once() -> None:
        try:
            client = MlflowClient(req.tracking_uri)
            client.update_model_version(req.cfg.model_name, version, description=card)
            client.log_text(run_id, card, "model_card.md")
        except Exception as exc:
            raise RegistryUnavailable(f"updating the model card of {req.cfg.model_name} v{version} failed: {exc}") \
                from exc

    _with_retries(req.cfg, req.tracking_uri, once)


def upload_report(tracking_uri: str, run_id: str, folder: str | Path) -> None:
    """The run report and its plots into the run under ``report/``."""
    try:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri).log_artifacts(run_id, str(folder), "report")
    except Exception as exc:  # the version is registered; a rerun (idempotent) logs the report again
        raise RegistryError(redact_text(f"logging the run report to MLflow run {run_id} failed: {exc}")) from None


def load_verified(model_uri: str, tracking_uri: str):
    """Load a registered model (``models:/<name>/<version>`` or ``models:/<name>@<alias>``) only after every file
    of a downloaded copy matched the sha256 digests the registry holds for that version; loads that copy."""
    import mlflow.artifacts
    import mlflow.pyfunc
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not model_uri.startswith("models:/"):
        raise RegistryError(f"{model_uri}: only registered models (models:/<name>/<version> or "
                            f"models:/<name>@<alias>) can be verified and loaded")
    name, sep, ref = model_uri[len("models:/"):].partition("@")
    if not sep:
        name, _, ref = name.rpartition("/")
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    client = MlflowClient(tracking_uri)
    try:
        mv = client.get_model_version_by_alias(name, ref) if sep else client.get_model_version(name, ref)
        # models:/ URIs resolve against the global tracking URI, whatever tracking_uri= says
        with tempfile.TemporaryDirectory(prefix="finetune-verified-") as tmp, _use_tracking_uri(tracking_uri):
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=tmp)
            integrity.verify(local, integrity.from_tags(mv.tags or {}), f"{name} version {mv.version}")
            return mlflow.pyfunc.load_model(local)
    except integrity.IntegrityError as exc:
        raise RegistryError(str(exc)) from None
    except (MlflowException, OSError) as exc:
        raise RegistryError(redact_text(f"cannot load {model_uri} from {redact_uri(tracking_uri)}: {exc}")) from None


def _pip_requirements() -> list[str]:
    # Explicit, so MLflow does not infer requirements by importing around (which fails offline).
    from importlib.metadata import version

    return [f"mlflow=={version('mlflow')}", f"torch=={version('torch').split('+')[0]}",
            f"transformers=={version('transformers')}", f"safetensors=={version('safetensors')}"]


# ---- hyperparameter search (tune.py): one parent run per study, one nested run per trial ----

TRIAL_STATES = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}  # Optuna state -> MLflow run status


class SearchLog:
    """MLflow runs of a search: ``parent`` (tags study, storage; reopened when the study resumes) and one run per
    trial nested under it (``mlflow.parentRunId``) with the sampled params, the validation metric per step and
    the trial's state. Every string is redacted before it leaves the process."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_location: str | None, parent_id: str | None,
                 tags: dict[str, str], params: dict[str, Any]):
        from mlflow import MlflowClient

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
        from mlflow.entities import Metric

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
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in redact_values(values).items()]


def _metrics(values: dict[str, float]) -> list:
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    return [Metric(k, float(v), stamp, 0) for k, v in values.items()]
