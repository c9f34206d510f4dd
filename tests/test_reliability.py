"""Faults on real processes: a training process killed with SIGKILL resumes from its checkpoint and ends where
an uninterrupted run ends; two pipelines registering to one model name at once, against a real MLflow server."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import BIN, toy_frame

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory, tiny_model_dir):
    from finetune.config import TokenizeConfig
    from finetune.tokenize import tokenize, write_tokens

    df = toy_frame(60).sample(frac=1, random_state=0)
    splits = {"train": df.iloc[:80], "val": df.iloc[80:100], "test": df.iloc[100:]}
    out = tmp_path_factory.mktemp("tokens") / "tokens"
    write_tokens(*tokenize(splits, ["fresh", "rotten"], tiny_model_dir, TokenizeConfig(max_length=16)), out)
    return out


def _train_cmd(root: Path, tokens: Path, base: Path) -> list[str]:
    params = root / "params.yaml"
    params.write_text("{}\n")
    return [str(BIN / "finetune"), "train", "--params", str(params), "--tokens", str(tokens),
            "--model", str(root / "model"), "--train-logs", str(root / "logs"), "--checkpoints", str(root / "ckpt"),
            "--set", f"model.base={base}", "--set", "train.max_steps=300", "--set", "train.epochs=100",
            "--set", "train.batch_size=8", "--set", "train.learning_rate=3e-3", "--set", "train.checkpoint_every=25",
            "--set", "train.threads=1"]


def test_sigkill_mid_training_then_rerun_resumes_and_matches(tmp_path, tokens_dir, tiny_model_dir):
    full, crash = tmp_path / "full", tmp_path / "crash"
    full.mkdir(), crash.mkdir()
    subprocess.run(_train_cmd(full, tokens_dir, tiny_model_dir), check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(_train_cmd(crash, tokens_dir, tiny_model_dir), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not list((crash / "ckpt").glob("step-0000050")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (crash / "model").exists()  # no half-written model where evaluate would pick it up
    (crash / "ckpt" / "step-0000275").mkdir()  # an unfinished checkpoint folder (no state.json) is ignored
    (crash / "ckpt" / "step-0000275" / "model.safetensors").write_bytes(b"garbage")

    subprocess.run(_train_cmd(crash, tokens_dir, tiny_model_dir), check=True, capture_output=True, timeout=600)
    summary = json.loads((crash / "logs" / "summary.json").read_text())
    assert 50 <= summary["resumed_from_step"] < 300 and summary["steps"] == 300
    assert (crash / "logs" / "loss.csv").read_text() == (full / "logs" / "loss.csv").read_text()
    a, b = load_file(full / "model" / "model.safetensors"), load_file(crash / "model" / "model.safetensors")
    assert all(np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-6) for k in a)


_REGISTER = """
import sys
from finetune.config import RegisterConfig
from finetune.registry import RegistrationRequest, register
value = float(sys.argv[3])
cfg = RegisterConfig(model_name=sys.argv[4], experiment=sys.argv[4], floor=0.0)
r = register(RegistrationRequest.for_model(sys.argv[1], {"accuracy": value, "macro_f1": value}, cfg, sys.argv[2],
                                           test_hash="same-test-data"))
print(r.version, r.alias)
"""


def test_concurrent_registrations_end_with_the_better_champion(mlflow_server, tiny_classifier_dir):
    from mlflow import MlflowClient

    url = mlflow_server.url

    def start(value: str, delay: str):
        # the worse model is slowed down between its champion check and its alias move: without the
        # move-time check under a lock it would overwrite the better champion
        env = {**os.environ, "FINETUNE_ALIAS_DELAY": delay}
        return subprocess.Popen([sys.executable, "-c", _REGISTER, str(tiny_classifier_dir), url, value, "race"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    worse, better = start("0.70", "3"), start("0.80", "0")
    outs = [p.communicate(timeout=600) for p in (worse, better)]
    assert worse.returncode == better.returncode == 0, outs
    client = MlflowClient(url)
    versions = {str(v.version): v for v in client.search_model_versions("name = 'race'")}
    assert len(versions) == 2
    champ = client.get_model_version_by_alias("race", "champion")
    assert champ.tags["accuracy"] == "0.8"
    assert outs[1][0].split()[-1] == "champion"  # the better pipeline reports what the registry shows
    assert "finetune.alias_lock" not in (client.get_registered_model("race").tags or {})


def test_register_killed_mid_way_is_marked_failed_and_cleaned_by_the_next(tiny_classifier_dir, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from finetune import registry
    from finetune.config import RegisterConfig

    uri, art = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "art"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("killed", art.as_uri())
    env = {**os.environ, "FINETUNE_REGISTER_DELAY": "120"}  # the kill lands after the model was uploaded
    proc = subprocess.Popen([sys.executable, "-c", _REGISTER, str(tiny_classifier_dir), uri, "0.8", "killed"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not list(art.rglob("MLmodel")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(1)  # the rest of the upload
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "registration finished before it could be killed"
    (dead,) = client.search_runs([exp_id])
    assert dead.info.status == "RUNNING" and list(art.rglob("MLmodel"))  # what a killed process leaves behind

    monkeypatch.setattr(registry, "STALE_AFTER", 0.5)  # its heartbeat (every 30 s) is older than this by now
    r = registry.register(registry.RegistrationRequest.for_model(
        tiny_classifier_dir, {"accuracy": 0.8, "macro_f1": 0.8},
        RegisterConfig(model_name="killed", experiment="killed", floor=0.0), uri, test_hash="same-test-data"))
    run = client.get_run(dead.info.run_id)
    assert run.info.status == "FAILED" and "process died" in run.data.tags["finetune.failed"]
    new_run = client.get_run(r.run_id)
    assert new_run.info.status == "FINISHED" and r.alias == "champion"
    # only the new registration's model remains in the artifact store, and only its version in the registry
    assert len(list(art.rglob("MLmodel"))) == 1
    assert [str(v.version) for v in client.search_model_versions("name = 'killed'")] == [r.version]
