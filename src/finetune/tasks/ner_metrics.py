"""NER scores: entity-level precision/recall/F1 with exact span and type (seqeval's definitions, computed by
seqeval), micro and macro and per type; token accuracy; and where each wrong entity went wrong."""

from __future__ import annotations

from seqeval.metrics import accuracy_score, classification_report

from finetune.tasks.ner_tags import spans

ERRORS = ("correct", "missed", "spurious", "wrong_type", "wrong_boundary")


def entity_scores(true_tags: list[list[str]], pred_tags: list[list[str]]) -> dict:
    """Micro and macro entity P/R/F1, per-type P/R/F1/support, and token (word) accuracy, on IOB2 tag lists."""
    report = classification_report(true_tags, pred_tags, output_dict=True, zero_division=0)
    per_type = {t: {"precision": round(float(r["precision"]), 6), "recall": round(float(r["recall"]), 6),
                    "f1": round(float(r["f1-score"]), 6), "support": int(r["support"])}
                for t, r in report.items() if not t.endswith(" avg")}
    micro, macro = report["micro avg"], report["macro avg"]
    return {"entity_micro_f1": round(float(micro["f1-score"]), 6),
            "entity_micro_precision": round(float(micro["precision"]), 6),
            "entity_micro_recall": round(float(micro["recall"]), 6),
            "entity_macro_f1": round(float(macro["f1-score"]), 6),
            "token_accuracy": round(float(accuracy_score(true_tags, pred_tags)), 6),
            "entities": int(micro["support"]), "per_type": per_type}


def _overlaps(a: tuple[str, int, int], b: tuple[str, int, int]) -> bool:
    return a[1] < b[2] and b[1] < a[2]


def _true_entity_outcome(entity: tuple[str, int, int], predicted: list[tuple[str, int, int]]) -> str:
    typ = entity[0]
    if entity in predicted:
        return "correct"
    touching = [p for p in predicted if _overlaps(p, entity)]
    if any(p[0] == typ for p in touching):
        return "wrong_boundary"  # the right type over another span
    return "wrong_type" if touching else "missed"  # another type over the same or an overlapping span


def span_errors(true_tags: list[list[str]], pred_tags: list[list[str]]) -> dict[str, dict[str, int]]:
    """Per entity type: its true entities found exactly (correct), not touched by any prediction (missed), touched
    only by another type (wrong_type), touched by its own type over another span (wrong_boundary); and predicted
    entities of that type touching no true entity (spurious)."""
    table: dict[str, dict[str, int]] = {}
    for true, pred in zip(true_tags, pred_tags):
        t_spans, p_spans = spans(true), spans(pred)
        for e in t_spans:
            table.setdefault(e[0], dict.fromkeys(ERRORS, 0))[_true_entity_outcome(e, p_spans)] += 1
        for p in p_spans:
            if not any(_overlaps(p, e) for e in t_spans):
                table.setdefault(p[0], dict.fromkeys(ERRORS, 0))["spurious"] += 1
    return dict(sorted(table.items()))
