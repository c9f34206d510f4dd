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
    from finetune.common.config import TokenizeConfig
    from finetune.stages.tokenize import tokenize, write_tokens

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
from finetune.common.config import RegisterConfig
from finetune.registry.request import RegistrationRequest
from finetune.registry.transaction import register
value = float(sys.argv[3])
cfg = RegisterConfig(model_name=sys.argv[4], experiment=sys.argv[4], floor=0.0, retries=int(sys.argv[5:6] and
                                                                                            sys.argv[5] or 3))
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


_HOLD_LOCK = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
con.execute("COMMIT")
"""


def test_two_registrations_at_once_on_the_sqlite_store_both_complete(tiny_classifier_dir, tmp_path):
    """Two registrations at once on the default (SQLite) store while a third process holds a write for longer
    than MLflow's 20 s busy timeout: both wait (no retries allowed), both register, the better is champion."""
    from mlflow import MlflowClient

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    MlflowClient(uri).create_experiment("both", (tmp_path / "art").as_uri())
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(db), "30"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    procs = [subprocess.Popen([sys.executable, "-c", _REGISTER, str(tiny_classifier_dir), uri, value, "both", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for value in ("0.7", "0.8")]
    outs = [p.communicate(timeout=900) for p in procs]
    holder.wait(60)
    assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
    assert any("the MLflow store" in o[1] and "is locked by another writer" in o[1] for o in outs)
    client = MlflowClient(uri)
    assert len(client.search_model_versions("name = 'both'")) == 2
    assert client.get_model_version_by_alias("both", "champion").tags["accuracy"] == "0.8"


def test_kill_9_between_the_fp32_and_the_int8_alias_is_repaired_by_the_next_registration(
        tiny_classifier_dir, tokens_dir, tmp_path):
    """B is champion with its int8 variant. C is killed (SIGKILL) right after its fp32 alias moved, before the
    int8 aliases were derived: @champion = C, -int8@champion = B's variant. The next, unrelated registration
    (a challenger) removes -int8@champion, since C has no variant."""
    from mlflow import MlflowClient

    from finetune.common.config import CompressConfig, RegisterConfig
    from finetune.common.tokens import read_tokens
    from finetune.registry.lease import LOCK_TAG
    from finetune.registry.request import RegistrationRequest
    from finetune.registry.store import current_alias
    from finetune.registry.transaction import register
    from finetune.registry.variants import VariantRequest, register_variant
    from finetune.stages.compress import compress

    uri, name = f"sqlite:///{tmp_path / 'mlflow.db'}", "killed-int8"
    client = MlflowClient(uri)
    client.create_experiment(name, (tmp_path / "art").as_uri())
    toks, meta = read_tokens(tokens_dir, names=("test",))
    folder = tmp_path / "compress"
    cfg = CompressConfig(threads=1, latency_requests=2)
    assert compress(tiny_classifier_dir, toks["test"], meta, cfg, folder).passed

    def req(value: float) -> RegistrationRequest:
        return RegistrationRequest.for_model(tiny_classifier_dir, {"accuracy": value, "macro_f1": value},
                                             RegisterConfig(model_name=name, experiment=name, floor=0.0), uri,
                                             test_hash="same-test-data")

    b_req = req(0.7)
    b = register(b_req)
    register_variant(VariantRequest(b_req, b, folder, json.loads((folder / "metrics.json").read_text())))
    assert current_alias(client, f"{name}-int8", "champion").tags["fp32_model"] == f"{name}/{b.version}"

    env = {**os.environ, "FINETUNE_VARIANT_ALIAS_DELAY": "300"}  # the kill lands between the two alias moves
    proc = subprocess.Popen([sys.executable, "-c", _REGISTER, str(tiny_classifier_dir), uri, "0.8", name],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while str(current_alias(client, name, "champion").version) == b.version and time.time() < deadline:
        assert proc.poll() is None, "the registration ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    c_version = str(current_alias(client, name, "champion").version)
    assert c_version != b.version  # drifted: @champion is C, -int8@champion still B's variant
    assert current_alias(client, f"{name}-int8", "champion").tags["fp32_model"] == f"{name}/{b.version}"
    client.delete_registered_model_tag(name, LOCK_TAG)  # the dead holder's lease: as if its 120 s had passed

    d = register(req(0.6))
    assert d.alias == "challenger" and str(current_alias(client, name, "champion").version) == c_version
    assert current_alias(client, f"{name}-int8", "champion") is None
    assert d.int8_aliases["champion"] == {"from": "1", "to": None}


def test_register_killed_mid_way_is_marked_failed_and_cleaned_by_the_next(tiny_classifier_dir, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from finetune.common.config import RegisterConfig
    from finetune.registry import hygiene
    from finetune.registry.request import RegistrationRequest
    from finetune.registry.transaction import register

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

    monkeypatch.setattr(hygiene, "STALE_AFTER", 0.5)  # its heartbeat (every 30 s) is older than this by now
    r = register(RegistrationRequest.for_model(
        tiny_classifier_dir, {"accuracy": 0.8, "macro_f1": 0.8},
        RegisterConfig(model_name="killed", experiment="killed", floor=0.0), uri, test_hash="same-test-data"))
    run = client.get_run(dead.info.run_id)
    assert run.info.status == "FAILED" and "process died" in run.data.tags["finetune.failed"]
    new_run = client.get_run(r.run_id)
    assert new_run.info.status == "FINISHED" and r.alias == "champion"
    # only the new registration's model remains in the artifact store, and only its version in the registry
    assert len(list(art.rglob("MLmodel"))) == 1
    assert [str(v.version) for v in client.search_model_versions("name = 'killed'")] == [r.version]


class BasicAuthProxy:
    """A reverse proxy on 127.0.0.1 in front of the real MLflow server that admits only requests carrying
    HTTP Basic credentials ``user:password`` (as a server behind an authenticating gateway would)."""

    def __init__(self, upstream: str, user: str, password: str):
        import base64
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        up = urlsplit(upstream)
        proxy = self
        self.admitted = self.refused = 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self):
                body = self._body()
                if self.headers.get("Authorization") != expected:
                    proxy.refused += 1
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                proxy.admitted += 1
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "authorization", "transfer-encoding", "connection")}
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=120)
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_credentials_in_uris_are_written_nowhere(mlflow_server, stage_inputs, tiny_classifier_dir, tmp_path, caplog,
                                               capfd, monkeypatch):
    import logging
    import urllib.error
    import urllib.request

    import mlflow.artifacts
    from mlflow import MlflowClient

    from finetune.common import tracking
    from finetune.common.config import Config, RegisterConfig
    from finetune.stages.register import run_register

    password, signature, token = "pw-Zq81-secret", "sig0a1b2c3d4e5f", "ghp_Tok3nInRepoUrl"
    proxy = BasicAuthProxy(mlflow_server.url, "alice", password)
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:  # the gateway really demands the credentials
            urllib.request.urlopen(f"http://127.0.0.1:{proxy.port}/api/2.0/mlflow/experiments/search?max_results=1")
        assert refused.value.code == 401
        uri = f"http://alice:{password}@127.0.0.1:{proxy.port}"
        cfg = Config(register=RegisterConfig(model_name="behind-auth", experiment="auth", floor=0.0, min_macro_f1=0.0))
        # a DVC URI whose repo= carries a token, and a presigned URL: both redacted wherever lineage goes
        lineage = {"git_commit": "c0ffee", "data_uri": f"dvc://data/raw.csv?repo=https://alice:{token}@git.example/o/r"
                                                       f"&rev=main", "data_md5": "0a1b2c",
                   "kfp_run": f"s3://bucket/reviews.csv?X-Amz-Signature={signature}&v=2"}
        out = tmp_path / "register"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        tracking.configure(tmp_path)  # the CLI's edge: MLflow's own "View run ... at: <uri>" print is switched off
        with caplog.at_level(logging.DEBUG):
            reg = run_register(cfg, tiny_classifier_dir, stage_inputs / "evaluate", stage_inputs / "validate",
                               stage_inputs / "train", out, lineage, uri, tokens=stage_inputs / "tokenize")
        assert proxy.admitted > 10 and proxy.refused == 1  # everything went through the authenticating gateway

        secrets = (password.encode(), signature.encode(), token.encode())
        printed = capfd.readouterr()
        written = {p.name: p.read_bytes() for p in out.iterdir()}
        assert set(written) == {"registration.json", "model_card.md", "report.html"}
        assert json.loads(written["registration.json"])["tracking_uri"] == f"http://***@127.0.0.1:{proxy.port}"
        assert b"repo=https://***@git.example/o/r" in written["report.html"]
        assert json.loads(written["registration.json"])["lineage"]["data_uri"] == (
            "dvc://data/raw.csv?repo=https://***@git.example/o/r&rev=main")
        client = MlflowClient(uri)
        run = client.get_run(reg["run_id"])
        mv = client.get_model_version("behind-auth", reg["version"])
        registry_text = json.dumps([run.data.params, run.data.tags, mv.tags, mv.description, mv.source]).encode()
        assert b"X-Amz-Signature=***" in registry_text
        assert run.data.tags["lineage.data_uri"] == "dvc://data/raw.csv?repo=https://***@git.example/o/r&rev=main"
        dl = tmp_path / "dl"
        run_files = Path(client.download_artifacts(reg["run_id"], "", str(dl / "run")))
        with _tracking(uri):
            model_files = Path(mlflow.artifacts.download_artifacts(f"models:/behind-auth/{reg['version']}",
                                                                   dst_path=str(dl / "model")))
        files = [f for f in [*run_files.rglob("*"), *model_files.rglob("*")] if f.is_file()]
        assert any(f.name == "report.html" for f in files) and any(f.name == "MLmodel" for f in files)
        # and the server's own store: its database (params, tags, descriptions) and every stored artifact
        stored = [mlflow_server.root / "server.db", *(f for f in (mlflow_server.root / "artifacts").rglob("*")
                                                     if f.is_file())]
        for blob in [*written.values(), registry_text, *(f.read_bytes() for f in files + stored),
                     caplog.text.encode(), printed.out.encode(), printed.err.encode()]:
            assert not any(s in blob for s in secrets)
    finally:
        proxy.stop()


def _tracking(uri: str):
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    return _use_tracking_uri(uri)
