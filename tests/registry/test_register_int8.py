"""The int8 (ONNX) variant in the registry: registered beside the fp32 version by the register stage when the
compress stage passed it, its alias following the fp32 one; verified on load; refused when its gate refused it;
its figures in the run report and the model card. Real MLflow (the project's default SQLite store)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import serving, toy_frame
from finetune.cli import main
from finetune.common.config import CompressConfig
from finetune.common.digests import MODEL_DIGEST, model_digest
from finetune.common.files import write_json
from finetune.common.outputs import ONNX_INT8
from finetune.common.params import config_from_dict
from finetune.registry.loading import load_verified
from finetune.registry.request import RegistryError
from finetune.stages.compress import compress, onnx_runner
from finetune.stages.register import run_register

NAME = "toy"
TEXTS = ["a wonderful film", "a dull mess", "boring and far too long, " * 10, "ok"]
PROB_TOL = 1e-5  # the registered pyfunc and a bare ONNX Runtime session run the same graph on the same ids


@pytest.fixture(scope="module")
def compressed(tiny_classifier_dir, toy_test, tmp_path_factory):
    test, meta = toy_test
    out = tmp_path_factory.mktemp("compress") / "out"
    result = compress(tiny_classifier_dir, test, meta, CompressConfig(threads=1, latency_requests=3), out)
    assert result.passed
    return out


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder: evaluate and validate outputs, and the default store (mlflow.db, mlartifacts/)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "splits").mkdir()
    toy_frame(10).to_parquet(tmp_path / "splits" / "test.parquet")
    write_json(tmp_path / "splits" / "report.json", {"data": "toy.csv", "rows": 20})
    return tmp_path


def _register(project: Path, model: Path, compress_dir: Path | None, accuracy: float, out: str) -> dict:
    from finetune.common import tracking

    evaluation = project / f"eval-{out}"
    write_json(evaluation / "metrics.json", {"accuracy": accuracy, "macro_f1": accuracy, "n": 20,
                                             "labels": ["fresh", "rotten"], MODEL_DIGEST: model_digest(model)})
    cfg = config_from_dict({"register": {"model_name": NAME, "experiment": "t", "floor": 0.5, "retries": 0}})
    uri, art = tracking.configure(".")
    run_register(cfg, model, evaluation, project / "splits", None, project / out, {"git_commit": "abc"}, uri, art,
                 compress=compress_dir)
    return json.loads((project / out / "registration.json").read_text())


def _session_probs(folder: Path, texts: list[str]) -> np.ndarray:
    """What a bare ONNX Runtime session on the compress output answers (tokenized by transformers)."""
    from transformers import AutoTokenizer

    max_length = config_from_dict({}).tokenize.max_length  # what run_register gives the pyfunc
    enc = AutoTokenizer.from_pretrained(str(folder))(texts, truncation=True, max_length=max_length, padding=True,
                                                     return_tensors="np")
    # on the pyfunc's threads (0: the CPUs available): dynamic int8 quantizes activations per call, so rows split
    # into other calls would differ in the 5th decimal
    logits = onnx_runner(folder / ONNX_INT8, 0)(enc["input_ids"].astype(np.int64),
                                                enc["attention_mask"].astype(np.int64))
    z = np.exp(logits - logits.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def test_passing_variant_is_registered_and_its_alias_follows_the_fp32_champion(tiny_classifier_dir, compressed,
                                                                             project, capsys):
    from mlflow import MlflowClient

    reg = _register(project, tiny_classifier_dir, compressed, 0.9, "r1")
    assert (reg["model_name"], reg["version"], reg["alias"]) == (NAME, "1", "champion")
    int8 = reg["int8"]
    assert int8["registered"] is True and int8["model_uri"] == f"models:/{NAME}-int8/1"
    assert (int8["model_name"], int8["version"], int8["alias"]) == (f"{NAME}-int8", "1", "champion")

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    mv = client.get_model_version_by_alias(f"{NAME}-int8", "champion")
    tags = mv.tags
    assert tags["fp32_model"] == f"{NAME}/1" and tags["complete"] == "true" and tags["task"]
    assert json.loads(tags["labels"]) == ["fresh", "rotten"]
    stored = {k.removeprefix("sha256/") for k in tags if k.startswith("sha256/")}
    assert f"artifacts/onnx/{ONNX_INT8}" in stored and "artifacts/onnx/tokenizer.json" in stored
    assert "artifacts/onnx/model.onnx" not in stored  # the fp32 ONNX file is not shipped with the int8 model
    assert client.get_model_version(NAME, "1").tags["int8_version"] == f"{NAME}-int8/1"

    # load_verified: same label set and probabilities format as fp32, the numbers of the ONNX session
    model = load_verified(f"models:/{NAME}-int8@champion", f"sqlite:///{project / 'mlflow.db'}")
    records = model.predict(TEXTS, params={"probabilities": True})
    expected = _session_probs(compressed, TEXTS)
    assert [r["label"] for r in records] == [["fresh", "rotten"][i] for i in expected.argmax(1)]
    got = np.array([[r["probabilities"]["fresh"], r["probabilities"]["rotten"]] for r in records])
    assert np.abs(got - expected).max() < PROB_TOL

    # the CLI goes through load_verified too
    assert main(["predict", "--model", f"models:/{NAME}-int8@champion", *TEXTS[:2]]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in out] == [r["label"] for r in records[:2]]
    assert all(set(r) == {"text", "label", "probabilities"} and set(r["probabilities"]) == {"fresh", "rotten"}
               for r in out)

    # a weaker fp32 version stays challenger: so does its int8 variant, and @champion stays on v1
    reg2 = _register(project, tiny_classifier_dir, compressed, 0.6, "r2")
    assert reg2["alias"] == "challenger" and reg2["int8"]["alias"] == "challenger"
    assert reg2["int8"]["version"] == "2"
    assert str(client.get_model_version_by_alias(f"{NAME}-int8", "champion").version) == "1"
    assert client.get_model_version_by_alias(f"{NAME}-int8", "challenger").tags["fp32_model"] == f"{NAME}/2"


def test_report_and_card_show_the_compress_figures(tiny_classifier_dir, compressed, project):
    reg = _register(project, tiny_classifier_dir, compressed, 0.9, "r1")
    v = json.loads((compressed / "metrics.json").read_text())["variants"]["onnx_int8"]
    card = (project / "r1" / "model_card.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith("| onnx_int8 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["onnx_int8", f"{v['accuracy']:.4f}", f"{v['accuracy_delta']:.4f}", f"{v['macro_f1']:.4f}",
                     f"{v['macro_f1_delta']:.4f}", f"{v['size_mb']:.4f}", f"{v['latency_ms_p50']:.4f}",
                     f"{v['latency_ms_p95']:.4f}", f"{v['texts_per_s']:.4f}",
                     "-" if v.get("peak_memory_mb") is None else f"{v['peak_memory_mb']:.4f}"]
    assert "texts/s (batch 32)" in card and "| pytorch_fp32 |" in card and "| onnx_fp32 |" in card
    assert f"registered as `{reg['int8']['model_uri']}` (@champion)" in card
    # the registry holds the same, final card (it is rewritten once the variant's outcome is known)
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert client.get_model_version(NAME, reg["version"]).description == card
    stored = Path(client.download_artifacts(reg["run_id"], "model_card.md", str(project / "dl")))
    assert stored.read_text(encoding="utf-8") == card

    page = (project / "r1" / "report.html").read_text()
    section = page[page.index("<section id=compress>"):]
    section = section[:section.index("</section>")]
    for value in (f"{v['accuracy']:.4f}", f"{v['accuracy_delta']:.4f}", f"{v['size_mb']:.2f}",
                  f"{v['latency_ms_p50']:.2f}", f"{v['latency_ms_p95']:.2f}", f"{v['texts_per_s']:.2f}"):
        assert value in section, value
    assert "onnx_int8" in section and f"models:/{NAME}-int8/1" in section


def test_refused_variant_is_not_registered_and_registration_says_why(tiny_classifier_dir, compressed, project):
    from mlflow import MlflowClient

    refused = project / "compress-refused"
    shutil.copytree(compressed, refused)
    m = json.loads((refused / "metrics.json").read_text())
    m.update(int8_passed=False, message="int8 variant refused: drop 0.0500 > compress.max_accuracy_drop 0.01")
    # what compress chooses then when no other variant fits (on the tiny model, timing noise may otherwise have
    # made onnx_fp32 the choice, registered as <name>-onnx: not what this test is about)
    m["serving"] = {"variant": "pytorch_fp32", "file": None, "made_by": "the teacher as trained",
                    "reason": "no variant within the budget, the fp32 model is served: onnx_int8: refused by "
                              "compress.max_accuracy_drop"}
    (refused / "metrics.json").write_text(json.dumps(m))

    reg = _register(project, tiny_classifier_dir, refused, 0.9, "r1")
    assert reg["alias"] == "champion" and reg["version"] == "1"  # fp32 registration went on
    assert reg["int8"] == {"registered": False, "reason": "no int8 variant: int8 variant refused: drop 0.0500 > "
                                                          "compress.max_accuracy_drop 0.01"}
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert [r.name for r in client.search_registered_models()] == [NAME]
    assert "The int8 variant was not registered: no int8 variant: int8 variant refused" in \
        (project / "r1" / "model_card.md").read_text()

    reg = _register(project, tiny_classifier_dir, compressed, 0.95, "r2")
    assert reg["alias"] == "champion" and reg["int8"]["alias"] == "champion"
    # a new fp32 champion without a variant: -int8@champion must not stay on the old champion's variant
    reg = _register(project, tiny_classifier_dir, None, 0.99, "r3")
    assert reg["alias"] == "champion" and reg["version"] == "3"
    assert reg["int8"] == {"registered": False, "reason": "no int8 variant: no compress output was given; "
                                                          "@champion removed from version 1 of the int8 model"}
    assert _int8_champion_parent(project) is None


def test_tampered_int8_file_in_the_store_is_refused_naming_the_file(tiny_classifier_dir, compressed, project):
    _register(project, tiny_classifier_dir, compressed, 0.9, "r1")
    [onnx] = [p for p in (project / "mlartifacts").rglob(ONNX_INT8) if "onnx" in p.parent.name]
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match=f"file artifacts/onnx/{ONNX_INT8} differs from the sha256"):
        load_verified(f"models:/{NAME}-int8@champion", f"sqlite:///{project / 'mlflow.db'}")


@pytest.mark.integration
def test_mlflow_models_serve_answers_for_the_int8_version(tiny_classifier_dir, compressed, project):
    reg = _register(project, tiny_classifier_dir, compressed, 0.9, "r1")
    expected = _session_probs(compressed, TEXTS)
    with serving(project, reg["int8"]["model_uri"]) as post:
        labels = post({"inputs": TEXTS})
        assert labels == [["fresh", "rotten"][i] for i in expected.argmax(1)]
        records = post({"inputs": TEXTS, "params": {"probabilities": True}})
        assert [r["label"] for r in records] == labels
        got = np.array([[r["probabilities"]["fresh"], r["probabilities"]["rotten"]] for r in records])
        assert np.abs(got - expected).max() < PROB_TOL


def test_a_killed_int8_registration_is_reaped_by_the_next_registration(tiny_classifier_dir, compressed, project,
                                                                        monkeypatch):
    """A register-int8 run whose process died (RUNNING, stale heartbeat, an unfinished version) is marked FAILED
    and its version deleted by the next registration, like a killed fp32 registration."""
    from mlflow import MlflowClient

    from finetune.registry import hygiene

    reg = _register(project, tiny_classifier_dir, compressed, 0.9, "r1")
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp_id = client.get_run(reg["run_id"]).info.experiment_id
    # what a process killed mid-way through _log_variant leaves: its run RUNNING, a version without `complete`
    dead = client.create_run(exp_id, tags={hygiene.STAGE_TAG: "register-int8",
                                           hygiene.HEARTBEAT_TAG: str(1_000_000_000.0)})
    source = client.get_model_version(f"{NAME}-int8", reg["int8"]["version"]).source
    half = client.create_model_version(f"{NAME}-int8", source, run_id=dead.info.run_id)
    assert client.get_run(dead.info.run_id).info.status == "RUNNING"

    reg2 = _register(project, tiny_classifier_dir, compressed, 0.6, "r2")
    run = client.get_run(dead.info.run_id)
    assert run.info.status == "FAILED" and "process died" in run.data.tags["finetune.failed"]
    versions = {str(v.version) for v in client.search_model_versions(f"name = '{NAME}-int8'")}
    assert str(half.version) not in versions and reg["int8"]["version"] in versions
    assert reg2["int8"]["registered"] is True


# ---- every figure bound to the model it measured ----

@pytest.fixture(scope="module")
def model_e(tiny_classifier_dir, tmp_path_factory):
    """Model E: the tiny classifier with another head (other weights, same labels and tokenizer)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("model-e") / "model"
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_classifier_dir))
    with torch.no_grad():
        model.classifier.bias += torch.tensor([0.7, -0.7])
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tiny_classifier_dir)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def e_outputs(model_e, toy_test, tmp_path_factory):
    """E's evaluate and compress outputs, written by the stages themselves."""
    from finetune.common.config import EvaluateConfig
    from finetune.stages.evaluate import evaluate, write_evaluation

    test, meta = toy_test
    root = tmp_path_factory.mktemp("e-outputs")
    write_evaluation(evaluate(model_e, test, meta, EvaluateConfig(), device="cpu"), root / "evaluate")
    assert compress(model_e, test, meta, CompressConfig(threads=1, latency_requests=3), root / "compress").passed
    return root / "evaluate", root / "compress"


def _registry_state(project: Path) -> tuple:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    models = {m.name: (sorted(str(v.version) for v in client.search_model_versions(f"name = '{m.name}'")),
                       dict(m.aliases or {})) for m in client.search_registered_models()}
    runs = sorted(r.info.run_id for e in client.search_experiments() for r in client.search_runs([e.experiment_id]))
    return models, runs


def _run_register(project: Path, model: Path, evaluation: Path, compress_dir: Path | None, out: str) -> dict:
    from finetune.common import tracking

    cfg = config_from_dict({"register": {"model_name": NAME, "experiment": "t", "floor": 0.0, "min_macro_f1": 0.0,
                                         "retries": 0}})
    uri, art = tracking.configure(".")
    return run_register(cfg, model, evaluation, project / "splits", None, project / out, {"git_commit": "abc"}, uri,
                        art, compress=compress_dir)


def test_another_models_evaluation_and_compress_are_refused_before_anything_is_logged(
        tiny_classifier_dir, model_e, e_outputs, compressed, project):
    """The issue's mix: model B registered with E's evaluate and compress folders. Refused naming both digests
    and both folders; the registry (a champion registered before) is exactly as it was."""
    e_eval, e_compress = e_outputs
    _register(project, tiny_classifier_dir, compressed, 0.9, "r1")  # a legitimate champion and its variant
    before = _registry_state(project)
    b_digest, e_digest = model_digest(tiny_classifier_dir), model_digest(model_e)
    assert b_digest != e_digest

    with pytest.raises(RegistryError) as exc:
        _run_register(project, tiny_classifier_dir, e_eval, e_compress, "mixed")
    msg = str(exc.value)
    assert (f"evaluate output {e_eval} measured the model with sha256 {e_digest}, but the model being registered, "
            f"{tiny_classifier_dir}, has sha256 {b_digest}") in msg and "Nothing was registered" in msg
    assert _registry_state(project) == before and not (project / "mixed").exists()

    # B's own evaluation but E's compress output: refused the same way, naming the compress folder
    b_eval = project / "eval-r1"
    with pytest.raises(RegistryError) as exc:
        _run_register(project, tiny_classifier_dir, b_eval, e_compress, "mixed")
    assert (f"compress output {e_compress} measured the model with sha256 {e_digest}, but the model being "
            f"registered, {tiny_classifier_dir}, has sha256 {b_digest}") in str(exc.value)
    assert _registry_state(project) == before


def test_a_swapped_int8_file_is_not_the_variant_compress_measured(tiny_classifier_dir, e_outputs, compressed, project):
    """B's compress output with E's int8 ONNX file put in its place: refused up front, naming the file and both
    digests; nothing registered."""
    from finetune.common.digests import file_sha256

    swapped = project / "compress-swapped"
    shutil.copytree(compressed, swapped)
    shutil.copy2(e_outputs[1] / ONNX_INT8, swapped / ONNX_INT8)
    _register(project, tiny_classifier_dir, compressed, 0.9, "r1")
    before = _registry_state(project)
    with pytest.raises(RegistryError) as exc:
        _run_register(project, tiny_classifier_dir, project / "eval-r1", swapped, "r2")
    assert (f"compress output {swapped}: file {ONNX_INT8} has sha256 {file_sha256(swapped / ONNX_INT8)}, compress "
            f"measured {file_sha256(compressed / ONNX_INT8)}: it is not the file compress measured") in str(exc.value)
    assert _registry_state(project) == before


# ---- the int8 champion follows the fp32 champion, whatever the order and whatever was killed ----

def _int8_champion_parent(project: Path) -> str | None:
    """fp32_model of <name>-int8@champion, or None when no int8 version holds @champion."""
    from mlflow import MlflowClient

    from finetune.registry.store import current_alias

    mv = current_alias(MlflowClient(f"sqlite:///{project / 'mlflow.db'}"), f"{NAME}-int8", "champion")
    return mv.tags["fp32_model"] if mv is not None else None


def _fp32_champion(project: Path) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    return f"{NAME}/{client.get_model_version_by_alias(NAME, 'champion').version}"


def test_a_paused_registrations_variant_does_not_take_the_int8_champion(tiny_classifier_dir, compressed, project):
    """The race in the issue, in its racy order: A's fp32 version is promoted, A pauses; E registers fully (fp32
    and variant); A resumes and registers its variant. -int8@champion stays E's variant."""
    import pandas as pd

    from finetune.common import tracking
    from finetune.common.lineage import split_hash
    from finetune.registry.request import RegistrationRequest
    from finetune.registry.transaction import register
    from finetune.registry.variants import VariantRequest, register_variant

    uri, art = tracking.configure(".")
    cfg = config_from_dict({"register": {"model_name": NAME, "experiment": "t", "floor": 0.5, "retries": 0}})
    metrics = {"accuracy": 0.8, "macro_f1": 0.8}
    req_a = RegistrationRequest.for_model(tiny_classifier_dir, metrics, cfg.register, uri, artifact_location=art,
                                          test_hash=split_hash(pd.read_parquet(project / "splits" / "test.parquet")))
    reg_a = register(req_a)  # A: fp32 promoted ...
    assert reg_a.promoted
    reg_e = _register(project, tiny_classifier_dir, compressed, 0.9, "e")  # ... E registers fully meanwhile ...
    assert reg_e["alias"] == "champion" and reg_e["int8"]["alias"] == "champion"
    late = register_variant(VariantRequest(req_a, reg_a, compressed, json.loads((compressed / "metrics.json")
                                                                                .read_text())))  # ... A resumes
    assert late["registered"] is True and late["alias"] is None
    assert f"no alias: fp32 v{reg_a.version} holds neither @champion nor @challenger now" in late["reason"]
    assert _int8_champion_parent(project) == _fp32_champion(project) == f"{NAME}/{reg_e['version']}"


class Killed(BaseException):
    """What kill -9 does to the registering process at that point: nothing after it runs."""


def _killed_at(monkeypatch, calls: set[int]):
    """Kill the registration at the given calls (1-based, counted from now) of the int8 alias derivation."""
    from finetune.registry import aliases

    real, seen = aliases.sync_variant_aliases, []

    def sync(*a, **kw):
        seen.append(1)
        if len(seen) in calls:
            raise Killed()
        return real(*a, **kw)

    monkeypatch.setattr(aliases, "sync_variant_aliases", sync)
    return lambda: monkeypatch.setattr(aliases, "sync_variant_aliases", real)


def test_a_registration_killed_between_the_alias_moves_is_repaired_by_the_next(tiny_classifier_dir, compressed,
                                                                             project, monkeypatch):
    """Killed right after its fp32 alias moved: @champion is C while -int8@champion still names B's variant. The
    next registration, even one that promotes nothing, repairs it: removed while the champion has no variant,
    then set to the champion's variant once one exists but its own alias move was killed."""
    _register(project, tiny_classifier_dir, compressed, 0.8, "b")
    assert _int8_champion_parent(project) == f"{NAME}/1"

    revive = _killed_at(monkeypatch, {1})  # C: killed between the fp32 alias move and the int8 derivation
    with pytest.raises(Killed):
        _register(project, tiny_classifier_dir, compressed, 0.9, "c")
    revive()
    assert _fp32_champion(project) == f"{NAME}/2" and _int8_champion_parent(project) == f"{NAME}/1"  # drifted
    d = _register(project, tiny_classifier_dir, None, 0.6, "d")  # unrelated, stays challenger
    assert d["alias"] == "challenger" and _fp32_champion(project) == f"{NAME}/2"
    assert _int8_champion_parent(project) is None  # C has no variant: no int8 champion rather than B's

    revive = _killed_at(monkeypatch, {2})  # F: variant registered, killed before its alias was derived
    with pytest.raises(Killed):
        _register(project, tiny_classifier_dir, compressed, 0.95, "f")
    revive()
    assert _fp32_champion(project) == f"{NAME}/4" and _int8_champion_parent(project) is None
    _register(project, tiny_classifier_dir, None, 0.61, "g")
    assert _int8_champion_parent(project) == _fp32_champion(project) == f"{NAME}/4"
