"""The bigram seen-rate test alone (no model): its false alarms over 20 seeds of 500 held-out reviews and its
detection of 10 seeds of word-shuffled reviews, on the same batches and reference as bench/monitor_drift.py.

    PYTHONPATH=src python bench/monitor_order.py --project <a project with out/validate>
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from monitor_drift import shuffled

from finetune.common.monitor_config import MonitorConfig
from finetune.monitoring.drift import feature_tests
from finetune.monitoring.order import FEATURE, bigram_seen_rates, reference_bigrams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--project", type=Path, required=True)
    args = ap.parse_args()
    splits = args.project / "out" / "validate"
    rates, table = reference_bigrams(pd.read_parquet(splits / "test.parquet")["text"].tolist())
    reference = {FEATURE: np.round(rates, 6)}  # as profile.json stores them
    val = pd.read_parquet(splits / "val.parquet")

    def test(texts: list[str]) -> dict:
        return feature_tests(reference, {FEATURE: bigram_seen_rates(texts, table)}, MonitorConfig())[0]

    held = [test(val.sample(500, random_state=s)["text"].tolist()) for s in range(20)]
    shuf = [test(shuffled(val.sample(500, random_state=200 + s)["text"].tolist(), s)) for s in range(10)]
    print(json.dumps({"held_out_alarms": sum(t["drifted"] for t in held),
                      "held_out_psi": [min(t["statistic"] for t in held), max(t["statistic"] for t in held)],
                      "shuffled_detected": sum(t["drifted"] for t in shuf),
                      "shuffled_psi": [min(t["statistic"] for t in shuf), max(t["statistic"] for t in shuf)],
                      "reference_rate": float(rates.mean()),
                      "shuffled_rate": float(np.mean([t["batch_mean"] for t in shuf])), "table_bytes": table.nbytes}))


if __name__ == "__main__":
    main()
