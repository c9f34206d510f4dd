"""The serving load benchmark's harness runs end to end (tiny model, two sides, short runs). Speed itself is never
asserted here."""

import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration


def test_serve_load_smoke_measures_each_side_without_errors(tmp_path):
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "serve_load.py"), "--smoke", "--sides",
                           "finetune-int8-batch", "mlflow-fp32", "--concurrency", "1", "4", "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"finetune-int8-batch", "mlflow-fp32"}
    for side, r in res.items():
        assert set(r["runs"]) == {"1", "4"} and r["rss_mb_before"] > 0 and r["rss_mb_after"] > 0, side
        for run in r["runs"].values():
            assert run["errors"] == 0 and run["requests"] > 0 and run["texts_per_s"] > 0, (side, run)
            assert 0 < run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"], (side, run)
    assert "| finetune-int8-batch | 4 |" in proc.stdout and "| mlflow-fp32 | 1 |" in proc.stdout
