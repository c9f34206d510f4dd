"""A NER (``task: token``) version through register and ``finetune monitor``: register stores its reference
profile inside the version (covered by its sha256 tags), the monitor loads it verified and decides on tagged
feedback (CoNLL) and raw texts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from conftest import NER_MAX_LENGTH, VALIDATION
from finetune.cli import main
from finetune.common.params import config_from_dict
from monitoring.test_ner_profile import MIX, sentences

NAME = "monitored-ner"


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tagging_model_dir):
    """The hand-set tagging model registered as a token version with 300 tagged test sentences."""
    from finetune.common import tracking
    from finetune.common.digests import MODEL_DIGEST, model_digest
    from finetune.common.files import write_json
    from finetune.stages.register import run_register

    project = tmp_path_factory.mktemp("monitor-ner-project")
    old = os.getcwd()
    os.chdir(project)
    try:
        (project / "params.yaml").write_text(Path(__file__).resolve().parents[2].joinpath("params.yaml").read_text())
        texts, tags = sentences(300, seed=0, mix=MIX)
        (project / "validate").mkdir()
        pd.DataFrame({"text": texts, "label": tags}).to_parquet(project / "validate" / "test.parquet")
        write_json(project / "validate" / "report.json", VALIDATION)
        (project / "evaluate").mkdir()
        write_json(project / "evaluate" / "metrics.json", {
            "entity_micro_f1": 1.0, "entity_macro_f1": 1.0, "token_accuracy": 1.0, "accuracy": 1.0, "macro_f1": 1.0,
            MODEL_DIGEST: model_digest(tagging_model_dir)})
        cfg = config_from_dict({"task": "token", "tokenize": {"max_length": NER_MAX_LENGTH},
                                "register": {"model_name": NAME, "experiment": "t", "floor": 0.0,
                                             "metric": "entity_micro_f1", "min_macro_f1": 0.0, "retries": 0}})
        uri, art = tracking.configure(".")
        reg = run_register(cfg, tagging_model_dir, project / "evaluate", project / "validate", None,
                           project / "out" / "register", {"git_commit": "abc"}, uri, art)
    finally:
        os.chdir(old)
    return project, reg, uri, cfg


def monitor(project: Path, uri: str, path: Path, capsys) -> tuple[int, str, dict]:
    old = os.getcwd()
    os.chdir(project)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # what the CLI reads
    try:
        code = main(["monitor", "--model", f"models:/{NAME}@champion", "--input", str(path)])
    except SystemExit as exc:
        code = exc.code
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.chdir(old)
    metrics = project / "out" / "monitor" / "metrics.json"
    return code, capsys.readouterr().err, json.loads(metrics.read_text()) if metrics.is_file() else {}


def test_a_token_version_stores_its_profile_and_is_monitored_verified(registered, capsys):
    from mlflow import MlflowClient

    project, reg, uri, _ = registered
    tags = MlflowClient(uri).get_model_version(NAME, reg["version"]).tags
    for f in ("profile.json", "embeddings.npy", "bigrams.npy"):
        assert f"sha256/artifacts/reference_profile/{f}" in tags
    texts, labels = sentences(200, seed=1, mix=MIX)
    conll = project / "feedback.conll"
    conll.write_text("\n\n".join("\n".join(f"{w} {t}" for w, t in zip(x.split(" "), y)) for x, y in
                                 zip(texts, labels)) + "\n", encoding="utf-8")
    code, err, result = monitor(project, uri, conll, capsys)
    assert code == 0 and result["labelled"] and result["version"] == reg["version"], (err, result.get("fired"))
    f1 = next(t for t in result["tests"] if t["test"] == "bootstrap:entity_micro_f1")
    assert f1["statistic"] == 1.0 and f1["reference"] == 1.0
    raw = project / "no-entities.jsonl"
    pd.DataFrame({"text": sentences(200, seed=3, mix={})[0]}).to_json(raw, orient="records", lines=True)
    code, err, result = monitor(project, uri, raw, capsys)
    assert code == 3 and "chi2:predicted_entity_count" in result["fired"], (err, result.get("fired"))
