"""tune: hyperparameter search (Optuna) over the train.* keys of params.yaml (what a trial applies), each trial
the real ``train()`` on the train split scored on the validation split. The test split is never read here:
callers pass only train and val tokens.

A trial's config is params.yaml + the per-trial budget (``tune.max_steps``, ``tune.evals`` validation points) + the
sampled values, built through ``config.apply_overrides`` / ``config_from_dict`` like any ``--set``, so a sampled
value is range-checked like any other. The study lives in an SQLite file in the project (``tune.storage``): a rerun
continues it until ``tune.trials`` trials have finished (complete or pruned). The median pruner stops a trial whose
validation value falls below the median of earlier trials at the same step.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
import yaml
from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances
from optuna.trial import TrialState

from finetune.common.coercion import ConfigError
from finetune.common.config import TUNE_METRICS, TuneConfig
from finetune.common.params import apply_overrides, config_from_dict
from finetune.common.progress import Progress
from finetune.common.tokens import TokenizedSplit
from finetune.common.tracking import DEFAULT_DB
from finetune.reporting import plots
from finetune.stages.predict import sqlite_paths
from finetune.stages.train import train
from finetune.training.recipe import TrainingError

log = logging.getLogger("finetune")


class TuneError(RuntimeError):
    """The search cannot give a result (every trial failed or was pruned)."""


@dataclass
class TuneResult:
    study: str
    metric: str
    direction: str
    best_number: int
    best_value: float
    best_params: dict[str, Any]  # dotted key -> value
    trials: list[dict[str, Any]] = field(default_factory=list)  # number, state, value, seconds, params
    importances: dict[str, float] = field(default_factory=dict)
    parent_run: str | None = None


def eval_every(cfg: TuneConfig) -> int:
    return max(1, cfg.max_steps // cfg.evals)


def budget(cfg: TuneConfig) -> list[str]:
    """The per-trial overrides that come before the sampled values."""
    return [f"train.max_steps={cfg.max_steps}", f"train.eval_every={eval_every(cfg)}"]


def yaml_scalar(value: Any) -> str:
    """A value as YAML reads it back with its type (1e-05 would read as a string: 1.0e-05 does not)."""
    text = json.dumps(value)
    if isinstance(value, float) and "e" in text and "." not in text:
        text = text.replace("e", ".0e", 1)
    return text


def overrides(values: dict[str, Any]) -> list[str]:
    return [f"{k}={yaml_scalar(v)}" for k, v in values.items()]


def trial_config(raw: dict[str, Any], cfg: TuneConfig, values: dict[str, Any]):
    """The typed config of one trial: params + budget + sampled values, through the one override path."""
    return config_from_dict(apply_overrides(raw, budget(cfg) + overrides(values)))


# A trial trains with its own train section (train() gets trial_cfg.train); the base model, the tokens and the
# register gate are fixed for the whole search, so a sampled value of any other key would change nothing and
# best_params.yaml would recommend a value no trial used.
APPLIED_PREFIX = "train."


def check_applied_keys(cfg: TuneConfig) -> None:
    """Every key of ``tune.space`` is one a trial applies (local search and the Katib Experiment alike)."""
    for key in cfg.space:
        if not key.startswith(APPLIED_PREFIX):
            raise ConfigError(f"tune.space.{key}: a trial does not apply {key} (the base model, tokens and register "
                              f"settings are fixed for the whole search); only {APPLIED_PREFIX}* keys may be "
                              f"searched, e.g. train.learning_rate")


def check_space(raw: dict[str, Any], cfg: TuneConfig) -> None:
    """Every key is one a trial applies, and every end of every range and every choice gives a valid config with
    these params, before any trial."""
    check_applied_keys(cfg)
    for key, dist in cfg.space.items():
        for value in dist.get("choices") or [dist["low"], dist["high"]]:
            try:
                trial_config(raw, cfg, {key: value})
            except ConfigError as exc:
                raise ConfigError(f"tune.space.{key}: the value {value!r} is not allowed: {exc}") from None


def check_storage(root: Path, storage: str, tracking_uris: list[str | None]) -> Path:
    """The study's SQLite file: inside the project ``root`` and not an MLflow store (Optuna would create its
    tables in mlflow.db, then MLflow fails on them). Refused in one line before any table is created."""
    path = (root / storage).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ConfigError(f"tune.storage = {storage!r}: {path} is outside the project {root.resolve()}; give a file "
                          f"name in the project, e.g. optuna.db")
    stores = {p.resolve() for p in [root / DEFAULT_DB, *sqlite_paths(*tracking_uris)]}
    if path in stores:
        raise ConfigError(f"tune.storage = {storage!r}: {path} is the MLflow tracking store; give the study its own "
                          f"file, e.g. optuna.db")
    return path


def _suggest(trial, key: str, dist: dict[str, Any]) -> Any:
    if "choices" in dist:
        return trial.suggest_categorical(key, dist["choices"])
    if isinstance(dist["low"], int) and isinstance(dist["high"], int) and not isinstance(dist["low"], bool):
        return trial.suggest_int(key, dist["low"], dist["high"], step=dist.get("step") or 1, log=dist.get("log", False))
    return trial.suggest_float(key, float(dist["low"]), float(dist["high"]), step=dist.get("step"),
                               log=dist.get("log", False))


def _typed_space(raw: dict[str, Any], cfg: TuneConfig) -> dict[str, dict[str, Any]]:
    """The space with range ends of the key's own type (an int key's 16.0 from YAML becomes 16)."""
    out = {}
    for key, dist in cfg.space.items():
        if "choices" in dist:
            out[key] = dist
            continue
        ends = {end: _get(trial_config(raw, cfg, {key: dist[end]}), key) for end in ("low", "high")}
        out[key] = {**dist, **ends}
    return out


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def study(cfg: TuneConfig, storage_path: Path):
    """The study of ``cfg`` in ``storage_path`` (created, or loaded to resume)."""

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{storage_path}"
    pruner = optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials) if cfg.pruner == "median" \
        else optuna.pruners.NopPruner()
    existing = _trial_count(storage, cfg.study)
    seed = cfg.seed + existing  # a resumed study does not replay the random draws of the first run
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.startup_trials) if cfg.sampler == "tpe" \
        else optuna.samplers.RandomSampler(seed=seed)
    s = optuna.create_study(storage=storage, study_name=cfg.study, direction=TUNE_METRICS[cfg.metric],
                            sampler=sampler, pruner=pruner, load_if_exists=True)
    if s.direction.name.lower() != TUNE_METRICS[cfg.metric]:
        raise ConfigError(f"tune.metric = {cfg.metric!r}: study {cfg.study!r} in {storage_path} was made to "
                          f"{s.direction.name.lower()}; use another tune.study for another metric")
    return s


def _trial_count(storage: str, name: str) -> int:

    try:
        return len(optuna.load_study(study_name=name, storage=storage).trials)
    except KeyError:  # no such study yet
        return 0


def tune(raw: dict[str, Any], tokens: dict[str, TokenizedSplit], meta: dict[str, Any], base_model: str | Path,
         storage_path: Path, open_log: Callable[[str | None], Any] | None = None) -> TuneResult:
    """Run trials until ``tune.trials`` have finished; return the study's best. ``raw``: params.yaml as a dict
    (with any --set applied). ``tokens``: exactly the train and val splits. ``open_log(parent_run_id or None)``
    returns a registry.SearchLog (MLflow parent + nested runs); the parent's id is kept in the study, so a
    resumed study logs under the same parent."""

    if set(tokens) != {"train", "val"}:
        raise TuneError(f"tune gets the train and val splits only, not {sorted(tokens)}")
    cfg = config_from_dict(raw).tune
    check_space(raw, cfg)
    space = _typed_space(raw, cfg)
    s = study(cfg, storage_path)
    search_log = open_log(s.user_attrs.get("mlflow_parent_run")) if open_log else None
    if search_log:
        s.set_user_attr("mlflow_parent_run", search_log.parent)
    for t in s.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # left by a killed run (one tuner/study)
        s.tell(t.number, state=TrialState.FAIL)
    done = len(s.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    todo = max(0, cfg.trials - done)
    log.info("tune: study %r in %s has %d finished trial(s); running %d more (%s on the validation split)",
             cfg.study, storage_path, done, todo, cfg.metric)
    progress = Progress(todo, "tune", "trials")
    try:
        for i in range(todo):  # a failed trial counts here: a rerun tries again, a broken setup does not loop
            trial = s.ask()
            values = {k: _suggest(trial, k, d) for k, d in space.items()}
            t0 = time.perf_counter()
            state, value = _run_trial(s, trial, trial_config(raw, cfg, values), values, cfg.metric,
                                      (tokens, meta, base_model), search_log)
            best = _best(s)
            note = f"best so far {best.value:.4f} (trial {best.number})" if best else "no complete trial yet"
            log.info("tune: trial %d/%d (#%d) %s, %s %.4f in %.0fs; %s", done + i + 1, cfg.trials, trial.number,
                     state, cfg.metric, value, time.perf_counter() - t0, note)
            progress.update(1, note=note)
    finally:
        progress.close()
    return _result(s, cfg, search_log)


def _run_trial(s, trial, trial_cfg, values: dict[str, Any], metric: str, data: tuple, search_log
               ) -> tuple[str, float]:
    """Train one trial, reporting each validation value to the pruner (and MLflow); tell the study how it
    ended. Returns (state, value); a pruned trial's value is its last validation value."""


    tokens, meta, base_model = data
    run_id = search_log.start_trial(trial.number, values) if search_log else None
    history: list[dict[str, float]] = []

    def on_eval(row: dict[str, float]) -> None:
        history.append(row)
        if search_log:
            search_log.log_eval(run_id, row)
        if math.isfinite(row[metric]):
            trial.report(row[metric], int(row["step"]))
            if trial.should_prune():
                raise optuna.TrialPruned()

    state, value = "FAIL", float("nan")
    try:
        with tempfile.TemporaryDirectory(prefix="finetune-trial-") as tmp:
            result = train(tokens, meta, base_model, trial_cfg.train, Path(tmp) / "model", None, on_eval=on_eval)
        value = float(result.val_history[-1][metric]) if result.val_history else float("nan")
        if math.isfinite(value):
            s.tell(trial, value)
            state = "COMPLETE"
        else:
            s.tell(trial, state=TrialState.FAIL)
    except optuna.TrialPruned:
        s.tell(trial, state=TrialState.PRUNED)
        state, value = "PRUNED", history[-1][metric]
    except TrainingError as exc:  # e.g. a diverged learning rate: a bad point, not a broken search
        log.warning("trial %d failed: %s", trial.number, exc)
        s.tell(trial, state=TrialState.FAIL)
    except BaseException:  # a bug or Ctrl-C: the trial is over, the search too
        s.tell(trial, state=TrialState.FAIL)
        if search_log:
            search_log.end_trial(run_id, "FAIL", {})
        raise
    if search_log:
        search_log.end_trial(run_id, state, {f"final_{metric}": value} if math.isfinite(value) else {})
    return state, value


def _best(s):
    try:
        return s.best_trial
    except ValueError:  # no complete trial
        return None


def _result(s, cfg: TuneConfig, search_log) -> TuneResult:
    best = _best(s)
    if best is None:
        raise TuneError(f"study {cfg.study!r} has no complete trial: every trial failed or was pruned")
    rows = [{"number": t.number, "state": t.state.name,
             "value": t.value if t.value is not None else (list(t.intermediate_values.values()) or [None])[-1],
             "seconds": round(t.duration.total_seconds(), 1) if t.duration else None, "params": t.params}
            for t in s.get_trials(deepcopy=False) if t.state.is_finished()]
    return TuneResult(cfg.study, cfg.metric, TUNE_METRICS[cfg.metric], best.number, float(best.value),
                      dict(best.params), rows, importances(s), search_log.parent if search_log else None)


def importances(s) -> dict[str, float]:
    """Parameter importance by PED-ANOVA (no extra dependency); empty when too few trials to say."""

    if len(s.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "importances will be equal": said below
        try:
            found = {k: float(v) for k, v in get_param_importances(s, evaluator=PedAnovaImportanceEvaluator()).items()}
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            log.info("parameter importance not computed: %s", exc)
            return {}
    if len(set(found.values())) <= 1:
        log.info("parameter importance not computed: too few complete trials to tell the parameters apart")
        return {}
    return found


def nested(values: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys -> the nested params.yaml form (the override path that --set and dvc exp run -S take)."""
    return apply_overrides({}, overrides(values))


def dvc_command(values: dict[str, Any]) -> str:
    return "dvc exp run " + " ".join(f"-S '{o}'" for o in overrides(values))


def write_outputs(result: TuneResult, out: Path, storage: str) -> None:
    """best_params.yaml (a params.yaml fragment), trials.csv and search.png into the folder ``out``."""


    head = (f"# Best of study {result.study!r} ({storage}): trial {result.best_number}, {result.metric} = "
            f"{result.best_value:.4f} on the validation split, {len(result.trials)} finished trials.\n"
            f"# Trials ran with tune.max_steps; train with these values in full:\n"
            f"#   {dvc_command(result.best_params)}\n"
            f"# or merge this fragment into params.yaml, or pass each line as finetune train --set KEY=VALUE.\n")
    (out / "best_params.yaml").write_text(head + yaml.safe_dump(nested(result.best_params), sort_keys=False),
                                          encoding="utf-8")
    keys = sorted({k for t in result.trials for k in t["params"]})
    with (out / "trials.csv").open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["number", "state", result.metric, "seconds", *keys])
        for t in result.trials:
            w.writerow([t["number"], t["state"], t["value"], t["seconds"], *(t["params"].get(k) for k in keys)])
    (out / "search.png").write_bytes(plots.search(result.trials, result.importances, result.metric,
                                                  result.direction))
