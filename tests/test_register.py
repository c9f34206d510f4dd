import json

import pytest

from finetune.config import RegisterConfig
from finetune.register import RegistryError, gate, register

CFG = RegisterConfig(model_name="toy", experiment="toy", metric="accuracy", min_improvement=0.01, floor=0.6)


@pytest.mark.parametrize("value, champ, promote, words", [
    (0.55, None, False, "below the floor"),
    (0.65, None, True, "no champion yet"),
    (0.80, 0.75, True, "beats the champion"),
    (0.755, 0.75, False, "does not beat"),  # better, but not by more than min_improvement
    (0.70, 0.75, False, "does not beat"),
    (0.59, 0.10, False, "below the floor"),  # floor wins even over a weak champion
])
def test_gate(value, champ, promote, words):
    d = gate(value, champ, CFG)
    assert d.promote is promote and words in d.reason


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}", (tmp_path / "artifacts").as_uri()


def _reg(model, value, store, test_hash="h1", **kw):
    uri, art = store
    return register(model, {"accuracy": value, "macro_f1": value, "per_class": {"fresh": {"f1": value}}}, CFG,
                    tracking_uri=uri, artifact_location=art, params={"train.seed": 1}, lineage={"git_commit": "abc"},
                    loss_history=[{"step": 1, "loss": 0.9}, {"step": 2, "loss": 0.5}], test_hash=test_hash, **kw)


def test_champion_moves_only_when_gate_passes(tiny_classifier_dir, store):
    from mlflow import MlflowClient

    client = MlflowClient(store[0])
    r1 = _reg(tiny_classifier_dir, 0.70, store)
    assert (r1.version, r1.alias, r1.promoted) == ("1", "champion", True)
    r2 = _reg(tiny_classifier_dir, 0.705, store)  # better, not by the margin
    assert (r2.version, r2.alias) == ("2", "challenger") and r2.champion_before["value"] == 0.70
    assert str(client.get_model_version_by_alias("toy", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("toy", "challenger").version) == "2"
    r3 = _reg(tiny_classifier_dir, 0.80, store)
    assert (r3.version, r3.alias) == ("3", "champion")
    assert str(client.get_model_version_by_alias("toy", "champion").version) == "3"
    # the run holds params, metrics, loss curve, lineage
    run = client.get_run(r3.run_id)
    assert run.data.metrics["accuracy"] == 0.80 and run.data.params["train.seed"] == "1"
    assert run.data.tags["lineage.git_commit"] == "abc" and run.data.tags["gate.promoted"] == "True"
    assert [m.value for m in client.get_metric_history(r3.run_id, "train_loss")] == [0.9, 0.5]
    assert client.get_model_version("toy", "3").tags["test_data_hash"] == "h1"


def test_registered_model_loads_and_predicts_labels(tiny_classifier_dir, store, monkeypatch):
    import mlflow.pyfunc

    _reg(tiny_classifier_dir, 0.9, store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store[0])
    model = mlflow.pyfunc.load_model("models:/toy@champion")
    preds = model.predict(["a wonderful film", "a dull mess", "ok"])
    assert len(preds) == 3 and set(preds) <= {"fresh", "rotten"}


def test_champion_rescored_when_test_data_differs(tiny_classifier_dir, store):
    _reg(tiny_classifier_dir, 0.99, store, test_hash="old")  # logged 0.99 on other data
    texts = ["a wonderful film", "a dull mess"] * 5
    r = _reg(tiny_classifier_dir, 0.95, store, test_hash="new", test=(texts, ["fresh", "rotten"] * 5))
    assert r.champion_before["source"] == "re-scored on this run's test data"
    # the tiny model cannot score 0.99 on this set; the real comparison is on the same data: 0.95 beats it
    assert r.champion_before["value"] <= 0.9 and r.alias == "champion"


def test_unreachable_registry_writes_nothing(tiny_classifier_dir, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    from conftest import free_port

    with pytest.raises(RegistryError, match="unreachable"):
        register(tiny_classifier_dir, {"accuracy": 0.9}, CFG, tracking_uri=f"http://127.0.0.1:{free_port()}")


def test_missing_metric_is_refused(tiny_classifier_dir, store):
    with pytest.raises(RegistryError, match="no 'accuracy'"):
        register(tiny_classifier_dir, {"f1": 0.9}, CFG, tracking_uri=store[0])
