"""model_card: the Markdown card registered with every model version (its description in the registry and
``model_card.md`` in its run): data, intended use, metrics per class, limitations, how to load it.

Pure: the numbers come in as the stages wrote them (metrics.json, the validation report, the flat params),
the text comes out.
"""

from __future__ import annotations

import math
from typing import Any


def accuracy_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% by default) for a proportion ``p`` measured on ``n`` examples."""
    if n <= 0:
        return 0.0, 1.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        text = f"{v:.4f}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def per_class_rows(metrics: dict[str, Any]) -> list[list[Any]]:
    """label, precision, recall, F1, ROC AUC (or '-'), support: shared by the card and the run report."""
    return [[lab, r["precision"], r["recall"], r["f1"], r.get("roc_auc", "-"), r["support"]]
            for lab, r in (metrics.get("per_class") or {}).items()]


COMPRESS_HEADER = ["variant", "accuracy", "accuracy delta", "macro-F1", "macro-F1 delta", "size MB",
                   "p50 ms (batch 1)", "p95 ms (batch 1)", "texts/s (batch {batch})", "peak MB"]


def compress_rows(compressed: dict[str, Any]) -> list[list[Any]]:
    """One row per variant of the compress stage's metrics.json: shared by the card and the run report."""
    rows = []
    for name, v in (compressed.get("variants") or {}).items():
        rows.append([name, v["accuracy"], v.get("accuracy_delta", "-"), v["macro_f1"], v.get("macro_f1_delta", "-"),
                     v["size_mb"], v["latency_ms_p50"], v["latency_ms_p95"], v["texts_per_s"],
                     "-" if v.get("peak_memory_mb") is None else v["peak_memory_mb"]])
    return rows


def compress_header(compressed: dict[str, Any]) -> list[str]:
    return [h.format(batch=compressed.get("batch_size", "?")) for h in COMPRESS_HEADER]


def serving_status(name: str, version: str, compressed: dict[str, Any]) -> str:
    """One sentence: which variant compress chose to serve, why, and the URI that loads it (verified)."""
    chosen = compressed.get("serving") or {}
    if not chosen:
        return "No serving choice was made (compress measured no variant): the fp32 model serves."
    return (f"Served: {chosen['variant']} ({chosen.get('made_by') or 'the fp32 model'}): {chosen.get('reason')}. "
            f"Load it with `models:/{name}-serving/{version}` (or `models:/{name}-serving@champion`). Peak MB: "
            f"resident memory above the loaded weights while the variant ran (activations, ONNX Runtime's arena).")


def int8_status(name: str, compressed: dict[str, Any], int8: dict[str, Any] | None) -> str:
    """One sentence: was the int8 variant registered, as what, or why not."""
    int8 = int8 or {}
    if int8.get("registered"):
        return f"The int8 variant is registered as `{int8['model_uri']}` (@{int8['alias']})."
    if int8.get("reason"):
        return f"The int8 variant was not registered: {int8['reason']}."
    if compressed.get("exported") and compressed.get("int8_passed"):
        return f"The int8 variant passed its gate and is registered as `{name}-int8` with this version."
    return f"The int8 variant is not registered: {compressed.get('message', 'it did not pass its gate')}."


PER_CLASS_HEADER = ["class", "precision", "recall", "F1", "ROC AUC", "support"]


_OPERATIONAL = {"train.checkpoint_every", "train.log_every", "train.threads", "train.device", "train.eval_every"}


def training_settings(params: dict[str, Any]) -> list[tuple[str, Any]]:
    """The flat params that shape the model (base, max_length, train.*), without operational ones."""
    return [(k, params[k]) for k in sorted(params)
            if (k.startswith(("model.", "train.")) or k == "tokenize.max_length") and k not in _OPERATIONAL
            and params[k] is not None]


# Expected calibration error bounds: under WELL the stated confidence is within a few points of the accuracy
# at that confidence; over ROUGH it is off by a tenth or more.
ECE_WELL, ECE_ROUGH = 0.05, 0.10


def calibration_sentence(ece: float) -> str:
    if math.isnan(ece):
        return "Calibration was not measured: treat the probabilities as a ranking, not as exact chances."
    if ece < ECE_WELL:
        return (f"Probabilities are well calibrated (ECE {ece:.3f} < {ECE_WELL}): a stated 80% is right about "
                f"80% of the time on data like the test split.")
    if ece < ECE_ROUGH:
        return (f"Probabilities are only roughly calibrated (ECE {ece:.3f}, between {ECE_WELL} and {ECE_ROUGH}); "
                f"treat them as a ranking, not as exact chances.")
    return (f"Probabilities are poorly calibrated (ECE {ece:.3f} >= {ECE_ROUGH}): do not read them as chances; "
            f"use them only to rank texts.")


def model_card(name: str, version: str, metrics: dict[str, Any], validation: dict[str, Any] | None,
               params: dict[str, Any], lineage: dict[str, Any] | None = None, run_id: str | None = None,
               token_stats: dict[str, Any] | None = None, compressed: dict[str, Any] | None = None,
               int8: dict[str, Any] | None = None, base: dict[str, Any] | None = None) -> str:
    """The card of ``name`` version ``version``. ``params`` is the flat config (``train.epochs``...) the model
    was trained with; ``token_stats`` the tokenize stage's per-split stats, if at hand; ``compressed`` the
    compress stage's metrics.json and ``int8`` what registering its int8 variant did (registration.json); ``base``
    the base model's facts (common.base_model.base_facts)."""
    validation, lineage = validation or {}, lineage or {}
    labels = list(metrics.get("labels") or (metrics.get("per_class") or {}).keys())
    out = [f"# {name}, version {version}", ""]
    out += _intended_use(params.get("model.base", "?"), labels, validation, run_id)
    out += _data_section(validation, lineage, labels)
    if base:
        out += base_model_section(base)
    out += ["", "## Training", "",
            _table(["setting", "value"], [[k, str(v)] for k, v in training_settings(params)])]
    out += _evaluation_section(metrics, labels)
    if compressed:
        out += ["", "## Compressed variants", "",
                f"Measured on the same test split in one process ({compressed.get('threads') or 'default'} "
                f"threads); deltas against the fp32 PyTorch model.", "",
                _table(compress_header(compressed), compress_rows(compressed)), "",
                int8_status(name, compressed, int8), "", serving_status(name, version, compressed),
                "The front (accuracy against texts/s) is plotted in the run's report (report/report.html)."]
    out += ["", "## Limitations", ""]
    out += [f"- {item}" for item in _limitations(metrics, validation, params.get("tokenize.max_length", "?"),
                                                  token_stats)]
    out += _how_to_load(name, f"models:/{name}/{version}")
    return "\n".join(out)


def base_model_section(base: dict[str, Any]) -> list[str]:
    """The base model: architecture, how many parameters and how many of them trained (LoRA: a small share),
    the licence it ships (the user must honour it) and the pad token the classifier pools around."""
    total, trainable = base.get("parameters"), base.get("trainable_parameters")
    rows = [["base model", f"`{base.get('base', '?')}`"], ["architecture", base.get("architecture") or "?"]]
    if isinstance(total, int) and isinstance(trainable, int) and total:
        rows += [["parameters", f"{total:,}"],
                 ["trained parameters", f"{trainable:,} ({trainable / total:.2%})"]]
    rows.append(["licence of the base", base.get("license") or "not shipped with the base: check its source"])
    if base.get("pad_token") is not None:
        how = ("set by finetune (the tokenizer shipped none)" if base.get("pad_token_set_by")
               else "shipped with the tokenizer")
        rows.append(["pad token", f"`{base['pad_token']}` (id {base.get('pad_token_id')}), {how}"])
    return ["", "## Base model", "", _table(["", ""], rows)]


def _intended_use(base: str, labels: list[str], validation: dict[str, Any], run_id: str | None) -> list[str]:
    return [f"A text classifier: `{base}` fine-tuned to assign one of {len(labels)} labels "
            f"({', '.join(f'`{lab}`' for lab in labels)}) to a text. Built by the `finetune` pipeline"
            + (f" (MLflow run `{run_id}`)." if run_id else "."), "",
            "## Intended use", "",
            f"Sorting short texts of the same kind as its training data (`{validation.get('data', '?')}`) into "
            f"these labels, where a wrong label now and then is acceptable or a person reviews the results. "
            f"Not for other languages, other kinds of text, labels it was not trained on, or decisions about "
            f"people without review: it always answers with one of its labels, even for text unlike anything "
            f"it has seen.", ""]


def _data_section(validation: dict[str, Any], lineage: dict[str, Any], labels: list[str]) -> list[str]:
    out = ["## Data", ""]
    counts = validation.get("class_counts") or {}
    total = sum(counts.values())
    splits = validation.get("splits") or {}
    if validation:
        out.append(f"`{validation.get('data', '?')}`: {validation.get('rows', '?')} rows read"
                   + (f", {total} after validation" if total else "") + ".")
        if counts:
            out.append("Classes: " + ", ".join(f"`{lab}` {c} ({c / total:.1%})" for lab, c in counts.items()) + ".")
        if splits:
            out += ["", _table(["split", "rows", *labels],
                               [[s, v["rows"], *[v.get("classes", {}).get(lab, 0) for lab in labels]]
                                for s, v in splits.items()])]
    else:
        out.append("(no validation report was given)")
    hashes = [f"{k} `{lineage[k]}`" for k in ("data_md5", "data_dvc_md5", "git_commit") if lineage.get(k)]
    if hashes:
        out += ["", "Lineage: " + ", ".join(hashes) + "."]
    return out


TABLE_CLASSES = 20  # a confusion table past this many classes shows the most frequent only (it grows with classes^2)


def confusion_subset(cm: list[list[int]], labels: list[str], k: int = TABLE_CLASSES
                     ) -> tuple[list[list[int]], list[str], str]:
    """The confusion matrix restricted to the ``k`` classes with the most test texts (rows: actual), with a note
    saying so; the whole matrix when there are at most ``k`` classes."""
    if len(labels) <= k:
        return cm, labels, ""
    keep = sorted(sorted(range(len(labels)), key=lambda i: (-sum(cm[i]), i))[:k])
    note = f" ({k} most frequent of {len(labels)} classes; the full matrix is in metrics.json)"
    return [[cm[i][j] for j in keep] for i in keep], [labels[i] for i in keep], note


def _evaluation_section(metrics: dict[str, Any], labels: list[str]) -> list[str]:
    n = int(metrics.get("n", 0))
    acc = float(metrics["accuracy"])
    lo, hi = accuracy_interval(acc, int(metrics.get("words", n)))  # task token: accuracy is per word
    out = ["", "## Evaluation", "",
           f"On the held-out test split ({tested(metrics)}): accuracy **{acc:.4f}** (95% interval {lo:.3f}-{hi:.3f}), "
           f"macro-F1 **{float(metrics['macro_f1']):.4f}**, cross-entropy {float(metrics.get('loss', math.nan)):.4f}, "
           f"expected calibration error {float(metrics.get('ece', math.nan)):.4f}.", "",
           _table(PER_CLASS_HEADER, per_class_rows(metrics))]
    if "micro_f1" in metrics:  # task multi_label: accuracy above is subset accuracy (every label of a text right)
        base = metrics.get("at_default_threshold") or {}
        out += ["", f"Multi-label: micro-F1 **{metrics['micro_f1']:.4f}** (at 0.5: {base.get('micro_f1', math.nan):.4f}), "
                    f"macro-F1 at 0.5 {base.get('macro_f1', math.nan):.4f}, samples-F1 {metrics['samples_f1']:.4f}, "
                    f"Hamming loss {metrics['hamming_loss']:.4f}. Per-label thresholds, tuned on the validation split "
                    f"and stored with the model (thresholds.json): "
                    + ", ".join(f"{lab} {t:.3f}" for lab, t in (metrics.get("thresholds") or {}).items()) + "."]
    if "entity_micro_f1" in metrics:  # task token: accuracy above is per word, macro-F1 the entity macro-F1
        out += ["", *ner_summary(metrics), "", "Span errors per entity type (test split):", "",
                _table(["type", *SPAN_ERRORS], span_error_rows(metrics))]
    cm = metrics.get("confusion_matrix")
    if cm:
        cm, shown, note = confusion_subset(cm, labels)
        out += ["", f"Confusion matrix (rows: actual, columns: predicted){note}:", "",
                _table(["", *shown], [[lab, *row] for lab, row in zip(shown, cm)])]
    return out


def tested(metrics: dict[str, Any]) -> str:
    """What the test split holds: texts, and words for task token (whose accuracy is per word)."""
    return f"{int(metrics.get('n', 0))} texts" + (f", {metrics['words']} words" if "words" in metrics else "")


SPAN_ERRORS = ["correct", "missed", "wrong_type", "wrong_boundary", "spurious"]


def ner_summary(metrics: dict[str, Any]) -> list[str]:
    """task token: the entity scores in one sentence (the card)."""
    precision, recall = metrics.get("entity_micro_precision", math.nan), metrics.get("entity_micro_recall", math.nan)
    line = (f"NER: entity micro-F1 **{metrics['entity_micro_f1']:.4f}** (precision {precision:.4f}, recall "
            f"{recall:.4f}), entity macro-F1 {metrics['entity_macro_f1']:.4f}, token accuracy "
            f"{metrics['token_accuracy']:.4f} over {metrics.get('words', '?')} words, {metrics.get('entities', '?')} "
            f"entities; exact span and type (seqeval). The per-class table above is per entity type.")
    return [line]


def span_error_rows(metrics: dict[str, Any]) -> list[list[Any]]:
    return [[t, *[row.get(k, 0) for k in SPAN_ERRORS]] for t, row in (metrics.get("span_errors") or {}).items()]


def _limitations(metrics: dict[str, Any], validation: dict[str, Any], max_length: Any,
                 token_stats: dict[str, Any] | None) -> list[str]:
    lo, hi = accuracy_interval(float(metrics["accuracy"]), int(metrics.get("words", metrics.get("n", 0))))
    counts = validation.get("class_counts") or {}
    total = sum(counts.values())
    limits = [f"Texts longer than {max_length} tokens are cut to their first {max_length} tokens."]
    if token_stats and "test" in token_stats:
        t = token_stats["test"]
        limits[0] += f" ({t.get('truncated', 0)} of {t.get('rows', '?')} test texts were.)"
    if counts:
        big = max(counts, key=counts.get)
        limits.append(f"The classes are not balanced: `{big}` is {counts[big] / total:.1%} of the data, so "
                      f"always answering `{big}` already scores {counts[big] / total:.3f} accuracy.")
    per_class = metrics.get("per_class") or {}
    if per_class:
        weak = min(per_class, key=lambda lab: per_class[lab]["f1"])
        limits.append(f"Weakest class: `{weak}` (F1 {per_class[weak]['f1']:.3f}, recall "
                      f"{per_class[weak]['recall']:.3f}).")
    limits.append(f"The test split has {tested(metrics)}: the accuracy is known to about ±{(hi - lo) / 2:.3f}.")
    limits.append(calibration_sentence(float(metrics.get("ece", math.nan))))
    limits.append("It learns whatever biases its training texts and the pretrained base model carry.")
    return limits


def _how_to_load(name: str, uri: str) -> list[str]:
    # only registry-verified paths: plain MLflow loading runs the artifact store's code file before any check
    return ["", "## How to load it", "",
            "`finetune predict`, `finetune serve` and `finetune.registry.loading.load_verified(uri, tracking_uri)` "
            "first check every file against the sha256 digests recorded in the registry and refuse a modified one "
            "before any of its code runs (set `MLFLOW_TRACKING_URI` to the registry).", "",
            "```sh",
            f"finetune predict --model {uri} \"some text\"",
            f"finetune serve --model {uri} --host 127.0.0.1 --port 8080   # or models:/{name}@champion",
            "```", "",
            "```python",
            "from finetune.registry.loading import load_verified",
            f"model = load_verified(\"{uri}\", tracking_uri)",
            "model.predict([\"some text\"])                                    # -> [label]",
            "model.predict([\"some text\"], params={\"probabilities\": True})  # -> [{label, probabilities}]",
            "```", "",
            "`mlflow models serve` and `mlflow.pyfunc.load_model` load the artifact store's copy unverified (its "
            "code file runs before any check): not recommended, see docs/serving.md.", ""]
