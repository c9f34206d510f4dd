"""The monitor's HTML report: one self-contained page (plots inlined as PNG), the verdict first, then every test
and the reference-vs-batch distribution of each profiled feature. Our own matplotlib plots, not Evidently's
report (docs/monitoring.md says why)."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np

from finetune.monitoring.profiling import Profile


def _histogram(name: str, reference: np.ndarray, batch: np.ndarray) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 2.6))
    edges = np.histogram_bin_edges(np.concatenate([reference, batch]), bins=30)
    ax.hist(reference, bins=edges, density=True, alpha=0.5, label="reference (test split)")
    ax.hist(batch, bins=edges, density=True, alpha=0.5, label="batch")
    ax.set_title(name, fontsize="small")
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return f'<img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _row(test: dict[str, Any]) -> str:
    detail = {k: v for k, v in test.items() if k not in ("test", "kind", "drifted")}
    mark = "DRIFT" if test["drifted"] else "ok"
    style = ' style="color:#b00;font-weight:bold"' if test["drifted"] else ""
    return (f"<tr><td>{html.escape(test['test'])}</td><td>{test['kind']}</td><td{style}>{mark}</td>"
            f"<td><code>{html.escape(str(detail))}</code></td></tr>")


def render_monitor_report(result: dict[str, Any], reference: dict[str, Any], batch: Profile) -> str:
    verdict = (f"DRIFT: {', '.join(result['fired'])}" if result["drift"] else "no drift")
    plots = "".join(_histogram(name, np.asarray(reference["features"][name]), values)
                    for name, values in batch.features.items() if name in reference["features"])
    rows = "".join(_row(t) for t in result["tests"])
    meta = {k: result[k] for k in ("model", "version", "input", "rows", "rows_read", "reference_rows", "labelled")
            if k in result}
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>finetune monitor</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}td,th{{border:1px solid #ccc;padding:4px;
vertical-align:top}}table{{border-collapse:collapse}}code{{font-size:small}}</style></head><body>
<h1>Monitor: {html.escape(verdict)}</h1><p><code>{html.escape(str(meta))}</code></p>
<table><tr><th>test</th><th>kind</th><th>result</th><th>figures</th></tr>{rows}</table>
<h2>Reference vs batch</h2><div>{plots}</div></body></html>
"""
