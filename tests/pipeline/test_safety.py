"""What a new user hits (issue 14): output folders a stage may replace (item 1), an unreachable tracking server
(item 6), -q a copied project's MLflow store (item 9), `make test`'s
system packages (item 7)."""

import json
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, ENV, REPO, free_port, toy_frame
from finetune.cli import main
from finetune.common.config import Config
from finetune.common.outputs import MARKER, UnsafeOutput, atomic_dir, check_output_dir

PARAMS = "validate:\n  labels: [fresh, rotten]\n  min_rows_per_class: 5\n"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A small project folder (params.yaml + data) that is also the cwd, as for a user at a shell."""
    root = tmp_path / "proj"
    (root / "data").mkdir(parents=True)
    (root / "params.yaml").write_text(PARAMS)
    toy_frame(20).to_csv(root / "data" / "d.csv", index=False)
    monkeypatch.chdir(root)
    return root


def _tmp_leftovers(*folders: Path) -> list[str]:
    return [p.name for f in folders for p in f.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_foreign_folder_is_not_deleted(project, tmp_path, capsys):
    v = tmp_path / "v"  # the issue's /tmp/v with important.txt
    v.mkdir()
    (v / "important.txt").write_text("precious\n")
    assert main(["validate", "--data", "data/d.csv", "--out", str(v)]) == 1
    assert (v / "important.txt").read_text() == "precious\n"
    assert sorted(p.name for p in v.iterdir()) == ["important.txt"]
    err = capsys.readouterr().err
    assert f"output folder {v}: is a folder that no finetune stage wrote" in err and "remove it by hand" in err
    assert _tmp_leftovers(tmp_path) == []


@pytest.mark.parametrize("out", ["PWD", ".", "..", "./"])
def test_project_root_and_its_parents_are_refused(project, tmp_path, capsys, out):
    arg = str(project) if out == "PWD" else out
    assert main(["validate", "--data", "data/d.csv", "--out", arg]) == 1
    assert (project / "params.yaml").read_text() == PARAMS and (project / "data" / "d.csv").is_file()
    assert f"output folder {arg}: is the current folder or one of its parents" in capsys.readouterr().err
    assert _tmp_leftovers(tmp_path, project) == []


def test_folder_holding_the_input_is_refused_even_when_marked(project, capsys):
    (project / "data" / MARKER).write_text("validate\n")  # only the input rule can refuse here
    assert main(["validate", "--data", "data/d.csv", "--out", "data"]) == 1
    assert "contains the stage's input data/d.csv" in capsys.readouterr().err
    assert (project / "data" / "d.csv").is_file()


def test_rerun_replaces_its_own_output_and_marks_it(project):
    assert main(["validate", "--data", "data/d.csv", "--out", "out/validate"]) == 0
    out = project / "out" / "validate"
    assert (out / MARKER).read_text() == "validate\n"
    (out / "stale.txt").write_text("from the last run")  # inside a stage's folder: replaced with it
    assert main(["validate", "--data", "data/d.csv", "--out", "out/validate"]) == 0
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "report.json").read_text())["success"] is True
    assert _tmp_leftovers(project / "out") == []


def test_symlinked_output_folder_is_refused_and_left_alone(project, tmp_path, capsys):
    """--out a link to a folder elsewhere: replacing the folder would replace the link and leave .old- links."""
    outside = tmp_path / "outside"
    assert main(["validate", "--data", "data/d.csv", "--out", str(outside)]) == 0  # a stage's folder, marked
    before = sorted(p.name for p in outside.iterdir())
    (project / "symout").symlink_to(outside)
    assert main(["validate", "--data", "data/d.csv", "--out", "symout"]) == 1
    err = capsys.readouterr().err
    assert f"output folder symout: is a symbolic link (to {outside}); give the real folder" in err
    assert len(err.strip().splitlines()) == 1, err
    assert (project / "symout").is_symlink() and sorted(p.name for p in outside.iterdir()) == before
    assert sorted(p.name for p in project.iterdir()) == ["data", "params.yaml", "symout"]
    assert _tmp_leftovers(project, tmp_path) == []


def test_empty_existing_folder_is_used(project):
    (project / "empty").mkdir()
    assert main(["validate", "--data", "data/d.csv", "--out", "empty"]) == 0
    assert (project / "empty" / "train.parquet").is_file()


def test_tokenize_into_its_own_splits_folder_is_refused(project):
    from finetune.stages.tokenize import run_tokenize

    assert main(["validate", "--data", "data/d.csv", "--out", "out/validate"]) == 0
    with pytest.raises(UnsafeOutput, match="contains the stage's input out/validate"):
        run_tokenize(Config(), "out/validate", "out/validate")
    assert (project / "out" / "validate" / "train.parquet").is_file()


def test_atomic_dir_checks_before_creating_anything(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "a.txt").write_text("a")
    with pytest.raises(UnsafeOutput):
        with atomic_dir(tmp_path / "keep", "test"):
            pytest.fail("the block must not run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]
    with pytest.raises(UnsafeOutput, match="exists and is not a folder"):
        check_output_dir(tmp_path / "keep" / "a.txt")


@pytest.mark.parametrize("command", [["predict", "a fine film"], ["compare", "--model", "m"]])
def test_unreachable_tracking_server_is_said_at_once(tmp_path, command):
    port = free_port()  # nothing listens there
    env = {**ENV, "MLFLOW_TRACKING_URI": f"http://alice:s3cret@127.0.0.1:{port}/?token=t0ken"}
    # MLflow alone retries for minutes; the subprocess timeout only turns a hang into a failure, it measures nothing
    proc = subprocess.run([str(BIN / "finetune"), *command], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert (f"cannot reach the tracking server at http://***@127.0.0.1:{port}/?token=***: connection refused"
            in proc.stderr)
    assert "s3cret" not in proc.stderr and "t0ken" not in proc.stderr
    assert "no version with alias" not in proc.stderr and "Traceback" not in proc.stderr


def test_quiet_silences_great_expectations_and_mlflow_info(project):
    run = [str(BIN / "finetune"), "validate", "--data", "data/d.csv", "--out", "out/validate"]
    quiet = subprocess.run([*run, "-q"], cwd=project, env=ENV, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and quiet.stderr == ""  # GE logged "Created temporary directory ..." at INFO
    default = subprocess.run(run, cwd=project, env=ENV, capture_output=True, text=True, timeout=300)
    assert "INFO finetune: validation passed" in default.stderr and "great_expectations" not in default.stderr
    # MLflow configures its own INFO handler when imported; register logs "Failed to infer output type hint" there
    code = ("import logging; from finetune.common.logs import setup_logging; setup_logging(-1); import mlflow; "
            "logging.getLogger('mlflow.models.signature').info('Failed to infer output type hint'); "
            "logging.getLogger('mlflow.store').warning('a warning stays'); logging.getLogger('finetune').info('ours')")
    proc = subprocess.run([str(BIN / "python"), "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Failed to infer" not in proc.stderr and "ours" not in proc.stderr and "a warning stays" in proc.stderr


def _log_run(root: Path, name: str) -> str:
    """A run with one artifact in the project's default store, the way register creates its experiment."""
    import mlflow
    from mlflow import MlflowClient

    from finetune.common import tracking

    uri, location = tracking.configure(root)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("e")
    exp_id = exp.experiment_id if exp else client.create_experiment("e", location)
    run = client.create_run(exp_id)
    (root / f"{name}.txt").write_text(name)
    client.log_artifact(run.info.run_id, str(root / f"{name}.txt"))
    client.set_terminated(run.info.run_id)
    mlflow.set_tracking_uri(None)
    return run.info.run_id


def test_copied_project_writes_mlflow_artifacts_into_itself(tmp_path, monkeypatch):
    import shutil

    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    a = tmp_path / "a b"  # a space: the store holds percent-encoded URIs
    a.mkdir()
    first = _log_run(a, "first")
    b = tmp_path / "copy"
    shutil.copytree(a, b)
    before = sorted(str(p.relative_to(a)) for p in a.rglob("*"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # configure() exported a's store; a new process has none
    second = _log_run(b, "second")
    assert sorted(str(p.relative_to(a)) for p in a.rglob("*")) == before  # nothing written in the original
    client = MlflowClient(f"sqlite:///{b / 'mlflow.db'}")
    for rid, name in ((first, "first"), (second, "second")):
        assert client.get_run(rid).info.artifact_uri.startswith((b / "mlartifacts").as_uri())
        assert (Path(client.download_artifacts(rid, f"{name}.txt", str(tmp_path / "dl"))).read_text() == name)
    assert list((b / "mlartifacts").rglob("second.txt"))
    assert client.get_experiment_by_name("e").artifact_location.startswith((b / "mlartifacts").as_uri())


def _sysdeps(tmp_path: Path, uid: str, have: tuple[str, ...], sudo: bool = False):
    """`make sysdeps` with a PATH holding only the tools named in ``have`` (plus what the recipe needs), a fake
    apt-get that records its arguments, and ``uid`` as the user's id."""
    import os
    import shutil

    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool in ("ls", "env", "sh"):
        (bin_ / tool).symlink_to(shutil.which(tool))
    (bin_ / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    for tool in have:
        (bin_ / tool).write_text("#!/bin/sh\n")
    (tmp_path / "apt-get").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "apt.log"}\n')
    if sudo:
        (bin_ / "sudo").write_text('#!/bin/sh\n[ "$1" = -n ] && shift; [ "$1" = true ] && exit 0; exec "$@"\n')
    for f in (*bin_.iterdir(), tmp_path / "apt-get"):
        if not f.is_symlink():
            f.chmod(0o755)
    pg = tmp_path / "pg"
    pg.mkdir()
    if "postgres" in have:
        (pg / "initdb").touch()
        (pg / "pg_ctl").touch()
    proc = subprocess.run([shutil.which("make"), "-s", "-C", str(REPO), "sysdeps", f"APT_GET={tmp_path / 'apt-get'}",
                           f"PG_BIN_GLOB={pg}", f"PYTHON={BIN / 'python'}"],
                          env={"PATH": str(bin_), "HOME": os.environ.get("HOME", "/")}, capture_output=True, text=True,
                          timeout=60)
    log = tmp_path / "apt.log"
    return proc, log.read_text() if log.exists() else ""


def test_make_test_installs_missing_system_packages_as_root(tmp_path):
    proc, apt = _sysdeps(tmp_path, "0", have=("chromium",))
    assert proc.returncode == 0, proc.stderr
    assert apt == "update -qq\ninstall -y -qq --no-install-recommends postgresql chromium-driver\n"
    assert "installing the system packages the tests need: postgresql chromium-driver" in proc.stdout


def test_make_test_is_silent_when_everything_is_there(tmp_path):
    proc, apt = _sysdeps(tmp_path, "1000", have=("chromium", "chromedriver", "postgres"))
    assert (proc.returncode, proc.stdout, proc.stderr, apt) == (0, "", "", "")


def test_make_test_says_what_to_install_when_it_cannot(tmp_path):
    proc, apt = _sysdeps(tmp_path, "1000", have=("postgres",))
    assert proc.returncode != 0 and apt == ""
    assert ("make test needs the system packages: chromium chromium-driver (not installed, and this user is not root "
            "and has no password-less sudo). Install them once:  sudo apt-get update && sudo apt-get install -y "
            "chromium chromium-driver") in proc.stderr


def test_make_test_uses_passwordless_sudo(tmp_path):
    proc, apt = _sysdeps(tmp_path, "1000", have=("chromium", "chromedriver"), sudo=True)
    assert proc.returncode == 0, proc.stderr
    assert apt.endswith("install -y -qq --no-install-recommends postgresql\n")


def test_train_deletes_only_its_own_checkpoint_folders(tiny_model_dir, tmp_path):
    from finetune.common.config import TokenizeConfig, TrainConfig
    from finetune.stages.tokenize import tokenize
    from finetune.stages.train import train

    df = toy_frame(10)
    toks, meta = tokenize({"train": df.iloc[:12], "val": df.iloc[12:16], "test": df.iloc[16:]}, ["fresh", "rotten"],
                          tiny_model_dir, TokenizeConfig(max_length=16))
    ckpt = tmp_path / "ckpt"
    for name in ("step-notes", "step-0000001"):  # a user's folders that merely match the pattern
        (ckpt / name).mkdir(parents=True)
        (ckpt / name / "keep.txt").write_text("mine")
    cfg = TrainConfig(epochs=1, batch_size=4, checkpoint_every=1, threads=1, seed=1)
    res = train(toks, meta, tiny_model_dir, cfg, tmp_path / "model", ckpt)
    assert res.steps == 3  # step 1's checkpoint was skipped, training went on
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-0000001", "step-notes"]  # its own ones cleaned
    assert all((ckpt / name / "keep.txt").read_text() == "mine" for name in ("step-notes", "step-0000001"))
    assert (tmp_path / "model" / MARKER).read_text() == "train\n"


# ---- evaluate, register and the training logs: the same rules for every stage that writes a folder ----

@pytest.mark.parametrize("verb, args", [
    ("evaluate", ["--model", "m", "--tokens", "t"]),
    ("register", ["--model", "m", "--evaluation", "e", "--splits", "s", "--train-logs", "l", "--tokens", "t"]),
    ("train", ["--tokens", "t", "--model", "out/model", "--checkpoints", ""]),
])
def test_every_stage_refuses_the_project_root(project, capsys, verb, args):
    """Refused before any input is read or anything registered: the inputs here do not even exist."""
    flag = "--train-logs" if verb == "train" else "--out"
    assert main([verb, *args, flag, "."]) == 1
    err = capsys.readouterr().err
    assert "output folder .: is the current folder or one of its parents" in err, err
    assert sorted(p.name for p in project.iterdir()) == ["data", "params.yaml"]  # nothing written, no mlflow.db


def test_evaluate_replaces_only_its_own_folder(tmp_path):
    from finetune.stages.evaluate import write_evaluation

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UnsafeOutput, match="no finetune stage wrote"):
        write_evaluation(object(), foreign)  # refused before the result is even looked at
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_log_lines_never_carry_uri_credentials():
    """A library's log line (here MLflow's logger) with a URI holding a password, through the CLI's logging."""
    code = ("import logging; from finetune.common.logs import setup_logging; setup_logging(0); "
            "logging.getLogger('mlflow.tracking').warning('retrying http://alice:s3cret@127.0.0.1:5057/api?token=abc')")
    err = subprocess.run([str(BIN / "python"), "-c", code], capture_output=True, text=True, env=ENV, timeout=120).stderr
    assert "retrying http://" in err and "127.0.0.1:5057" in err, err
    assert "s3cret" not in err and "token=abc" not in err, err


SECRET_DATA_URI = ("dvc://data/raw.csv?repo=https://bob:ghp_SecretTok3n@git.example/o/r.git&rev=main"
                   "&X-Amz-Credential=AKIASECRETCRED&X-Amz-Signature=f00dSECRETsig")


def _secret_cfg() -> Config:
    from finetune.common.params import load_config

    cfg = load_config(REPO / "params.yaml")
    cfg.data.path = SECRET_DATA_URI
    return cfg


def _assert_redacted(text: str) -> None:
    for secret in ("ghp_SecretTok3n", "AKIASECRETCRED", "f00dSECRETsig"):
        assert secret not in text
    assert "repo=https://***@git.example/o/r.git" in text and "X-Amz-Signature=***" in text


def test_katib_experiment_carries_no_credentials_of_the_data_uri():
    import yaml

    from finetune.cluster.katib import render

    cluster = yaml.safe_load((REPO / "pipelines" / "cluster.yaml").read_text(encoding="utf-8"))
    _assert_redacted(render(_secret_cfg(), cluster, SECRET_DATA_URI))


def test_compiled_pipeline_carries_no_credentials_of_the_data_uri(tmp_path):
    import sys

    sys.path.insert(0, str(REPO))
    from pipelines.finetune_pipeline import compile_spec

    spec = compile_spec(tmp_path / "spec.yaml", _secret_cfg())
    _assert_redacted(spec.read_text(encoding="utf-8"))


def test_full_disk_during_a_stage_write_is_one_line(project, capsys, monkeypatch):
    import errno

    import pandas as pd

    assert main(["validate", "--data", "data/d.csv", "--out", "out/validate"]) == 0
    before = sorted(p.name for p in (project / "out" / "validate").iterdir())

    def full(self, path, *a, **kw):
        Path(path).write_bytes(b"PAR1")  # partly written
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full)
    assert main(["validate", "--data", "data/d.csv", "--out", "out/validate"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"finetune validate: error: output folder {project / 'out' / 'validate'}: no space left on "
                          f"the device while writing it (") and f"MiB free in {project / 'out'})" in err
    assert "the previous validate is unchanged" in err
    assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in (project / "out" / "validate").iterdir()) == before
    assert _tmp_leftovers(project / "out") == []
