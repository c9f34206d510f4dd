"""report: one self-contained HTML page per pipeline run.

Data summary and validation results, training curves, test metrics with the per-class table, confusion
matrix and plots, the promotion decision and the champion it was weighed against, and lineage. Inline CSS,
images as base64 data URIs, no scripts and no external URLs: the file opens anywhere, offline, and can be
attached to a ticket or logged as an artifact. Pure: data in, HTML string out.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from typing import Any

from finetune.reporting.model_card import (
    PER_CLASS_HEADER,
    SPAN_ERRORS,
    accuracy_interval,
    compress_header,
    compress_rows,
    confusion_subset,
    int8_status,
    per_class_rows,
    serving_status,
    span_error_rows,
    tested,
    training_settings,
)
from finetune.tasks.single_label import floor_warning


@dataclass
class ReportData:
    registration: dict[str, Any]  # registration.json
    metrics: dict[str, Any]  # evaluate's metrics.json
    validation: dict[str, Any] | None = None  # validate's report.json
    token_stats: dict[str, Any] | None = None  # tokenize's meta.json "stats"
    training: dict[str, Any] | None = None  # train's summary.json
    params: dict[str, Any] = field(default_factory=dict)  # flat config the model was trained with
    images: dict[str, bytes] = field(default_factory=dict)  # PNGs: training, lengths, roc, calibration
    created: str = ""  # when the report was made (passed in: the core reads no clock)
    compress: dict[str, Any] | None = None  # compress's metrics.json


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f2328;
 background:#f6f8fa;margin:0}
main{max-width:1080px;margin:0 auto;padding:24px}
header{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:16px 20px;margin-bottom:16px}
h1{font-size:22px;margin:0 0 6px}h2{font-size:17px;margin:0 0 10px;border-bottom:1px solid #d0d7de;padding-bottom:6px}
h3{font-size:14px;margin:14px 0 6px}
section{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:16px 20px;margin-bottom:16px}
nav a{margin-right:14px;color:#0969da;text-decoration:none}
table{border-collapse:collapse;margin:6px 0 10px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d7de;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600}td.num{text-align:right}
.badge{display:inline-block;padding:2px 10px;border-radius:12px;font-weight:600;font-size:13px}
.champion{background:#dafbe1;color:#116329;border:1px solid #4ac26b}
.challenger{background:#fff8c5;color:#7d4e00;border:1px solid #d4a72c}
.ok{color:#116329;font-weight:600}.fail{color:#cf222e;font-weight:600}
.kpis{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0 12px}
.kpi{border:1px solid #d0d7de;border-radius:6px;padding:8px 14px;min-width:120px}
.kpi b{display:block;font-size:20px}.kpi span{color:#59636e;font-size:12px}
.figs{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
figure{margin:0}figure img{max-width:100%;border:1px solid #d0d7de;border-radius:4px}
figcaption{color:#59636e;font-size:12px}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px;background:#f6f8fa;
 padding:1px 4px;border-radius:4px;word-break:break-all}
.muted{color:#59636e}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _e(value)
    if isinstance(value, int):
        return f"{value:,}"
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _table(header: list[str] | None, rows: list[list[Any]], raw: bool = False) -> str:
    """``raw``: cells are already HTML. No ``header``: the first cell of each row is its heading."""
    head = "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead>" if header else ""
    body = []
    for row in rows:
        cells = []
        for v in row:
            cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            tag = "th" if header is None and not cells else "td"
            cells.append(f"<{tag}{cls}>{v if raw and isinstance(v, str) else _num(v)}</{tag}>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>{head}<tbody>{''.join(body)}</tbody></table>"


def _kpis(items: list[tuple[str, str]]) -> str:
    return '<div class="kpis">' + "".join(f'<div class="kpi"><b>{_e(v)}</b><span>{_e(k)}</span></div>'
                                          for k, v in items) + "</div>"


def _figure(images: dict[str, bytes], key: str, caption: str, width: int | None = None) -> str:
    data = images.get(key)
    if not data:
        return ""
    style = f' style="width:{width}px"' if width else ""
    src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return f'<figure{style}><img src="{src}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>'


def _confusion(metrics: dict[str, Any]) -> str:
    cm, labels = metrics.get("confusion_matrix"), metrics.get("labels") or list(metrics.get("per_class") or {})
    if not cm:
        return ""
    cm, labels, note = confusion_subset(cm, labels)
    top = max(max(row) for row in cm) or 1
    head = "<th>actual \\ predicted</th>" + "".join(f"<th>{_e(lab)}</th>" for lab in labels)
    rows = []
    for lab, row in zip(labels, cm):
        cells = "".join(
            f'<td class="num" style="background:rgba(9,105,218,{0.08 + 0.7 * v / top:.2f});'
            f'color:{"#fff" if v / top > 0.6 else "#1f2328"}">{v:,}</td>' for v in row)
        rows.append(f"<tr><th>{_e(lab)}</th>{cells}</tr>")
    return f"<h3>Confusion matrix{_e(note)}</h3><table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _data_section(d: ReportData) -> str:
    v = d.validation
    if not v:
        return "<section id=data><h2>Data</h2><p class=muted>No validation report.</p></section>"
    labels = list(v.get("labels") or [])
    counts = v.get("class_counts") or {}
    total = sum(counts.values()) or 1
    status = '<span class="ok">passed</span>' if v.get("success") else '<span class="fail">FAILED</span>'
    parts = [f"<p>Source <code>{_e(v.get('data', '?'))}</code> (md5 <code>{_e(v.get('data_md5') or '-')}</code>): "
             f"{_num(v.get('rows', 0))} rows, columns {_e(', '.join(v.get('columns') or []))}. Validation {status}.</p>"]
    if counts:
        parts.append(_table(["class", "rows", "share"], [[lab, c, f"{c / total:.1%}"] for lab, c in counts.items()]))
    balance = v.get("class_balance")
    if balance:
        base = balance["baseline"]
        parts.append(f"<p>Majority-class baseline (always <code>{_e(balance['majority'])}</code>) on the test split: "
                     f"accuracy {base['accuracy']:.4f}, macro-F1 {base['macro_f1']:.4f}.</p>")
    floor = floor_warning(balance, float(d.params["register.floor"]), str(d.params.get("register.metric")))\
        if "register.floor" in d.params else None
    for warning in (v.get("warnings") or []) + ([floor] if floor else []):
        parts.append(f'<p class="fail">Warning: {_e(warning)}</p>')
    splits = v.get("splits") or {}
    if splits:
        parts.append("<h3>Splits</h3>" + _table(
            ["split", "rows", *labels], [[s, x["rows"], *[x.get("classes", {}).get(lab, 0) for lab in labels]]
                                          for s, x in splits.items()]))
    rules = v.get("rules") or []
    if rules:
        rows = [[('<span class="ok">ok</span>' if r.get("success") else '<span class="fail">failed</span>'),
                 _e(r.get("rule", "")), _e(r.get("column") or ""), _e(r.get("message", "")),
                 _e(r.get("unexpected_count", ""))] for r in sorted(rules, key=lambda r: bool(r.get("success")))]
        passed = sum(bool(r.get("success")) for r in rules)
        parts.append(f"<h3>Validation rules ({passed} of {len(rules)} passed)</h3>"
                     + _table(["", "rule", "column", "check", "rows hit"], rows, raw=True))
    if d.token_stats:
        parts.append("<h3>Token lengths</h3>" + _table(
            ["split", "texts", "tokens", "mean length", "max length", "truncated"],
            [[s, x.get("rows"), x.get("tokens"), f"{float(x.get('mean_length', 0)):.1f}", x.get("max_length"),
              x.get("truncated")]
             for s, x in d.token_stats.items()]))
    parts.append('<div class="figs">' + _figure(d.images, "lengths", "share of texts per token length, per split")
                 + "</div>")
    return "<section id=data><h2>Data</h2>" + "".join(parts) + "</section>"


def _training_section(d: ReportData) -> str:
    t = d.training or {}
    parts = []
    if t:
        parts.append(_kpis([("steps", _num(t.get("steps"))), ("epochs", _num(t.get("epochs_run"), 2)),
                            ("final train loss", _num(t.get("final_loss"))), ("val loss", _num(t.get("val_loss"))),
                            ("val accuracy", _num(t.get("val_accuracy"))),
                            ("time", f"{float(t.get('seconds', 0)):.0f} s on {t.get('device', '?')}"),
                            ("throughput", f"{float(t.get('samples_per_second', 0)):.1f} samples/s"),
                            ("trainable parameters", f"{_num(t.get('trainable_parameters'))} of "
                                                     f"{_num(t.get('parameters'))}")]))
        if t.get("stop_reason"):
            best = (f"; best {_e(t.get('select_metric'))} {_num(t.get('best_value'))} at step "
                    f"{_num(t.get('best_step'))}" if t.get("best_step") is not None else "")
            parts.append(f"<p>Stopped: {_e(t['stop_reason'])}{best}; the exported model is the weights of step "
                         f"{_num(t.get('exported_step'))}.</p>")
        if t.get("resumed_from_step"):
            parts.append(f"<p>Resumed from the checkpoint at step {_num(t['resumed_from_step'])}.</p>")
    parts.append('<div class="figs">' + _figure(d.images, "training", "training loss per step; validation loss "
                                                "and accuracy per evaluation") + "</div>")
    settings = training_settings(d.params)
    if settings:
        parts.append("<h3>Settings</h3>" + _table(["param", "value"], [[k, str(v)] for k, v in settings]))
    return "<section id=training><h2>Training</h2>" + "".join(parts) + "</section>"


def _evaluation_section(d: ReportData) -> str:
    m = d.metrics
    lo, hi = accuracy_interval(float(m["accuracy"]), int(m.get("words", m.get("n", 0))))  # token: per word
    parts = [f"<p>Held-out test split, {_e(tested(m))}.</p>",
             _kpis([("accuracy", f"{float(m['accuracy']):.4f}"), ("95% interval", f"{lo:.3f} - {hi:.3f}"),
                    ("macro-F1", f"{float(m['macro_f1']):.4f}"), ("cross-entropy", _num(m.get("loss"))),
                    ("calibration error (ECE)", _num(m.get("ece")))]),
             _multi_label_kpis(m), _ner_kpis(m),
             "<h3>Per class</h3>" + _table(PER_CLASS_HEADER, per_class_rows(m)),
             _confusion(m),
             '<div class="figs">' + _figure(d.images, "roc", "per-type F1 (exact span and type)" if "entity_micro_f1"
                                            in m else "ROC curve per class (one vs the rest)", 420)
             + _figure(d.images, "calibration", "reliability: accuracy per confidence bin", 420) + "</div>"]
    return "<section id=evaluation><h2>Evaluation</h2>" + "".join(parts) + "</section>"


def _multi_label_kpis(m: dict[str, Any]) -> str:
    """task multi_label (its metrics have micro_f1): accuracy above is subset accuracy; the label-level figures
    with the per-label thresholds tuned on the validation split, beside the same figures at 0.5."""
    if "micro_f1" not in m:
        return ""
    at = m.get("at_default_threshold") or {}
    return ("<h3>Multi-label</h3>" + _kpis([
        ("micro-F1", f"{float(m['micro_f1']):.4f}"), ("micro-F1 at 0.5", _num(at.get("micro_f1"))),
        ("macro-F1 at 0.5", _num(at.get("macro_f1"))), ("samples-F1", _num(m.get("samples_f1"))),
        ("Hamming loss", _num(m.get("hamming_loss")))])
        + _table(["label", "threshold (tuned on val)"], [[lab, f"{t:.3f}"] for lab, t in
                                                        (m.get("thresholds") or {}).items()]))


def _ner_kpis(m: dict[str, Any]) -> str:
    """task token (its metrics have entity_micro_f1): accuracy above is per word, the per-class table per entity
    type; the entity scores and the span-error table."""
    if "entity_micro_f1" not in m:
        return ""
    return ("<h3>Named entities</h3>" + _kpis([
        ("entity micro-F1", f"{float(m['entity_micro_f1']):.4f}"),
        ("entity precision", _num(m.get("entity_micro_precision"))),
        ("entity recall", _num(m.get("entity_micro_recall"))), ("entity macro-F1", _num(m.get("entity_macro_f1"))),
        ("token accuracy", _num(m.get("token_accuracy"))), ("entities", _num(m.get("entities")))])
        + "<h3>Span errors per entity type</h3>" + _table(["type", *SPAN_ERRORS], span_error_rows(m)))


def _gate_section(d: ReportData) -> str:
    r = d.registration
    alias = r.get("alias", "?")
    champ = r.get("champion_before")
    metric = r.get("metric", "?")
    parts = [f'<p><span class="badge {_e(alias)}">@{_e(alias)}</span> &nbsp;<b>{_e(r.get("model_name"))}</b> '
             f'version <b>{_e(r.get("version"))}</b>: {_e(r.get("reason", ""))}.</p>']
    rows = [["this version", r.get("version"), f"{float(r.get('value', math.nan)):.4f}", "this run's test split"]]
    if champ:
        rows.append(["champion before", champ.get("version"), _num(champ.get("value")), champ.get("source", "")])
    parts.append(_table(["", "version", metric, "measured"], rows))
    if not champ:
        parts.append("<p class=muted>There was no champion before this version.</p>")
    return "<section id=gate><h2>Promotion gate</h2>" + "".join(parts) + "</section>"


def _compress_section(d: ReportData) -> str:
    c = d.compress
    if not c:
        return ("<section id=compress><h2>Compressed variants</h2><p class=muted>No compress output was given."
                "</p></section>")
    r = d.registration
    rows = [[row[0], *[v if isinstance(v, str) else _num(v, 4 if i < 4 else 2) for i, v in enumerate(row[1:])]]
            for row in compress_rows(c)]
    status = int8_status(r.get("model_name", "model"), c, r.get("int8"))
    serves = serving_status(r.get("model_name", "model"), str(r.get("version", "?")), c)
    return ("<section id=compress><h2>Compressed variants</h2>" + _table(compress_header(c), rows)
            + f"<p>{_e(status)}</p><p>{_e(serves)}</p>"
            + _figure(d.images, "front", "the front: test accuracy against texts/s, the served variant starred", 640)
            + "</section>")


def _lineage_section(d: ReportData) -> str:
    r = d.registration
    lin = dict(r.get("lineage") or {})
    rows = [[k, f"<code>{_e(lin.pop(k))}</code>"] for k in ("git_commit", "git_dirty", "data_path", "data_md5",
                                                            "data_dvc_md5", "data_uri", "kfp_run") if k in lin]
    rows += [[k, f"<code>{_e(v)}</code>"] for k, v in lin.items()]
    rows += [["MLflow run", f"<code>{_e(r.get('run_id', ''))}</code>"],
             ["model URI", f"<code>{_e(r.get('model_uri', ''))}</code>"],
             ["tracking URI", f"<code>{_e(r.get('tracking_uri', ''))}</code>"]]
    return "<section id=lineage><h2>Lineage</h2>" + _table(None, rows, raw=True) + "</section>"


def render_report(d: ReportData) -> str:
    """The whole page."""
    r = d.registration
    title = f"{r.get('model_name', 'model')} v{r.get('version', '?')}"
    nav = "".join(f'<a href="#{k}">{v}</a>' for k, v in (("data", "Data"), ("training", "Training"),
                                                          ("evaluation", "Evaluation"), ("gate", "Promotion gate"),
                                                          ("compress", "Compressed"), ("lineage", "Lineage")))
    head = (f'<header><h1>{_e(title)} <span class="badge {_e(r.get("alias", ""))}">@{_e(r.get("alias", "?"))}'
            f'</span></h1><div class="muted">finetune pipeline run report{" - " + _e(d.created) if d.created else ""}'
            f' - git <code>{_e((r.get("lineage") or {}).get("git_commit", "?"))}</code></div><nav>{nav}</nav></header>')
    body = "".join([_data_section(d), _training_section(d), _evaluation_section(d), _gate_section(d),
                    _compress_section(d), _lineage_section(d)])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)} - run report</title><style>{CSS}</style></head>"
            f"<body><main>{head}{body}</main></body></html>\n")


