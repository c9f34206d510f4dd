"""`finetune serve` as users run it: the real server on 127.0.0.1 serving a tiny model registered (fp32 and its
int8 ONNX variant) in a project's SQLite store, asked over HTTP."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from conftest import Server, get, post, toy_frame, v2_body

pytestmark = pytest.mark.integration

NAME = "toy"
TEXTS = ["a wonderful film", "a dull mess", "boring and far too long"]


@pytest.fixture(scope="module")
def project(tiny_classifier_dir, toy_test, tmp_path_factory):
    """A project folder whose mlflow.db holds toy/1 (@champion) and toy-int8/1 (@champion)."""
    from finetune.common import tracking
    from finetune.common.config import CompressConfig
    from finetune.common.digests import MODEL_DIGEST, model_digest
    from finetune.common.files import write_json
    from finetune.common.params import config_from_dict
    from finetune.stages.compress import compress
    from finetune.stages.register import run_register

    root = tmp_path_factory.mktemp("serve-project")
    test, meta = toy_test
    assert compress(tiny_classifier_dir, test, meta, CompressConfig(threads=1, latency_requests=3),
                    root / "compress").passed
    (root / "splits").mkdir()
    toy_frame(10).to_parquet(root / "splits" / "test.parquet")
    write_json(root / "splits" / "report.json", {"data": "toy.csv", "rows": 20})
    write_json(root / "eval" / "metrics.json", {"accuracy": 0.9, "macro_f1": 0.9, "n": 20,
                                                "labels": ["fresh", "rotten"],
                                                MODEL_DIGEST: model_digest(tiny_classifier_dir)})
    cfg = config_from_dict({"register": {"model_name": NAME, "experiment": "t", "floor": 0.5, "retries": 0}})
    with contextlib.chdir(root):
        uri, art = tracking.configure(".")
        run_register(cfg, tiny_classifier_dir, root / "eval", root / "splits", None, root / "reg",
                     {"git_commit": "abc"}, uri, art, compress=root / "compress")
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # configure() set it for in-process loads; tests choose
    return root


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        sample, _, lab = key.partition("{")
        found = ",".join(sorted(lab.rstrip("}").split(","))) if lab else ""
        if sample == name and found == want:
            return float(value)
    return 0.0


@pytest.fixture(scope="module")
def fp32(project):
    server = Server(project, f"models:/{NAME}@champion").wait_ready()
    yield server
    server.stop()


def _direct(project: Path, uri: str, texts: list[str]) -> np.ndarray:
    """The registered model's own answers, its texts in the order the server hands them over (length-sorted,
    serving/model.py): dynamic int8 quantizes activations per ONNX call, and the ONNX pyfunc spreads a batch's
    rows over calls (row_parallel.py), so the same texts grouped otherwise differ in the 5th decimal."""
    from finetune.registry.loading import load_verified

    model = load_verified(uri, f"sqlite:///{project / 'mlflow.db'}")
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    records = model.predict([texts[i] for i in order], params={"probabilities": True})
    probs = np.empty((len(texts), 2))
    probs[order] = [[r["probabilities"]["fresh"], r["probabilities"]["rotten"]] for r in records]
    return probs


def _check_both_protocols(server: Server, name: str, expected: np.ndarray) -> None:
    status, headers, out = post(f"{server.base}/v1/models/{name}:predict", {"instances": TEXTS})
    assert status == 200 and headers.get(VERSION) == f"{name}/1", out
    got = np.array([[p["probabilities"]["fresh"], p["probabilities"]["rotten"]] for p in out["predictions"]])
    assert np.abs(got.sum(axis=1) - 1).max() < 1e-9 and np.abs(got - expected).max() < 1e-5
    assert [p["label"] for p in out["predictions"]] == [["fresh", "rotten"][i] for i in expected.argmax(1)]

    status, headers, out = post(f"{server.base}/v2/models/{name}/infer", {**v2_body(TEXTS), "id": "req-7"})
    assert status == 200 and headers.get(VERSION) == f"{name}/1", out
    assert (out["model_name"], out["model_version"], out["id"]) == (name, "1", "req-7")
    labels, probs = out["outputs"]
    assert labels["data"] == [["fresh", "rotten"][i] for i in expected.argmax(1)]
    assert probs["shape"] == [3, 2] and probs["parameters"]["labels"] == ["fresh", "rotten"]
    assert np.abs(np.array(probs["data"]).reshape(3, 2) - expected).max() < 1e-5
    assert get(f"{server.base}/v2/models/{name}")[1]["versions"] == ["1"]


VERSION = "X-Model-Version"


def test_fp32_champion_answers_both_protocols_with_the_registered_numbers(project, fp32):
    _check_both_protocols(fp32, NAME, _direct(project, f"models:/{NAME}/1", TEXTS))
    # readiness said no until the model was loaded and warmed up; liveness said yes all along
    assert fp32.ready_answers[0] == 503 and fp32.ready_answers[-1] == 200, fp32.ready_answers
    assert get(fp32.base + "/v2/health/live") == (200, {"live": True})


def test_int8_variant_answers_both_protocols(project):
    server = Server(project, f"models:/{NAME}-int8@champion").wait_ready()
    try:
        _check_both_protocols(server, f"{NAME}-int8", _direct(project, f"models:/{NAME}-int8/1", TEXTS))
        metrics = get(server.base + "/metrics")[1]
        assert metric(metrics, "finetune_serve_model_info", model=f"{NAME}-int8", version="1", variant="int8") == 1
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("body, status, words", [
    (b'{"instances": ["a", ', 400, "not valid JSON"),
    (b'{"instances": ["a", 42]}', 400, "instances[1] is int, not a string"),
    (json.dumps({"instances": ["x"] * 65}).encode(), 413, "holds 65 texts; at most 64"),
    (json.dumps({"instances": ["x" * 5001]}).encode(), 413, "instances[0] has 5001 characters; at most 5000"),
])
def test_bad_requests_are_4xx_with_a_message_and_the_server_keeps_serving(fp32, body, status, words):
    before = metric(get(fp32.base + "/metrics")[1], "finetune_serve_requests_total", protocol="v1", code=str(status))
    got, _, out = post(f"{fp32.base}/v1/models/{NAME}:predict", body)
    assert got == status and words in out["error"], out
    assert post(f"{fp32.base}/v1/models/{NAME}:predict", {"instances": ["fine"]})[0] == 200
    after = metric(get(fp32.base + "/metrics")[1], "finetune_serve_requests_total", protocol="v1", code=str(status))
    assert after == before + 1


def test_oversized_body_is_refused_before_it_is_read(fp32):
    """A declared 10 MB body is answered 413 at once (its bytes never sent), then the server keeps serving."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", fp32.port, timeout=30)
    conn.putrequest("POST", f"/v1/models/{NAME}:predict")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", "10000000")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "the request body has 10000000 bytes" in json.loads(resp.read())["error"]
    conn.close()
    assert post(f"{fp32.base}/v1/models/{NAME}:predict", {"instances": ["fine"]})[0] == 200


def test_unknown_model_is_404_naming_the_served_one(fp32):
    status, _, out = post(f"{fp32.base}/v2/models/other/infer", v2_body(["a"]))
    assert status == 404 and "this server serves 'toy'" in out["error"]


def test_metrics_count_requests_labels_batches_and_the_version(fp32):
    text = get(fp32.base + "/metrics")[1]
    ok = metric(text, "finetune_serve_requests_total", protocol="v2", code="200")
    labels = sum(metric(text, "finetune_serve_predicted_label_total", label=lab) for lab in ("fresh", "rotten"))
    for _ in range(3):
        assert post(f"{fp32.base}/v2/models/{NAME}/infer", v2_body(TEXTS[:2]))[0] == 200
    text = get(fp32.base + "/metrics")[1]
    assert metric(text, "finetune_serve_requests_total", protocol="v2", code="200") == ok + 3
    assert sum(metric(text, "finetune_serve_predicted_label_total", label=lab)
               for lab in ("fresh", "rotten")) == labels + 6
    assert metric(text, "finetune_serve_request_seconds_count", protocol="v2") >= 3
    assert metric(text, "finetune_serve_batch_size_count") >= 3
    assert metric(text, "finetune_serve_model_info", model=NAME, version="1", variant="fp32") == 1


def _rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


def _client(url: str, until: float, errors: list, counts: list) -> None:
    n = 0
    while time.time() < until:
        status, _, out = post(url, {"instances": [f"{TEXTS[n % 3]} #{n}", "ok"]})
        if status != 200 or len(out["predictions"]) != 2:
            errors.append((status, out))
        n += 1
    counts.append(n)


def test_soak_four_clients_no_errors_bounded_memory(fp32):
    """4 clients for 15 s: every answer right, the server's RSS grows by less than 60 MB after a warm-up,
    concurrent requests were batched (fewer model calls than requests)."""
    url = f"{fp32.base}/v1/models/{NAME}:predict"
    errors, counts = [], []

    def phase(seconds: float) -> None:
        until = time.time() + seconds
        threads = [threading.Thread(target=_client, args=(url, until, errors, counts)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    before_metrics = get(fp32.base + "/metrics")[1]
    phase(3)  # warm-up: allocator pools and caches reach their working size
    rss_warm = _rss_kb(fp32.proc.pid)
    phase(15)
    growth_mb = (_rss_kb(fp32.proc.pid) - rss_warm) / 1024
    after = get(fp32.base + "/metrics")[1]
    requests = (metric(after, "finetune_serve_requests_total", protocol="v1", code="200")
                - metric(before_metrics, "finetune_serve_requests_total", protocol="v1", code="200"))
    calls = metric(after, "finetune_serve_batch_size_count") - metric(before_metrics, "finetune_serve_batch_size_count")
    assert not errors, errors[:3]
    assert requests == sum(counts) and sum(counts) > 40, counts
    assert growth_mb < 60, f"RSS grew {growth_mb:.1f} MB in 15 s"
    assert calls < requests, (calls, requests)


def test_tampered_model_is_refused_at_start_up_in_one_line(project, tmp_path):
    copy = shutil.copytree(project, tmp_path / "copy", ignore=shutil.ignore_patterns("serve-*.log"))
    stored = [p for p in (copy / "mlartifacts").rglob("model.safetensors") if "models" in p.parts]
    assert stored
    for p in stored:
        data = bytearray(p.read_bytes())
        data[-1] ^= 0xFF
        p.write_bytes(bytes(data))
    server = Server(copy, f"models:/{NAME}@champion")
    rc = server.proc.wait(240)
    server.log.close()
    errors = [line for line in server.output().splitlines() if "error:" in line or " ERROR " in line]
    assert rc == 1 and len(errors) == 1, server.output()[-3000:]
    assert errors[0].startswith("finetune serve: error: toy version 1: file artifacts/")
    assert "model.safetensors differs" in errors[0] and "Traceback" not in server.output()


def test_token_graceful_shutdown_and_request_log(project, tmp_path):
    """With a token file: inference needs the token, health and metrics do not, the token is in no output.
    SIGTERM while a request waits in the batch window: it is answered, the server exits 0, and the request log
    (every request sampled, texts hashed) is flushed."""
    token = "tok-" + hashlib.sha256(b"serve-test").hexdigest()[:24]
    (tmp_path / "token").write_text(token + "\n")
    logs = tmp_path / "requests"
    server = Server(project, f"models:/{NAME}@champion", "--set", "serve.batch_window_ms=800",
                    "--set", "serve.log_sample_rate=1.0", "--set", f"serve.log_folder={logs}",
                    env={"FINETUNE_SERVE_TOKEN_FILE": str(tmp_path / "token")}).wait_ready()
    url = f"{server.base}/v1/models/{NAME}:predict"
    try:
        status, headers, out = post(url, {"instances": ["a"]})
        assert status == 401 and headers.get("WWW-Authenticate") == "Bearer" and "bearer token" in out["error"]
        assert post(url, {"instances": ["a"]}, {"Authorization": "Bearer wrong"})[0] == 401
        assert get(server.base + "/v2/health/ready")[0] == 200 and get(server.base + "/metrics")[0] == 200
        auth = {"Authorization": f"Bearer {token}"}
        answers = []
        slow = threading.Thread(target=lambda: answers.append(post(url, {"instances": TEXTS}, auth)))
        slow.start()
        time.sleep(0.3)  # the request now waits in the 800 ms batch window
        assert server.stop() == 0
        slow.join(30)
    finally:
        server.stop()
    assert answers and answers[0][0] == 200 and len(answers[0][2]["predictions"]) == 3, answers
    records = [json.loads(line) for f in logs.glob("requests-*.jsonl") for line in f.read_text().splitlines()]
    assert [r["text_sha256"] for r in records] == [hashlib.sha256(t.encode()).hexdigest() for t in TEXTS]
    assert all(r["version"] == "1" and r["label"] in ("fresh", "rotten") for r in records)
    assert token not in server.output() and not any(token in f.read_text() for f in logs.iterdir())


def test_unknown_alias_and_a_folder_without_mlmodel_are_refused_in_one_line(project, tmp_path):
    for model, words in ((f"models:/{NAME}@nonexistent", f"cannot resolve models:/{NAME}@nonexistent"),
                         (str(tmp_path), f"{tmp_path}: not an MLflow model folder (no MLmodel file)")):
        server = Server(project, model)
        rc = server.proc.wait(240)
        server.log.close()
        errors = [line for line in server.output().splitlines() if "error:" in line]
        assert rc == 1 and len(errors) == 1 and words in errors[0], server.output()[-3000:]


def test_a_local_model_folder_is_served_and_named_local(project, tmp_path, monkeypatch):
    import mlflow.artifacts

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")  # models:/ resolves here
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{NAME}/1", dst_path=str(tmp_path / "m")))
    server = Server(project, str(folder)).wait_ready()
    try:
        status, headers, out = post(f"{server.base}/v1/models/{folder.name}:predict", {"instances": TEXTS[:1]})
        assert status == 200 and headers.get(VERSION) == f"{folder.name}/local", out
        assert abs(sum(out["predictions"][0]["probabilities"].values()) - 1) < 1e-9
        assert "not checked against the registry's digests" in server.output()
    finally:
        assert server.stop() == 0


def _s3_env(stack, **override) -> dict[str, str]:
    """The S3 part of the pipeline's secrets (the model itself comes from the project's SQLite registry)."""
    return {**{k: v for k, v in stack.client_env.items() if k.startswith("AWS_")}, **override}


def test_request_log_goes_to_s3_in_batches_in_the_monitor_format(project, stack):
    """serve.log_folder=s3://bucket/prefix: a file per log_flush_records records (and the rest at shutdown), each
    record in the fields `finetune monitor` reads; the S3 secret is in no output and no object."""
    prefix = f"serve-requests/{uuid.uuid4().hex[:8]}"
    env = _s3_env(stack)
    server = Server(project, f"models:/{NAME}@champion", "--set", "serve.log_sample_rate=1.0",
                    "--set", f"serve.log_folder=s3://{stack.bucket}/{prefix}", "--set", "serve.log_text=keep",
                    "--set", "serve.log_flush_records=2", env=env).wait_ready()
    try:
        for text in TEXTS:  # 3 requests of one text: a file of 2 records while serving, the last one at SIGTERM
            assert post(f"{server.base}/v1/models/{NAME}:predict", {"instances": [text]})[0] == 200
    finally:
        assert server.stop() == 0, server.output()[-3000:]
    s3 = stack.s3()
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=stack.bucket, Prefix=prefix + "/")["Contents"])
    assert len(keys) == 2 and all(k.startswith(prefix + "/requests-") and k.endswith(".jsonl") for k in keys), keys
    bodies = [s3.get_object(Bucket=stack.bucket, Key=k)["Body"].read().decode() for k in keys]
    records = [json.loads(line) for body in bodies for line in body.splitlines()]
    assert [len(b.splitlines()) for b in bodies] == [2, 1] and [r["text"] for r in records] == TEXTS
    assert all(set(r) == {"ts", "model", "version", "text", "label", "probabilities"} for r in records), records
    assert all(r["model"] == NAME and r["version"] == "1" and r["label"] in ("fresh", "rotten") for r in records)
    secret = env["AWS_SECRET_ACCESS_KEY"]
    assert secret not in server.output() and not any(secret in b for b in bodies)


def test_an_unreachable_s3_request_log_stops_the_server_at_start_in_one_line(project, stack):
    wrong = "wrong-secret-" + uuid.uuid4().hex[:8]
    server = Server(project, f"models:/{NAME}@champion", "--set", "serve.log_sample_rate=0.5",
                    "--set", f"serve.log_folder=s3://{stack.bucket}/serve-requests/denied",
                    env=_s3_env(stack, AWS_SECRET_ACCESS_KEY=wrong))
    rc = server.proc.wait(120)
    server.stop()
    errors = [line for line in server.output().splitlines() if "error:" in line]
    assert rc == 1 and len(errors) == 1, server.output()[-3000:]
    assert f"serve.log_folder s3://{stack.bucket}/serve-requests/denied: cannot reach the bucket" in errors[0]
    assert wrong not in server.output() and "Traceback" not in server.output()
