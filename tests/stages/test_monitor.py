"""`finetune monitor` end to end on a tiny model: register stores the reference profile inside the version (its
sha256 tags cover it), the monitor loads it verified, decides drift on constructed batches, exits 0/3/1/2 and
logs an MLflow run tagged with the version."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pytest

from conftest import NEGATIVE, POSITIVE, write_register_inputs
from finetune.cli import main
from finetune.common.params import config_from_dict

NAME = "monitored"
OTHER_DOMAIN = [
    ("The quarterly earnings report shows revenue growth in the semiconductor segment, driven by datacenter "
     "demand, while operating margins narrowed because of higher logistics costs."),
    ("Preheat the oven to 200 degrees, whisk the eggs with sugar and flour, then bake the batter for forty "
     "minutes until the crust is golden brown and a skewer comes out clean."),
    ("The committee postponed the vote on the infrastructure bill after lengthy negotiations over funding "
     "formulas for rural broadband and the maintenance of regional railway lines."),
]


def reviews(n: int, offset: int = 0) -> pd.DataFrame:
    rng = random.Random(offset)
    rows = []
    for i in range(offset, offset + n):
        pos = i % 2 == 0
        pool = POSITIVE if pos else NEGATIVE
        rows.append((f"{rng.choice(pool)}, {rng.choice(pool)}", "fresh" if pos else "rotten"))
    return pd.DataFrame(rows, columns=["text", "label"])


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tiny_classifier_dir):
    """The tiny classifier registered with a 300-review test split; the project folder to run the CLI in."""
    import os

    from finetune.common import tracking
    from finetune.stages.register import run_register

    project = tmp_path_factory.mktemp("monitor-project")
    old = os.getcwd()
    os.chdir(project)
    try:
        (project / "params.yaml").write_text(Path(__file__).resolve().parents[2].joinpath("params.yaml").read_text())
        evaluation, splits = write_register_inputs(project, tiny_classifier_dir, reviews(300))
        cfg = config_from_dict({"register": {"model_name": NAME, "experiment": "t", "floor": 0.0,
                                             "min_macro_f1": 0.0, "retries": 0}})
        uri, art = tracking.configure(".")
        reg = run_register(cfg, tiny_classifier_dir, evaluation, splits, None, project / "out" / "register",
                           {"git_commit": "abc"}, uri, art)
    finally:
        os.chdir(old)
    return project, reg, uri


def monitor(project: Path, uri: str, batch: pd.DataFrame | Path, capsys, *extra: str) -> tuple[int, str, dict]:
    import os

    path = batch
    if isinstance(batch, pd.DataFrame):
        path = project / f"batch-{len(list(project.glob('batch-*')))}.jsonl"
        batch.to_json(path, orient="records", lines=True)
    old = os.getcwd()
    os.chdir(project)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # what the CLI reads
    try:
        code = main(["monitor", "--model", f"models:/{NAME}@champion", "--input", str(path), *extra])
    except SystemExit as exc:
        code = exc.code
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.chdir(old)
    metrics = project / "out" / "monitor" / "metrics.json"
    return code, capsys.readouterr().err, json.loads(metrics.read_text()) if metrics.is_file() else {}


def test_held_out_reviews_are_no_drift_and_another_domain_is(registered, capsys):
    project, reg, uri = registered
    code, err, result = monitor(project, uri, reviews(200, offset=1000)[["text"]], capsys)
    assert code == 0, (err, result.get("fired"))
    assert result["version"] == reg["version"] and not result["drift"] and result["rows"] == 200
    code, err, result = monitor(project, uri, pd.DataFrame({"text": OTHER_DOMAIN * 40}), capsys)
    assert code == 3, err
    assert {"psi:char_length", "psi:token_count", "mmd:embeddings"} <= set(result["fired"])
    assert "DRIFT" in (project / "out" / "monitor" / "report.html").read_text()


def test_word_shuffled_reviews_are_drift_by_the_bigram_test(registered, capsys):
    project, _, uri = registered
    batch = reviews(200, offset=2000)[["text"]]
    rng = random.Random(0)
    batch["text"] = [" ".join(rng.sample(t.split(), len(t.split()))) for t in batch["text"]]
    code, err, result = monitor(project, uri, batch, capsys)
    assert code == 3, err
    assert "psi:bigram_seen_rate" in result["fired"] and "psi:char_length" not in result["fired"], result["fired"]
    assert "psi:bigram_seen_rate" in (project / "out" / "monitor" / "report.html").read_text()


def test_the_profile_is_stored_in_the_version_and_a_changed_one_is_refused(registered, capsys):
    from mlflow import MlflowClient

    project, reg, uri = registered
    tags = MlflowClient(uri).get_model_version(NAME, reg["version"]).tags
    for f in ("profile.json", "embeddings.npy", "bigrams.npy"):
        assert f"sha256/artifacts/reference_profile/{f}" in tags
    stored = next(p for p in project.rglob("reference_profile/profile.json") if "mlartifacts" in str(p)
                  or "artifacts" in p.parts[-4:])
    doc = json.loads(stored.read_text())
    assert doc["n"] == 300 and doc["labels"] == ["fresh", "rotten"] and sum(doc["predicted_counts"]) == 300
    original = stored.read_bytes()
    try:
        doc["features"]["char_length"][0] += 1
        stored.write_text(json.dumps(doc))
        code, err, _ = monitor(project, uri, reviews(50, offset=7)[["text"]], capsys, "--out", "out/tampered")
    finally:
        stored.write_bytes(original)
    assert code == 1
    assert "file artifacts/reference_profile/profile.json differs from the sha256 recorded" in err
    assert not (project / "out" / "tampered").exists()


def test_each_run_is_an_mlflow_run_tagged_with_the_version(registered, capsys):
    from mlflow import MlflowClient

    project, reg, uri = registered
    code, _, result = monitor(project, uri, reviews(60, offset=3), capsys)  # labelled: the metric tests run too
    assert code in (0, 3) and result["labelled"]
    assert {"bootstrap:accuracy", "bootstrap:macro_f1"} <= {t["test"] for t in result["tests"]}
    client = MlflowClient(uri)
    run = client.get_run(client.get_model_version(NAME, reg["version"]).tags["monitor.last_run_id"])
    assert run.data.tags["model_version"] == reg["version"] and run.data.tags["model_name"] == NAME
    assert run.data.tags["drift"] == str(result["drift"]).lower() and run.data.metrics["rows"] == 60
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"metrics.json", "report.html"}


def test_a_request_log_folder_is_read_and_a_large_batch_is_sampled_to_its_bound(registered, capsys):
    from finetune.serving.request_log import RequestLog

    project, _, uri = registered
    texts = reviews(120, offset=11)["text"].tolist()
    log = RequestLog(project / "requests", 1.0, "keep", 1000)
    log.add(NAME, "1", texts, [{"label": "fresh", "probabilities": {"fresh": 0.6, "rotten": 0.4}}] * len(texts))
    log.flush()
    code, err, result = monitor(project, uri, project / "requests", capsys, "--set", "monitor.max_batch_rows=50")
    assert code in (0, 3), err
    assert result["rows"] == 50 and result["rows_read"] == 120 and not result["labelled"]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name, content, words", [
    ("empty.jsonl", "", "the batch is empty"),
    ("numbers.jsonl", '{"text": "fine film"}\n{"text": 42}\n', "row 2: the text is int '42', not a string"),
    ("notext.csv", "review\nfine\n", "no 'text' column"),
    ("other.jsonl", '{"text": "fine film", "label": "PERSON"}\n', "row 1: label 'PERSON' is not one of the model's"),
    ("batch.txt", "fine film\n", "not a .csv, .jsonl or .parquet file"),
])
def test_bad_batches_end_in_one_line_and_write_nothing(registered, capsys, tmp_path, name, content, words):
    project, _, uri = registered
    code, err, _ = monitor(project, uri, _write(tmp_path / name, content), capsys, "--out", "out/bad")
    assert code == 1
    errors = [line for line in err.splitlines() if "error" in line]  # (transformers' loading bar may precede it)
    assert len(errors) == 1 and words in errors[0] and errors[0].startswith("finetune monitor: error: "), err
    assert not (project / "out" / "bad").exists()


def test_bad_config_exits_2(registered, capsys):
    project, _, uri = registered
    code, err, _ = monitor(project, uri, reviews(20)[["text"]], capsys, "--set", "monitor.alpha=0.7")
    assert code == 2 and "monitor.alpha" in err


def test_a_request_log_without_texts_feeds_its_predictions_to_the_prediction_tests(registered, capsys):
    """serve.log_text: sha256 keeps no text: the served probabilities alone are compared (predicted-label shares,
    confidence); the text-feature and embedding tests are listed as skipped. A log of another model is refused."""
    from finetune.serving.request_log import RequestLog

    project, _, uri = registered
    stored = next(p for p in project.rglob("reference_profile/profile.json") if "mlartifacts" in str(p))
    counts = json.loads(stored.read_text())["predicted_counts"]
    rare = ["fresh", "rotten"][counts.index(min(counts))]  # the class the version predicts less on its test split
    log = RequestLog(project / "hashed", 1.0, "sha256", 1000)
    one_class = {"label": rare, "probabilities": {"fresh": 0.98 if rare == "fresh" else 0.02,
                                                  "rotten": 0.98 if rare == "rotten" else 0.02}}
    log.add(NAME, "1", [f"text {i}" for i in range(80)], [one_class] * 80)
    log.flush()
    code, err, result = monitor(project, uri, project / "hashed", capsys)
    assert code == 3, err
    assert {t["test"] for t in result["tests"]} == {"chi2:predicted_labels", "drop:confidence"}
    assert result["fired"] == ["chi2:predicted_labels"] and result["rows"] == 80
    assert "mmd:embeddings" in result["skipped"] and "psi:bigram_seen_rate" in result["skipped"]
    other = RequestLog(project / "other-model", 1.0, "sha256", 1000)
    other.add("ner", "1", ["x"], [{"label": "PER", "probabilities": {"PER": 0.9, "ORG": 0.1}}])
    other.flush()
    code, err, _ = monitor(project, uri, project / "other-model", capsys, "--out", "out/other-model")
    assert code == 1 and "record 1: probabilities over ['ORG', 'PER'], not the model's labels" in err, err
    assert not (project / "out" / "other-model").exists()


def test_since_keeps_the_request_logs_recent_records(registered, capsys):
    from finetune.serving.request_log import RequestLog

    project, _, uri = registered
    log = RequestLog(project / "windowed", 1.0, "keep", 1000)
    texts = reviews(60, offset=21)["text"].tolist()
    log.add(NAME, "1", texts, [{"label": "fresh", "probabilities": {"fresh": 0.6, "rotten": 0.4}}] * len(texts))
    log.flush()
    old = [json.dumps({"ts": 1.0e9, "model": NAME, "version": "1", "text": t, "label": "fresh",
                       "probabilities": {"fresh": 0.6, "rotten": 0.4}}) for t in OTHER_DOMAIN * 10]
    _write(project / "windowed" / "requests-0-old.jsonl", "\n".join(old) + "\n")  # from 2001
    code, err, result = monitor(project, uri, project / "windowed", capsys, "--since", "2026-01-01")
    assert code in (0, 3) and result["rows_read"] == 60, err
    code, err, result = monitor(project, uri, project / "windowed", capsys)
    assert code == 3 and result["rows_read"] == 90 and "psi:char_length" in result["fired"], err
    code, err, _ = monitor(project, uri, project / "windowed", capsys, "--since", "last tuesday")
    assert code == 2 and "--since 'last tuesday': not an ISO 8601 date" in err
    code, err, _ = monitor(project, uri, reviews(20)[["text"]], capsys, "--since", "2026-01-01")
    assert code == 1 and "applies to a request-log folder, not a file" in err


def test_the_int8_variant_is_refused_naming_the_fp32_uri(registered, capsys):
    from mlflow import MlflowClient

    project, reg, uri = registered
    client = MlflowClient(uri)
    client.create_registered_model(f"{NAME}-int8")
    mv = client.create_model_version(f"{NAME}-int8", str(project), tags={"fp32_model": f"{NAME}/{reg['version']}"})
    client.set_registered_model_alias(f"{NAME}-int8", "champion", mv.version)
    for ref, fp32 in (("@champion", f"models:/{NAME}@champion"), (f"/{mv.version}", f"models:/{NAME}/{reg['version']}")):
        code, err, _ = monitor(project, uri, reviews(20)[["text"]], capsys, "--model", f"models:/{NAME}-int8{ref}",
                               "--out", "out/int8")
        assert code == 1 and f"the int8 ONNX variant of {NAME}/{reg['version']}" in err, err
        assert f"monitor the fp32 version instead: --model {fp32}" in err
        assert not (project / "out" / "int8").exists()
