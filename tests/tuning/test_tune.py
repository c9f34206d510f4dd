"""`finetune tune`: real trials of the tiny model (a few steps each) on a real Optuna study and a real MLflow store;
the Katib Experiment generated from the same params.yaml, checked against the schema derived from Katib's API."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO, toy_frame
from finetune.common.coercion import ConfigError
from finetune.common.config import TokenizeConfig
from finetune.common.params import apply_overrides, config_from_dict, load_config

SPACE = {"train.learning_rate": {"low": 1e-3, "high": 1e-2, "log": True},
         "train.batch_size": {"choices": [8, 16]},
         "train.warmup_ratio": {"low": 0.0, "high": 0.2}}


@pytest.fixture(scope="module")
def train_val_tokens(tiny_model_dir, tmp_path_factory) -> Path:
    """Tokenized train and val splits ONLY: a tune that opened the test split would fail on the missing file."""
    from finetune.stages.tokenize import tokenize, write_tokens

    df = toy_frame(40).sample(frac=1, random_state=0)
    tokens, meta = tokenize({"train": df.iloc[:60], "val": df.iloc[60:80]}, ["fresh", "rotten"], tiny_model_dir,
                            TokenizeConfig(max_length=16))
    out = tmp_path_factory.mktemp("tune-tokens") / "tokenize"
    write_tokens(tokens, meta, out)
    assert not (out / "test.npz").exists()
    return out


def _raw(tiny_model_dir, **tune) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["model"]["base"] = str(tiny_model_dir)
    raw["train"].update(threads=1, seed=1)
    raw["tune"].update({"trials": 3, "max_steps": 8, "evals": 4, "startup_trials": 1, "space": SPACE, **tune})
    return raw


class _PruneTrial:
    """A pruner that stops trial ``number`` at its first validation point: the pruned path, deterministically."""

    def __init__(self, number: int):
        self.number = number

    def prune(self, study, trial) -> bool:
        return trial.number == self.number


def test_trials_are_nested_runs_one_is_pruned_the_study_resumes_and_best_params_load(
        train_val_tokens, tiny_model_dir, tmp_path, monkeypatch):
    import optuna
    from mlflow import MlflowClient

    from finetune.tuning.runner import run_tune

    monkeypatch.chdir(tmp_path)  # the study's SQLite file goes to the project root: here
    monkeypatch.setattr(optuna.pruners, "MedianPruner", lambda **kw: _PruneTrial(1))  # pruner: median -> this
    tracking = (f"sqlite:///{tmp_path / 'mlflow.db'}", (tmp_path / "mlartifacts").as_uri())
    raw = _raw(tiny_model_dir)
    first = run_tune(raw, train_val_tokens, tmp_path / "out" / "tune", tracking)

    assert [t["state"] for t in first["trials"]] == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert (tmp_path / "optuna.db").is_file()
    client = MlflowClient(tracking[0])
    exp = client.get_experiment_by_name(raw["register"]["experiment"])
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("finetune.stage") == "tune"]
    trials = sorted((r for r in runs if r.data.tags.get("finetune.stage") == "tune-trial"),
                    key=lambda r: int(r.data.tags["trial_number"]))
    assert len(parents) == 1 and len(trials) == 3
    parent = parents[0]
    assert parent.info.run_id == first["parent_run"] and parent.info.status == "FINISHED"
    assert parent.data.tags["study"] == "finetune" and parent.data.tags["storage"].endswith("optuna.db")
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(first["best_value"])
    for run, state, status in zip(trials, ["COMPLETE", "PRUNED", "COMPLETE"], ["FINISHED", "KILLED", "FINISHED"]):
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["trial_state"] == state and run.info.status == status
        assert set(run.data.params) == set(SPACE)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
        assert steps == ([2] if state == "PRUNED" else [2, 4, 6, 8])  # tune.evals=4 of tune.max_steps=8
        assert run.data.metrics["final_val_accuracy"] == pytest.approx(first["trials"][trials.index(run)]["value"])
    assert float(trials[0].data.params["train.learning_rate"]) == pytest.approx(
        first["trials"][0]["params"]["train.learning_rate"])

    # resume: trials=4 runs exactly one more trial, under the same parent run
    second = run_tune(_raw(tiny_model_dir, trials=4), train_val_tokens, tmp_path / "out" / "tune", tracking)
    assert [t["number"] for t in second["trials"]] == [0, 1, 2, 3]
    runs = client.search_runs([exp.experiment_id])
    assert sum(r.data.tags.get("finetune.stage") == "tune-trial" for r in runs) == 4
    assert [r.info.run_id for r in runs if r.data.tags.get("finetune.stage") == "tune"] == [parent.info.run_id]

    # the outputs: a params.yaml fragment and its `dvc exp run -S` line, both accepted by the config
    out = tmp_path / "out" / "tune"
    assert {p.name for p in out.iterdir()} >= {"best_params.yaml", "trials.csv", "search.png"}
    text = (out / "best_params.yaml").read_text()
    fragment = yaml.safe_load(text)
    assert set(fragment) == {"train"} and set(fragment["train"]) == {k.split(".")[1] for k in SPACE}
    merged = yaml.safe_load((REPO / "params.yaml").read_text())
    merged["train"].update(fragment["train"])
    cfg = config_from_dict(merged)
    (line,) = [ln for ln in text.splitlines() if "dvc exp run" in ln]
    sets = re.findall(r"-S '([^']+)'", line)
    assert len(sets) == len(SPACE)
    assert load_config(REPO / "params.yaml", sets).train == cfg.train
    assert cfg.train.batch_size == second["best_params"]["train.batch_size"]
    assert cfg.train.learning_rate == pytest.approx(second["best_params"]["train.learning_rate"])
    rows = (out / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("number,state,val_accuracy,seconds,") and len(rows) == 5
    assert (out / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tune_is_given_train_and_val_only(tiny_model_dir, tmp_path):
    from finetune.tuning.search import TuneError, tune

    with pytest.raises(TuneError, match="train and val splits only"):
        tune(_raw(tiny_model_dir), {"train": None, "val": None, "test": None}, {}, tiny_model_dir,
             tmp_path / "optuna.db")
    assert not (tmp_path / "optuna.db").exists()


def test_trial_mode_prints_the_lines_katibs_stdout_collector_reads(train_val_tokens, tiny_model_dir):
    from finetune.tuning.runner import run_tune_trial

    lines = []
    raw = apply_overrides(_raw(tiny_model_dir), ["train.learning_rate=5.0e-3", "train.batch_size=8"])
    final = run_tune_trial(raw, train_val_tokens, emit=lines.append)
    assert len(lines) == 5  # tune.evals validation points, then the final values
    # Katib's default StdOut filter: ([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)
    found = dict(re.findall(r"([\w|-]+)\s*=\s*([+-]?\d*(?:\.\d+)?(?:[Ee][+-]?\d+)?)", lines[-1]))
    assert float(found["val_accuracy"]) == pytest.approx(final["val_accuracy"], abs=1e-5)
    assert 0 <= final["val_accuracy"] <= 1 and "step=2" in lines[0]


@pytest.mark.parametrize("space, words", [
    ("{train.nonsense: {low: 1, high: 2}}", "tune.space.train.nonsense: train.nonsense is not a config key"),
    ("{tune.trials: {choices: [1, 2]}}", "tune.space.tune.trials: tune.trials is not a config key"),
    ("{train.lora: {choices: [1]}}", "tune.space.train.lora: train.lora is not a config key"),
    ("{train.batch_size: {low: 8.5, high: 32}}", "tune.space.train.batch_size.low = 8.5: must be an integer"),
    ("{train.device: {low: 1, high: 2}}", "train.device is not a number; give {choices: [..]}"),
    ("{train.learning_rate: {low: 0, high: 1.0e-3, log: true}}", "low = 0.0 must be > 0 with log: true"),
    ("{train.learning_rate: {low: 1.0e-3, high: 1.0e-4}}", "low = 0.001 must be < high = 0.0001"),
    ("{train.learning_rate: {lo: 1, high: 2}}", "a range needs low and high, optionally log and step (unknown: lo)"),
    ("{train.batch_size: {choices: []}}", "choices must be a non-empty list"),
    ("{}", "tune.space = {}: must be a non-empty mapping"),
])
def test_a_bad_search_space_is_one_line_naming_the_key(space, words):
    with pytest.raises(ConfigError) as exc:
        load_config(REPO / "params.yaml", [f"tune.space={space}"])
    assert words in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


def test_a_value_of_the_space_that_the_config_refuses_is_named_before_any_trial(tiny_model_dir):
    from finetune.tuning.search import check_space

    raw = apply_overrides(_raw(tiny_model_dir), ["tune.space={train.batch_size: {choices: [16, 0]}}"])
    with pytest.raises(ConfigError, match=r"^tune.space.train.batch_size: the value 0 is not allowed: "
                                          r"train.batch_size = 0: must be >= 1$"):
        check_space(raw, config_from_dict(raw).tune)


# ---- the Katib Experiment ----

KATIB = REPO / "k8s" / "components" / "katib" / "experiment.yaml"


def _rendering() -> str:
    import sys

    from finetune.cluster.katib import render

    sys.path.insert(0, str(REPO))
    from pipelines.finetune_pipeline import DEFAULT_DATA_URI

    cluster = yaml.safe_load((REPO / "pipelines" / "cluster.yaml").read_text())
    return render(load_config(REPO / "params.yaml"), cluster, DEFAULT_DATA_URI)


def _validate(obj: dict) -> None:
    import jsonschema

    schema = json.loads((REPO / "k8s" / "schemas" / "experiment-v1beta1.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(obj)


def test_katib_experiment_is_generated_from_params_and_validates():
    assert KATIB.read_text() == _rendering(), \
        "stale: run `finetune tune --katib > k8s/components/katib/experiment.yaml`"
    exp = yaml.safe_load(KATIB.read_text())
    _validate(exp)
    spec, tune = exp["spec"], load_config(REPO / "params.yaml").tune
    assert [p["name"] for p in spec["parameters"]] == list(tune.space)
    by_name = {p["name"]: p for p in spec["parameters"]}
    lr = tune.space["train.learning_rate"]
    assert by_name["train.learning_rate"]["parameterType"] == "double"
    space = by_name["train.learning_rate"]["feasibleSpace"]
    assert (float(space["min"]), float(space["max"]), space["distribution"]) == (lr["low"], lr["high"], "logUniform")
    assert re.search(r"min: '1\.0e-05'", KATIB.read_text())  # quoted: no YAML reader turns it into a number
    assert by_name["train.batch_size"] == {"name": "train.batch_size", "parameterType": "categorical",
                                           "feasibleSpace": {"list": [str(c) for c in
                                                                      tune.space["train.batch_size"]["choices"]]}}
    assert spec["objective"]["objectiveMetricName"] == tune.metric and spec["objective"]["type"] == "maximize"
    assert spec["algorithm"]["algorithmName"] == tune.sampler and spec["maxTrialCount"] == tune.trials
    # every trial parameter is substituted into the command once, and the command is one the CLI accepts
    template = spec["trialTemplate"]
    assert [p["reference"] for p in template["trialParameters"]] == list(tune.space)
    job = template["trialSpec"]
    assert "namespace" not in job.get("metadata", {})  # Katib refuses a namespaced trial template
    (prepare,) = job["spec"]["template"]["spec"]["initContainers"]
    carried = {e["name"]: e.get("value") for e in prepare["env"]}["FINETUNE_PARAMS"]  # the image has no params.yaml
    assert config_from_dict(yaml.safe_load(carried)) == load_config(REPO / "params.yaml")
    assert "> /work/params.yaml" in prepare["args"][0]
    (trial,) = job["spec"]["template"]["spec"]["containers"]
    assert trial["name"] == template["primaryContainerName"] and trial["command"] == ["finetune"]
    args = " ".join(trial["args"])
    for p in template["trialParameters"]:
        assert args.count(f"${{trialParameters.{p['name']}}}") == 1
    sample = {"learningRate": "1.5e-05", "batchSize": "16", "warmupRatio": "0.1", "weightDecay": "0.01"}
    filled = [re.sub(r"\$\{trialParameters\.(\w+)\}", lambda m: sample[m.group(1)], a) for a in trial["args"]]
    from finetune.cli import build_parser

    parsed = build_parser().parse_args(filled)
    assert parsed.command == "tune" and parsed.trial and parsed.tokens.endswith("/tokenize")
    assert parsed.params == "/work/params.yaml"
    cfg = load_config(REPO / "params.yaml", parsed.overrides)
    assert cfg.train.learning_rate == 1.5e-05 and cfg.train.batch_size == 16


@pytest.mark.parametrize("mutate, message", [
    (lambda e: e["spec"]["parameters"][0].update(parameterType="float"), "'float' is not one of"),
    (lambda e: e["spec"]["objective"].update(type="max"), "'max' is not one of"),
    (lambda e: e["spec"]["parameters"][0]["feasibleSpace"].update(distribution="loguniform"), "is not one of"),
    (lambda e: e["spec"].update(maxTrialCounts=8), "Additional properties are not allowed"),
    (lambda e: e["spec"].update(maxTrialCount="8"), "'8' is not of type 'integer'"),
])
def test_katib_schema_rejects_broken_experiments(mutate, message):
    import jsonschema

    exp = yaml.safe_load(KATIB.read_text())
    mutate(exp)
    with pytest.raises(jsonschema.ValidationError) as err:
        _validate(exp)
    assert message in str(err.value.message)


# ---- only what a trial applies is searched; the study's file; killed runs ----

@pytest.mark.parametrize("key, dist", [("model.base", {"choices": ["a", "b"]}),
                                       ("register.floor", {"low": 0.5, "high": 0.9}),
                                       ("tokenize.max_length", {"choices": [8, 16]})])
def test_a_key_no_trial_applies_is_refused_before_any_trial(tiny_model_dir, key, dist):
    """A trial trains with its train section only: tuning model.base, register.floor or tokenize.max_length would
    'find' a best value no trial used (best_params.yaml recommended max_length: 8, floor: 0.73)."""
    from finetune.tuning.search import check_space

    raw = _raw(tiny_model_dir, space={**SPACE, key: dist})
    with pytest.raises(ConfigError) as exc:
        check_space(raw, config_from_dict(raw).tune)
    msg = str(exc.value)
    assert msg.startswith(f"tune.space.{key}: a trial does not apply {key}") and "only train.* keys" in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("storage, env, words", [
    ("../outside.db", None, "is outside the project"),
    ("{tmp}/elsewhere.db", None, "is outside the project"),
    ("mlflow.db", None, "is the MLflow tracking store"),
    ("store/runs.db", "sqlite:///store/runs.db", "is the MLflow tracking store"),
])
def test_a_study_file_outside_the_project_or_in_the_mlflow_store_is_refused(
        train_val_tokens, tiny_model_dir, tmp_path, monkeypatch, storage, env, words):
    """Optuna created its tables in mlflow.db (then a traceback), or a file anywhere: refused before any table."""
    import sqlite3

    from finetune.tuning.runner import run_tune

    storage = storage.format(tmp=tmp_path)  # an absolute path outside the project
    project = tmp_path / "project"
    (project / "store").mkdir(parents=True)
    monkeypatch.chdir(project)
    if env:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    target = (project / storage).resolve()
    if target.name != "elsewhere.db":  # an MLflow store that exists: it must keep only its own tables
        sqlite3.connect(target).close()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(ConfigError) as exc:
        run_tune(_raw(tiny_model_dir, storage=storage), train_val_tokens, project / "out",
                 (f"sqlite:///{project / 'mlflow.db'}", None))
    msg = str(exc.value)
    assert msg.startswith(f"tune.storage = {storage!r}: ") and words in msg and "\n" not in msg, msg
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no study file, no outputs
    if target.exists():
        assert sqlite3.connect(target).execute("select name from sqlite_master").fetchall() == []


def test_the_runs_of_a_killed_tune_are_reaped_by_the_next_tune(train_val_tokens, tiny_model_dir, tmp_path,
                                                                  monkeypatch):
    """A killed tune left its parent and trial runs RUNNING forever: the next tune marks those with a stale
    heartbeat FAILED (a live tune's runs, with a fresh heartbeat, are left alone), and its own runs beat."""
    import time

    from mlflow import MlflowClient

    from finetune.registry import hygiene
    from finetune.tuning.runner import run_tune

    monkeypatch.chdir(tmp_path)
    tracking = (f"sqlite:///{tmp_path / 'mlflow.db'}", (tmp_path / "mlartifacts").as_uri())
    raw = _raw(tiny_model_dir, trials=1)
    client = MlflowClient(tracking[0])
    exp_id = client.create_experiment(raw["register"]["experiment"], tracking[1])
    old = str(1_000_000_000.0)
    dead_parent = client.create_run(exp_id, tags={hygiene.STAGE_TAG: "tune", hygiene.HEARTBEAT_TAG: old})
    dead_trial = client.create_run(exp_id, tags={hygiene.STAGE_TAG: "tune-trial", hygiene.HEARTBEAT_TAG: old,
                                                 "mlflow.parentRunId": dead_parent.info.run_id})
    live = client.create_run(exp_id, tags={hygiene.STAGE_TAG: "tune-trial", hygiene.HEARTBEAT_TAG: str(time.time())})

    result = run_tune(raw, train_val_tokens, tmp_path / "out", tracking)
    for run in (dead_parent, dead_trial):
        got = client.get_run(run.info.run_id)
        assert got.info.status == "FAILED" and "process died" in got.data.tags["finetune.failed"], got.info
    assert client.get_run(live.info.run_id).info.status == "RUNNING"
    parent = client.get_run(result["parent_run"])
    assert parent.info.status == "FINISHED" and float(parent.data.tags[hygiene.HEARTBEAT_TAG]) > time.time() - 600
    (trial,) = [r for r in client.search_runs([exp_id], "tags.trial_number = '0'")]
    assert trial.info.status == "FINISHED" and hygiene.HEARTBEAT_TAG in trial.data.tags
