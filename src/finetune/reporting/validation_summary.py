"""The validation report in words: the Markdown summary (report.md) and the one-line-per-rule failure message."""

from __future__ import annotations

from typing import Any


def render_summary(report: dict[str, Any]) -> str:
    """Human-readable report (Markdown); the JSON report holds the same facts."""
    status = "PASSED" if report["success"] else "FAILED"
    lines = [f"# Validation {status}: {report['data']}", ""]
    if "rows" in report:
        lines.append(f"Rows read: {report['rows']}; columns: {', '.join(report.get('columns', []))}")
    for r in report["rules"]:
        mark = "ok  " if r["success"] else "FAIL"
        col = f" [{r['column']}]" if r.get("column") else ""
        lines.append(f"- {mark} {r['rule']}{col}: {r['message']}"
                     + (f" ({r['unexpected_count']} row(s))" if r["unexpected_count"] and not r["success"] else ""))
        if not r["success"]:
            for ex in r["examples"]:
                lines.append(f"    row {ex['row']}: {ex['value']!r}" if ex["value"] is not None else f"    row {ex['row']}")
    for s, info in (report.get("splits") or {}).items():
        lines.append(f"- split {s}: {info['rows']} rows {info['classes']}")
    balance = report.get("class_balance")
    if balance:
        base = balance["baseline"]
        lines.append(f"- class balance: {', '.join(f'{k} {v:.1%}' for k, v in balance['shares'].items())}; "
                     f"majority-class baseline on test: accuracy {base['accuracy']:.4f}, "
                     f"macro-F1 {base['macro_f1']:.4f}")
    lines += [f"- WARNING: {w}" for w in report.get("warnings") or []]
    return "\n".join(lines) + "\n"


def failure_message(report: dict[str, Any]) -> str:
    """One line per broken rule: file, rule, column, example rows."""
    out = []
    for r in report["rules"]:
        if r["success"]:
            continue
        rows = ", ".join(str(e["row"]) for e in r["examples"])
        where = f" column '{r['column']}'" if r.get("column") else ""
        out.append(f"{report['data']}: rule '{r['rule']}' failed{where}: {r['message']}"
                   + (f"; {r['unexpected_count']} row(s), e.g. row(s) {rows}" if rows else ""))
    return "\n".join(out)
