"""The serving variant in the registry: compress's choice (a student here) registered as ``<name>-student`` with
its lineage, its alias following the fp32 champion, recorded on the fp32 version and loaded, digest-verified,
through ``models:/<name>-serving@champion``; a tampered file of it is refused. Real MLflow (SQLite store)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import toy_frame
from finetune.cli import main
from finetune.common.config import CompressConfig
from finetune.common.digests import MODEL_DIGEST, model_digest
from finetune.common.files import read_json, write_json
from finetune.common.outputs import METRICS
from finetune.common.params import config_from_dict
from finetune.registry.loading import load_verified, pinned_version
from finetune.registry.request import RegistryError
from finetune.stages.compress import ServeBudget, compress, onnx_runner
from finetune.stages.register import run_register

NAME = "toy"
STUDENT = "student_L1_onnx_int8"
TEXTS = ["a wonderful film", "a dull mess", "boring and far too long, " * 10, "ok"]


@pytest.fixture(scope="module")
def compressed(tiny_classifier_dir, toy_test, tmp_path_factory):
    """compress with a student beside the teacher. The tiny teacher has one layer, so its "student" has the same
    compute and which one is fastest is chance: the serving choice is set to the student (the choice itself is
    tests/stages/test_compress_front.py's); metrics.json is not among the digested files."""
    root = tmp_path_factory.mktemp("serving")
    student = root / "student"
    shutil.copytree(tiny_classifier_dir, student)
    (student / "distill.json").write_text(json.dumps({"alpha": 0.5, "made_by": "distilled: teacher layers [0]"}))
    test, meta = toy_test
    compress(tiny_classifier_dir, test, meta, CompressConfig(threads=1, latency_requests=3), root / "out",
             students=[student], budget=ServeBudget(max_accuracy_drop=1.0))
    metrics = read_json(root / "out" / METRICS)
    metrics["serving"] = {"variant": STUDENT, "file": "student_L1.int8.onnx", "made_by": "distilled",
                          "reason": f"{STUDENT}: the most texts/s within serve.max_accuracy_drop 0.01"}
    write_json(root / "out" / METRICS, metrics)
    return root / "out"


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "splits").mkdir()
    toy_frame(10).to_parquet(tmp_path / "splits" / "test.parquet")
    write_json(tmp_path / "splits" / "report.json", {"data": "toy.csv", "rows": 20})
    return tmp_path


def _register(project: Path, model: Path, compress_dir: Path | None, out: str) -> dict:
    from finetune.common import tracking

    evaluation = project / f"eval-{out}"
    write_json(evaluation / "metrics.json", {"accuracy": 0.9, "macro_f1": 0.9, "n": 20,
                                             "labels": ["fresh", "rotten"], MODEL_DIGEST: model_digest(model)})
    cfg = config_from_dict({"register": {"model_name": NAME, "experiment": "t", "floor": 0.5, "retries": 0}})
    uri, art = tracking.configure(".")
    run_register(cfg, model, evaluation, project / "splits", None, project / out, {"git_commit": "abc"}, uri, art,
                 compress=compress_dir)
    return json.loads((project / out / "registration.json").read_text())


def _local_labels(folder: Path, onnx_file: str, texts: list[str]) -> list[str]:
    """What a bare ONNX Runtime session on the compress output's file decides."""
    from transformers import AutoTokenizer

    max_length = config_from_dict({}).tokenize.max_length
    enc = AutoTokenizer.from_pretrained(str(folder))(texts, truncation=True, max_length=max_length, padding=True,
                                                     return_tensors="np")
    logits = onnx_runner(folder / onnx_file, 1)(enc["input_ids"].astype(np.int64),
                                               enc["attention_mask"].astype(np.int64))
    return [["fresh", "rotten"][i] for i in logits.argmax(1)]


def test_the_chosen_student_is_registered_with_its_lineage_and_served_verified(tiny_classifier_dir, compressed,
                                                                              project, capsys):
    from mlflow import MlflowClient

    reg = _register(project, tiny_classifier_dir, compressed, "r1")
    served = reg["serving"]
    assert (served["model_name"], served["version"], served["variant"]) == (f"{NAME}-student", "1", STUDENT)
    assert served["recorded"] and served["model_uri"] == f"models:/{NAME}-serving/1"
    assert reg["int8"]["registered"]  # the teacher's int8 is registered as before, beside the student

    store = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(store)
    mv = client.get_model_version_by_alias(f"{NAME}-student", "champion")  # follows the fp32 champion
    tags = mv.tags
    assert tags["fp32_model"] == f"{NAME}/1" and tags["variant"] == STUDENT and tags["complete"] == "true"
    assert tags["made_by"] == "distilled: teacher layers [0]; ONNX, dynamic int8"
    stored = {k.removeprefix("sha256/") for k in tags if k.startswith("sha256/")}
    assert [f for f in stored if f.endswith(".onnx")] == ["artifacts/onnx/student_L1.int8.onnx"]  # only the chosen
    assert "artifacts/onnx/tokenizer.json" in stored
    fp32_tags = client.get_model_version(NAME, "1").tags
    assert fp32_tags["serving_model"] == f"{NAME}-student/1" and fp32_tags["serving_variant"] == STUDENT

    # models:/<name>-serving@champion: the student, loaded only after its digests matched; the local file's labels
    assert pinned_version(f"models:/{NAME}-serving@champion", store) == (f"{NAME}-student", "1")
    model = load_verified(f"models:/{NAME}-serving@champion", store)
    records = model.predict(TEXTS, params={"probabilities": True})
    assert [r["label"] for r in records] == _local_labels(compressed, "student_L1.int8.onnx", TEXTS)
    assert main(["predict", "--model", f"models:/{NAME}-serving@champion", *TEXTS[:2]]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in out] == [r["label"] for r in records[:2]]

    # tampered in the store: refused, naming the file
    [onnx] = (project / "mlartifacts").rglob("student_L1.int8.onnx")
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="file artifacts/onnx/student_L1.int8.onnx differs from the sha256"):
        load_verified(f"models:/{NAME}-serving@champion", store)


def test_without_a_chosen_variant_the_fp32_version_serves(tiny_classifier_dir, project):
    reg = _register(project, tiny_classifier_dir, None, "r1")
    assert reg["serving"]["variant"] == "pytorch_fp32" and reg["serving"]["model_name"] == NAME
    assert pinned_version(f"models:/{NAME}-serving@champion", f"sqlite:///{project / 'mlflow.db'}") == (NAME, "1")
