"""`finetune compare`: the pure table, and the CLI on a registry with a champion and a challenger."""

from __future__ import annotations

from finetune.cli import main
from finetune.stages.compare import Side, compare, format_comparison


def test_compare_lists_metric_changes_per_class_f1_and_differing_params():
    base = Side("champion v1", "r1", {"accuracy": 0.80, "macro_f1": 0.78, "loss": 0.45, "ece": 0.05, "n": 1275.0,
                                      "f1_fresh": 0.83, "f1_rotten": 0.73, "precision_fresh": 0.8},
                {"train.learning_rate": "0.0001", "train.epochs": "2.0", "train.seed": "42"},
                {"lineage.git_commit": "aaa", "lineage.data_dvc_md5": "d1", "mlflow.user": "x"})
    other = Side("challenger v2", "r2", {"accuracy": 0.82, "macro_f1": 0.78, "loss": 0.50, "ece": 0.04, "n": 1275.0,
                                         "f1_fresh": 0.85, "f1_neutral": 0.4},
                 {"train.learning_rate": "5e-05", "train.epochs": "2.0", "train.seed": "42", "train.lora": "{}",
                  "weights_sha256/model.safetensors": "ab"},
                 {"lineage.git_commit": "bbb", "lineage.data_dvc_md5": "d1", "mlflow.user": "y"})
    c = compare(base, other)
    assert [m[0] for m in c.metrics] == ["accuracy", "macro_f1", "loss", "ece", "n"]
    assert c.per_class_f1 == [("fresh", 0.83, 0.85), ("neutral", None, 0.4), ("rotten", 0.73, None)]
    assert c.differing == [("lineage.git_commit", "aaa", "bbb"), ("train.learning_rate", "0.0001", "5e-05"),
                           ("train.lora", None, "{}")]
    table = format_comparison(c)
    assert "| accuracy | 0.8000 | 0.8200 | +0.0200 (better) |" in table
    assert "| loss | 0.4500 | 0.5000 | +0.0500 (worse) |" in table  # lower is better for loss and ECE
    assert "| ece | 0.0500 | 0.0400 | -0.0100 (better) |" in table
    assert "| macro_f1 | 0.7800 | 0.7800 | = |" in table and "| n | 1275 | 1275 |  |" in table
    assert "| neutral | - | 0.4000 |  |" in table and "mlflow.user" not in table
    assert "Params and lineage: identical." in format_comparison(compare(base, base))


def test_cli_compare_challenger_against_champion_and_two_runs(tmp_path, monkeypatch, capsys):
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # no params.yaml here: compare works with --model
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the default store tracking.configure() picks in this folder
    client = MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("cmp")  # this store's own: not the active experiment an earlier test left behind
    runs = []
    for acc, lr in ((0.80, "0.0001"), (0.78, "5e-05")):
        with mlflow.start_run() as run:
            mlflow.log_metrics({"accuracy": acc, "macro_f1": acc - 0.01, "f1_fresh": acc + 0.02})
            mlflow.log_params({"train.learning_rate": lr, "train.seed": "42"})
        runs.append(run.info.run_id)
    client.create_registered_model("cmp")
    for i, rid in enumerate(runs, start=1):
        client.create_model_version("cmp", f"runs:/{rid}/model", run_id=rid)
        client.set_registered_model_alias("cmp", ["champion", "challenger"][i - 1], str(i))
    mlflow.set_tracking_uri(None)

    assert main(["compare", "--model", "cmp"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"challenger v2 (run {runs[1]}) against champion v1 (run {runs[0]})")
    assert "| accuracy | 0.8000 | 0.7800 | -0.0200 (worse) |" in out
    assert "| fresh | 0.8200 | 0.8000 | -0.0200 (worse) |" in out
    assert "| train.learning_rate | 0.0001 | 5e-05 |" in out and "train.seed" not in out

    assert main(["compare", "--runs", runs[1], runs[0]]) == 0
    assert "| accuracy | 0.7800 | 0.8000 | +0.0200 (better) |" in capsys.readouterr().out
    assert main(["compare", "--model", "cmp", "--aliases", "champion", "gold"]) == 1
    assert "cmp has no version with alias @gold" in capsys.readouterr().err

    # right after the first run there is no challenger: say why and what to do
    client.delete_registered_model_alias("cmp", "challenger")
    assert main(["compare", "--model", "cmp"]) == 1
    err = capsys.readouterr().err
    assert "cmp has no version with alias @challenger yet: a registered version gets it when it does not beat" in err
    assert "finetune compare --runs BASE OTHER" in err
    assert main(["compare", "--model", "nothing-here"]) == 1
    assert "no registered model nothing-here in this registry: run the pipeline first" in capsys.readouterr().err


def test_cli_compare_unknown_runs_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--runs", "nope1", "nope2"]) == 1
    assert "cannot read the runs" in capsys.readouterr().err
