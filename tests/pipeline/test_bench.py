"""The throughput benchmark's harness runs end to end (tiny model on CPU). Speed itself is never asserted here."""

import json
import math
import subprocess
import sys

from conftest import REPO


def test_benchmark_smoke_runs_every_side(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "train_throughput.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"project-packed", "project-padded", "hf-tuned", "hf-newcomer"}
    for side, r in res.items():
        assert r["samples_per_s"] > 0 and 0 < r["mfu"] < 1 and math.isfinite(r["final_loss"]), side
        assert 0.3 < r["final_loss"] < 1.5, side  # a 2-class loss that started near ln 2, not garbage
        assert r["samples"] > 0 and r["warmup_s"] > 0, side  # timed after the warm-up boundary, not from start
    assert "| project-packed |" in proc.stdout and "| hf-tuned |" in proc.stdout
