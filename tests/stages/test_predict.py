"""`finetune predict` and `mlflow models serve` against a registered (tiny) model."""

from __future__ import annotations

import io
import json
import os
import time

import pytest

from conftest import serving
from finetune.cli import main
from finetune.common.config import RegisterConfig
from finetune.registry.request import RegistrationRequest
from finetune.registry.transaction import register
from finetune.stages.predict import PredictInputError, predict, read_texts

NAME = "toy-predict"
TEXTS = ["a wonderful film", "a dull mess", "ok \u00e9t\u00e9 \u2014 \u201cfine\u201d"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_classifier_dir):
    """A folder laid out as `finetune register` leaves a project without MLFLOW_TRACKING_URI: mlflow.db and
    mlartifacts/ in it (tracking.configure's default), one registered version, aliased champion."""
    root = tmp_path_factory.mktemp("predict-project")
    cfg = RegisterConfig(model_name=NAME, experiment="p", floor=0.0)
    reg = register(RegistrationRequest.for_model(tiny_classifier_dir, {"accuracy": 0.9, "macro_f1": 0.9}, cfg,
                                                 f"sqlite:///{root / 'mlflow.db'}",
                                                 artifact_location=(root / "mlartifacts").as_uri()))
    assert reg.alias == "champion"
    return root


@pytest.fixture
def in_project(project, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # configure() sets it; monkeypatch removes it again
    monkeypatch.chdir(project)
    return project


def test_read_texts_lines_jsonl_and_tables(tmp_path):
    from finetune.common.files import DataError

    (tmp_path / "a.txt").write_text("first text\n\n  second, with \"quotes\"\n", encoding="utf-8")
    assert read_texts(tmp_path / "a.txt") == ["first text", '  second, with "quotes"']
    (tmp_path / "b.jsonl").write_text('{"text": "one", "id": 1}\n\n{"text": "two \u00e9"}\n', encoding="utf-8")
    assert read_texts(tmp_path / "b.jsonl") == ["one", "two \u00e9"]
    (tmp_path / "c.csv").write_text('id,text\n1,"a, b"\n2,NA\n', encoding="utf-8")
    assert read_texts(tmp_path / "c.csv") == ["a, b", "NA"]  # a review that reads "NA" is text
    assert read_texts("-", io.StringIO("x\ny\n")) == ["x", "y"]
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n', encoding="utf-8")
    with pytest.raises(PredictInputError, match=r"d.jsonl: \"text\" is missing or not a string in row\(s\) \[2\]"):
        read_texts(tmp_path / "d.jsonl")
    (tmp_path / "e.jsonl").write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_texts(tmp_path / "e.jsonl")
    (tmp_path / "f.csv").write_text("review\nfine\n", encoding="utf-8")
    with pytest.raises(PredictInputError, match=r'no "text" column \(found review\)'):
        read_texts(tmp_path / "f.csv")


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_read_texts_one_text_per_line_of_the_projects_own_data(real_reviews, tmp_path, eol):
    rows = [t for t in real_reviews["text"] if "\n" not in t and "\r" not in t and t.strip()]
    assert any("\x85" in t for t in rows)  # the row that made 2,000 reviews give 2,001 predictions
    rows += ["form\x0cfeed", "line\u2028separator", "para\u2029graph", "vertical\x0btab", "group\x1dsep"]
    (tmp_path / "reviews.txt").write_bytes(eol.join(rows).encode("utf-8") + eol.encode())
    assert read_texts(tmp_path / "reviews.txt") == rows  # 1:1, and each text unchanged
    assert read_texts("-", io.StringIO("\n".join(rows))) == rows
    # JSONL keeps such characters unescaped inside strings: a record must not be cut either
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows),
                                      encoding="utf-8")
    assert read_texts(tmp_path / "r.jsonl") == rows


def test_read_texts_uses_the_given_text_column_and_refuses_empty_input(tmp_path):
    (tmp_path / "b.csv").write_text("id,body\n1,great\n2,awful\n", encoding="utf-8")
    assert read_texts(tmp_path / "b.csv", text_column="body") == ["great", "awful"]
    with pytest.raises(PredictInputError, match=r'b.csv: no "text" column \(found id, body\); name the text column '
                                                r"with --text-column"):
        read_texts(tmp_path / "b.csv")
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(PredictInputError, match="empty.txt: no texts to label"):
        read_texts(tmp_path / "empty.txt")
    with pytest.raises(PredictInputError, match="stdin: no texts to label"):
        read_texts("-", io.StringIO(""))


def test_pyfunc_probabilities_and_unchanged_default(in_project):
    import mlflow.pyfunc

    from finetune.common import tracking

    tracking.configure(".")
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    labels = model.predict(TEXTS)
    assert isinstance(labels, list) and all(isinstance(x, str) for x in labels) and len(labels) == 3
    records = predict(model, TEXTS, batch_size=2)  # two batches
    assert [r["text"] for r in records] == TEXTS
    for rec, lab in zip(records, labels):
        probs = rec["probabilities"]
        assert set(probs) == {"fresh", "rotten"} and sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert rec["label"] == max(probs, key=probs.get) == lab


def test_cli_predict_uses_the_default_store_and_writes_jsonl(in_project, capsys):
    assert main(["predict", "--model", f"models:/{NAME}@champion", *TEXTS[:2]]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in out] == TEXTS[:2] and all(set(r) == {"text", "label", "probabilities"} for r in out)

    (in_project / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    assert main(["predict", "--model", f"models:/{NAME}/1", "--input", "in.jsonl", "--output", "res/p.jsonl"]) == 0
    res = [json.loads(line) for line in (in_project / "res" / "p.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in res] == TEXTS and res[:2] == out  # same model, same answers

    assert main(["predict", "--model", "models:/no-such-model@champion", "x"]) == 1
    assert "cannot load models:/no-such-model@champion" in capsys.readouterr().err
    assert main(["predict", "--model", f"models:/{NAME}@champion"]) == 1
    assert "either TEXT arguments or --input" in capsys.readouterr().err

    # a table whose text column is named in params.yaml (data.text_column) or with --text-column
    rows = "".join(f'{i},"{t}"\n' for i, t in enumerate(TEXTS))
    (in_project / "b.csv").write_text("id,body\n" + rows, encoding="utf-8")
    (in_project / "p.yaml").write_text("data:\n  text_column: body\n", encoding="utf-8")
    for flags in (["--params", "p.yaml"], ["--text-column", "body"]):
        assert main(["predict", "--model", f"models:/{NAME}/1", "--input", "b.csv", *flags]) == 0
        assert [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()] == TEXTS
    (in_project / "empty.txt").write_text("", encoding="utf-8")
    assert main(["predict", "--model", f"models:/{NAME}/1", "--input", "empty.txt"]) == 1
    assert "empty.txt: no texts to label" in capsys.readouterr().err


@pytest.mark.integration
def test_mlflow_models_serve_answers_with_labels_and_probabilities(project):
    """`mlflow models serve -m models:/<name>/<version> --env-manager local` (about 15 s to start)."""
    import urllib.error

    with serving(project, f"models:/{NAME}/1") as post:
        labels = post({"inputs": TEXTS})
        assert len(labels) == 3 and set(labels) <= {"fresh", "rotten"}
        records = post({"inputs": TEXTS, "params": {"probabilities": True}})
        assert [r["label"] for r in records] == labels
        assert all(sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5) for r in records)
        # a request past the model's bound is answered at once with 400, not computed past a gateway's timeout
        start = time.perf_counter()
        with pytest.raises(urllib.error.HTTPError) as too_many:
            post({"inputs": ["a fine film"] * 10_000})
        assert too_many.value.code == 400 and time.perf_counter() - start < 20
        assert "10000 texts in one request: at most 1000; split the request" in too_many.value.read().decode()


def test_pyfunc_bounds_the_request_size(in_project):
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    from finetune.common import tracking

    tracking.configure(".")
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    assert len(model.predict(["ok"] * 1000)) == 1000  # the bound itself is served
    with pytest.raises(MlflowException, match=r"1001 texts in one request: at most 1000; split the request") as e:
        model.predict(["ok"] * 1001)
    assert e.value.get_http_status_code() == 400
    with pytest.raises(MlflowException, match=r"text\(s\) \[1\] longer than 20000 characters"):
        model.predict(["ok", "x" * 20001])


@pytest.mark.parametrize("module, cls", [("pyfunc_model", "TextClassifier"),
                                         ("onnx_pyfunc_model", "OnnxTextClassifier")])
def test_pyfunc_file_check_refuses_changed_extra_missing_and_linked_files(tmp_path, module, cls):
    import importlib

    from finetune.registry.integrity import folder_digests

    check = getattr(importlib.import_module(f"finetune.registry.{module}"), cls)._check_files
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"id2label": {"0": "fresh", "1": "rotten"}}')
    (folder / "sub" / "tokenizer.json").write_text("{}")
    logged = folder_digests(folder)
    check(str(folder), logged)  # unchanged: loads
    (folder / "config.json").write_text('{"id2label": {"0": "rotten", "1": "fresh"}}')
    with pytest.raises(RuntimeError, match="model file config.json differs"):
        check(str(folder), logged)
    (folder / "config.json").write_text('{"id2label": {"0": "fresh", "1": "rotten"}}')
    (folder / "extra.py").write_text("import os")
    with pytest.raises(RuntimeError, match="model file extra.py was not logged"):
        check(str(folder), logged)
    (folder / "extra.py").unlink()
    (folder / "sub" / "tokenizer.json").unlink()
    with pytest.raises(RuntimeError, match="model file sub/tokenizer.json is missing"):
        check(str(folder), logged)
    (folder / "sub" / "tokenizer.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(RuntimeError, match="model file sub/tokenizer.json is a symbolic link"):
        check(str(folder), logged)


@pytest.mark.integration
def test_unverified_pyfunc_load_refuses_swapped_labels(tmp_path, tiny_classifier_dir):
    """What `mlflow models serve -m models:/...` runs: the pyfunc itself checks its files against the digests
    logged with it, so swapped id2label in the artifact store is refused (finetune predict also checks the registry)."""
    import mlflow.pyfunc
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = RegisterConfig(model_name="tampered", experiment="t", floor=0.0)
    register(RegistrationRequest.for_model(tiny_classifier_dir, {"accuracy": 0.9, "macro_f1": 0.9}, cfg, uri,
                                           artifact_location=(tmp_path / "mlartifacts").as_uri()))
    with _use_tracking_uri(uri):
        assert mlflow.pyfunc.load_model("models:/tampered/1").predict(["fine"])[0] in ("fresh", "rotten")
    stored = [p for p in (tmp_path / "mlartifacts").rglob("config.json") if "id2label" in p.read_text()]
    assert stored
    for p in stored:
        conf = json.loads(p.read_text())
        conf["id2label"] = {"0": "rotten", "1": "fresh"}
        p.write_text(json.dumps(conf))
    with pytest.raises(Exception, match="model file config.json differs"), _use_tracking_uri(uri):
        mlflow.pyfunc.load_model("models:/tampered/1")




def test_queued_dvc_experiments_use_the_projects_store(tmp_path, monkeypatch):
    from finetune.common.tracking import configure, project_root

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    temp_ws = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpab12cd"  # where `dvc queue start` runs a stage
    temp_ws.mkdir(parents=True)
    assert project_root(temp_ws) == project_root(tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "standalone" / "x") \
        == (tmp_path / "proj").resolve()
    assert project_root(tmp_path / "proj") == (tmp_path / "proj").resolve()
    uri, artifacts = configure(temp_ws)
    assert uri == f"sqlite:///{(tmp_path / 'proj' / 'mlflow.db').resolve()}"
    assert artifacts == (tmp_path / "proj" / "mlartifacts").resolve().as_uri()


def test_sqlite_store_paths_relative_and_absolute():
    from pathlib import Path

    from finetune.stages.predict import sqlite_paths

    assert sqlite_paths("sqlite:///rel/m.db", "sqlite:////abs/m%20x.db", "http://h:5000", None) == \
        [Path("rel/m.db"), Path("/abs/m x.db")]


def _digest(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_predict_output_refuses_existing_input_store_and_stage_files(in_project, capsys):
    """Refused before the model is even loaded, the refused file unchanged; --force replaces only a plain file."""
    from finetune.common.outputs import MARKER

    model = ["predict", "--model", f"models:/{NAME}/1"]
    (in_project / "in.txt").write_text("a wonderful film\na dull mess\n", encoding="utf-8")
    (in_project / "old.jsonl").write_text("keep me\n", encoding="utf-8")
    (in_project / "mlartifacts").mkdir(exist_ok=True)
    stage = in_project / "out" / "evaluate"
    stage.mkdir(parents=True, exist_ok=True)
    (stage / MARKER).write_text("evaluate\n")
    (in_project / "optuna.db").write_bytes(b"SQLite format 3\x00")
    (in_project / "link.jsonl").symlink_to(in_project / "mlflow.db")
    cases = [("old.jsonl", [], "--output old.jsonl: exists; give --force to replace it"),
             ("in.txt", ["--force"], "--output in.txt: is the --input file; write the predictions elsewhere"),
             ("mlflow.db", ["--force"], "--output mlflow.db: is mlflow.db, a file of the project's own stores"),
             ("link.jsonl", ["--force"], "--output link.jsonl: is mlflow.db, a file of the project's own stores"),
             ("optuna.db", ["--force"], "--output optuna.db: is optuna.db, a file of the project's own stores"),
             ("mlartifacts/p.jsonl", ["--force"], "--output mlartifacts/p.jsonl: is inside mlartifacts/"),
             ("out/evaluate/p.jsonl", ["--force"], (f"--output out/evaluate/p.jsonl: is inside the stage output "
                                                    f"folder {stage}")),
             ("res", [], "--output res: is a folder; give a file, e.g. res/predictions.jsonl"),
             ("new.jsonl", ["--batch-size", "1001"], "--batch-size 1001: give 1 to 1000")]
    (in_project / "res").mkdir(exist_ok=True)
    before = {f: _digest(in_project / f) for f in ("old.jsonl", "in.txt", "mlflow.db", "optuna.db")}
    for output, flags, message in cases:
        assert main([*model, "--input", "in.txt", "--output", output, *flags]) == 1, output
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert {f: _digest(in_project / f) for f in before} == before
    assert not (in_project / "mlartifacts" / "p.jsonl").exists() and not (stage / "p.jsonl").exists()
    assert main([*model, "--input", "in.txt", "--output", "old.jsonl", "--force"]) == 0
    assert [json.loads(x)["text"] for x in (in_project / "old.jsonl").read_text().splitlines()] == \
        ["a wonderful film", "a dull mess"]
    assert not [p.name for p in in_project.iterdir() if ".part-" in p.name]


class _FakeModel:
    """A pyfunc stand-in: label by length; records every batch it was asked for."""

    def __init__(self, fail_at: int | None = None):
        self.batches, self.fail_at = [], fail_at

    def predict(self, texts, params=None):
        self.batches.append(len(texts))
        if self.fail_at is not None and len(self.batches) == self.fail_at:
            raise RuntimeError("model failed")
        return [{"label": "fresh" if len(t) % 2 else "rotten", "probabilities": {"fresh": 0.5, "rotten": 0.5}}
                for t in texts]


def test_predictions_are_written_as_they_go_and_never_half_into_the_output(tmp_path):
    from finetune.stages.predict import write_predictions

    out = tmp_path / "p.jsonl"
    tmp = tmp_path / f".p.jsonl.part-{os.getpid()}"

    def texts(stop_at: int | None = None):
        for i in range(10):
            if i == 8:  # two batches of 4 are done: written already, to the temporary file only
                assert len(tmp.read_text().splitlines()) == 8 and not out.exists()
            if i == stop_at:
                raise KeyboardInterrupt  # as a kill: what was written stays in the temporary file
            yield f"text {i}"

    model = _FakeModel()
    assert write_predictions(model, texts(), out, 4, total=10) == 10
    assert model.batches == [4, 4, 2] and len(out.read_text().splitlines()) == 10 and not tmp.exists()
    out.unlink()
    with pytest.raises(KeyboardInterrupt):
        write_predictions(_FakeModel(), texts(stop_at=9), out, 4)
    assert not out.exists() and len(tmp.read_text().splitlines()) == 8
    dead = tmp.rename(tmp_path / ".p.jsonl.part-999999999")  # as if its process had been killed
    live = tmp_path / f".p.jsonl.part-{os.getppid()}"  # a running writer's: kept
    live.write_text("")
    assert write_predictions(_FakeModel(), ["x"], out, 4) == 1  # the next run into the same output cleans up
    assert not dead.exists() and live.exists() and out.read_text().count("\n") == 1
    out.unlink()
    with pytest.raises(RuntimeError, match="model failed"):  # a failure removes the temporary file too
        write_predictions(_FakeModel(fail_at=2), texts(), out, 4)
    assert not out.exists() and not tmp.exists()


def test_predict_reads_a_large_input_line_by_line(tmp_path):
    """8 MB of texts through read -> predict -> write holds well under 8 MB of Python memory."""
    import tracemalloc

    from finetune.stages.predict import count_texts, iter_texts, predict_stream

    big = tmp_path / "big.txt"
    line = "a long and winding review of a film that goes on \u00e9t\u00e9 and on\r\n"
    with open(big, "w", encoding="utf-8", newline="") as fh:
        fh.write(line * (8_000_000 // len(line)))
    n = count_texts(big)
    tracemalloc.start()
    with open(os.devnull, "w", encoding="utf-8") as sink:
        written = predict_stream(_FakeModel(), iter_texts(big), sink, 256, n)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert written == n == 8_000_000 // len(line) and peak < 2_000_000, peak


def test_predict_says_its_progress(tmp_path, caplog, monkeypatch):
    from types import SimpleNamespace

    from finetune.common import progress
    from finetune.stages.predict import predict_stream

    clock = iter(range(0, 10_000, 20)).__next__  # 20 s between readings: every update says where it is
    monkeypatch.setattr(progress, "time", SimpleNamespace(perf_counter=clock))
    with caplog.at_level("INFO", logger="finetune"), open(os.devnull, "w", encoding="utf-8") as sink:
        assert predict_stream(_FakeModel(), (f"t{i}" for i in range(10)), sink, 4, total=10) == 10
    assert "predict: 4/10 texts (40%)" in caplog.text and "predict: 10/10 texts (100%)" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="finetune"), open(os.devnull, "w", encoding="utf-8") as sink:
        predict_stream(_FakeModel(), iter(["a", "b"]), sink, 4, total=0)  # stdin: no total, no progress line
    assert "predict:" not in caplog.text
