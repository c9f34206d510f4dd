"""The token task (NER): one tag per word. Softmax over the IOB2 tags at each word's first sub-token (the other
sub-tokens are -100: ignored by the loss and the scores); entity-level micro-F1 (seqeval's exact span and type)
is the primary metric; predictions are entities with character offsets (tasks/ner_align.py).

Label names are the IOB2 tags, "O" first, then B-/I- of each entity type in sorted order (``tag_names``).
Packing (``train.pack_tokens``) is refused: the packed head reads one token per sequence, not every token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from finetune.common.tokens import TokenizedSplit
from finetune.tasks import ner_decode, single_label
from finetune.tasks.ner_align import IGNORE, align
from finetune.tasks.ner_data import strata, type_counts
from finetune.tasks.ner_metrics import entity_scores, span_errors
from finetune.tasks.ner_tags import spans

NAME = "token"
PROBLEM_TYPE = "single_label_classification"  # softmax per token; transformers' token head reads no other type
LORA_TASK_TYPE = "TOKEN_CLS"
AUTO_MODEL = "AutoModelForTokenClassification"
PYFUNC_CODE = (ner_decode.__file__,)  # the pyfunc models import it: words, windows, entities with offsets
INPUT = "tagged_tokens"  # validate reads CoNLL text or token/tag lists (stages/validate.py validate_tagged)
GATE_METRICS = ("entity_micro_f1", "entity_macro_f1", "token_accuracy")
SELECT_METRICS = ("val_loss", "val_entity_micro_f1")


def tag_names(types: Sequence[str]) -> list[str]:
    return ["O"] + [f"{p}-{t}" for t in sorted(types) for p in ("B", "I")]


def class_balance(splits: dict[str, pd.DataFrame], label_names: list[str]) -> dict[str, Any]:
    """Entities per type in each split and overall, each type's share, and the rarest type."""
    per_split = {name: type_counts(list(f["label"])) for name, f in splits.items()}
    types = sorted({t for counts in per_split.values() for t in counts})
    total = {t: sum(c.get(t, 0) for c in per_split.values()) for t in types}
    n = sum(total.values()) or 1
    shares = {t: round(c / n, 6) for t, c in total.items()}
    # the majority-class baseline at word level: tagging every word O (token accuracy = the test split's O share;
    # it finds no entity, so every entity score is 0)
    test_tags = [t for tags in splits["test"]["label"] for t in tags] if "test" in splits else []
    o_share = sum(t == "O" for t in test_tags) / len(test_tags) if test_tags else 0.0
    return {"entities": total, "per_split": per_split, "shares": shares, "majority": "O",
            "minority": min(types, key=lambda t: (shares[t], t)) if types else None,
            "baseline": {"accuracy": round(o_share, 6), "macro_f1": 0.0, "token_accuracy": round(o_share, 6),
                         "entity_micro_f1": 0.0, "entity_macro_f1": 0.0}}


def balance_warnings(balance: dict[str, Any], min_fraction: float) -> list[str]:
    rare = [t for t, share in balance["shares"].items() if share < min_fraction]
    return [f"entity type '{t}' holds {balance['shares'][t]:.1%} of the entities, under validate.min_class_fraction "
            f"({min_fraction:.1%}): expect a low F1 for it" for t in rare]


def floor_warning(balance: dict[str, Any] | None, floor: float, metric: str) -> str | None:
    """None: a model that tags nothing scores entity F1 0, so any floor above 0 beats the trivial baseline."""
    return None if floor > 0 else f"register.floor = {floor}: a model that finds no entity scores {metric} 0"


def label_counts(values: pd.Series) -> pd.Series:
    """Entities per type in a column of IOB2 tag lists."""
    return pd.Series(type_counts(list(values)), dtype="int64")


def prepare_labels(df: pd.DataFrame, column: str, separator: str, cfg: Any) -> tuple[pd.DataFrame, list[dict], list]:
    """Not used: validate reads token-tagged files with validate_tagged (INPUT), whose tag rules replace these."""
    return df, [], list(cfg.labels)


def split_rows(df: pd.DataFrame, cfg: Any) -> dict[str, pd.DataFrame]:
    """single-label's seeded split, stratified by each sentence's rarest entity type (column label: tag lists)."""
    by_type = single_label.split_rows(df.rename(columns={"label": "tags"}).assign(label=strata(list(df["label"]))), cfg)
    return {s: f.drop(columns="label").rename(columns={"tags": "label"}) for s, f in by_type.items()}


def read_labels(values: pd.Series, separator: str) -> pd.Series:
    """The tag column: a list of tags per row (already checked and converted to IOB2 by validate)."""
    return values.map(lambda v: [str(t) for t in (v.tolist() if isinstance(v, np.ndarray) else v)])


def encode_labels(values: Sequence, label_names: list[str]) -> np.ndarray:
    """Per-sub-token tag ids, rows padded with -100 to the longest: shape (rows, longest)."""
    rows = [list(v) for v in values]
    out = np.full((len(rows), max((len(r) for r in rows), default=0)), IGNORE, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def encode_rows(texts: list[str], labels: list, label_names: list[str], tok,
                max_length: int) -> tuple[TokenizedSplit, dict[str, int]]:
    """tokenize for this task: each text's words (validate stores them joined by single spaces; a token never
    holds whitespace) aligned to sub-tokens, tag ids on first sub-tokens; and the truncation counts."""
    index = {name: i for i, name in enumerate(label_names)}
    words = [t.split(" ") for t in texts]
    tag_ids = [[index[tag] for tag in (row.tolist() if isinstance(row, np.ndarray) else row)] for row in labels]
    aligned, cut = align(words, tag_ids, label_names, tok, max_length)
    lengths = np.array([len(a.ids) for a in aligned], dtype=np.int64)
    offsets = np.zeros(len(aligned) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter((t for a in aligned for t in a.ids), dtype=np.int32, count=int(offsets[-1]))
    return TokenizedSplit(ids, offsets, encode_labels([a.labels for a in aligned], label_names)), vars(cut)


def refused_regime(cfg: Any) -> str | None:
    if getattr(cfg, "pack_tokens", 0):
        return ("train.pack_tokens is not supported for task: token (the packed head reads one token per "
                "sequence); set it to 0")
    return None


def loss_weights(spec: str | list[float], train_labels: np.ndarray, label_names: list[str]) -> torch.Tensor | None:
    """Per-tag weights of the cross-entropy: none, balanced (inverse tag frequency over the trained positions,
    scaled to mean 1), or an explicit list in tag order."""
    if spec == "none":
        return None
    if isinstance(spec, list):
        return torch.tensor(spec, dtype=torch.float32)
    counts = np.bincount(train_labels[train_labels != IGNORE].ravel(), minlength=len(label_names)).astype(float)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(label_names), 0.0)
    return torch.tensor(w / w[w > 0].mean(), dtype=torch.float32)


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy summed over each row's mean across its trained tokens, so that the loop's division by the
    step's rows gives the mean per sentence; rows with no trained token add nothing."""
    width = logits.shape[1]  # the batch may be padded wider or narrower than the stored label rows
    labels = torch.nn.functional.pad(labels[:, :width], (0, max(0, width - labels.shape[1])), value=IGNORE)
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, weight=weight,
                                                  ignore_index=IGNORE, reduction="none")
    counted = (labels != IGNORE).sum(dim=1)
    return (per_token.sum(dim=1) / counted.clamp(min=1)).sum()


def probabilities(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def word_tags(labels: np.ndarray, probs: np.ndarray, label_names: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """True and predicted IOB2 tags of each row's words (the positions whose label is not -100)."""
    true, pred = [], []
    for lab, p in zip(labels, probs):
        n = min(len(lab), len(p))
        keep = lab[:n] != IGNORE
        true.append([label_names[t] for t in lab[:n][keep]])
        pred.append([label_names[t] for t in p[:n][keep].argmax(axis=-1)])
    return true, pred


def _token_nll(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-likelihood of the true tag over the scored positions."""
    n = min(probs.shape[1], labels.shape[1])
    lab = labels[:, :n]
    mask = lab != IGNORE
    picked = np.take_along_axis(probs[:, :n], np.where(mask, lab, 0)[..., None], axis=-1)[..., 0]
    return float(-np.log(np.clip(picked[mask], 1e-12, None)).mean()) if mask.any() else 0.0


def _generic_names(k: int) -> list[str]:
    # tag_names' layout (O, then B-/I- per type) is all entity scores need: the type names do not change them
    return ["O"] + [f"{'B' if i % 2 else 'I'}-T{(i - 1) // 2}" for i in range(1, k)]


def validation_scores(logits: np.ndarray, labels: np.ndarray,
                      label_names: list[str] | None = None) -> dict[str, float]:
    probs = probabilities(logits)
    s = entity_scores(*word_tags(labels, probs, label_names or _generic_names(probs.shape[-1])))
    return {"val_loss": round(_token_nll(labels, probs), 6), "val_entity_micro_f1": s["entity_micro_f1"], "val_accuracy": s["token_accuracy"],
            "val_macro_f1": s["entity_macro_f1"]}


def scores(y_true: np.ndarray, probs: np.ndarray, label_names: list[str], bins: int,
           thresholds: np.ndarray | None = None) -> tuple[dict, list]:
    """The metrics dict: entity micro/macro F1 and per type (``per_class``), token accuracy, the span-error
    table, the mean loss over the scored tokens; no calibration rows (per-token calibration is not reported)."""
    true, pred = word_tags(y_true, probs, label_names)
    s = entity_scores(true, pred)
    loss = _token_nll(y_true, probs)
    metrics = {k: v for k, v in s.items() if k != "per_type"}
    word_true, word_probs = _scored_words(y_true, probs)
    word_metrics, calib = single_label.classification_metrics(word_true, word_probs, label_names, bins)
    # accuracy / macro_f1 under the names the card, report, gate (min_macro_f1) and compare read: token accuracy
    # and entity macro-F1; ece: the calibration of each word's tag probability
    metrics.update({"per_class": s["per_type"], "labels": sorted(s["per_type"]), "n": len(y_true),
                    "loss": round(loss, 6), "accuracy": s["token_accuracy"], "macro_f1": s["entity_macro_f1"],
                    "ece": word_metrics["ece"], "words": len(word_true), "span_errors": span_errors(true, pred)})
    return metrics, calib


def _scored_words(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The true tag id and the tag probabilities of every scored position (each word's first sub-token)."""
    n = min(labels.shape[1], probs.shape[1]) if len(labels) else 0
    mask = labels[:, :n] != IGNORE
    return labels[:, :n][mask], probs[:, :n][mask]


def agreement(probs: np.ndarray, reference: np.ndarray, y_true: np.ndarray, label_names: list[str]) -> float:
    """The share of words (first sub-tokens) given the same tag by ``probs`` and ``reference``."""
    _, a = _scored_words(y_true, probs)
    _, b = _scored_words(y_true, reference)
    return float((a.argmax(-1) == b.argmax(-1)).mean()) if len(a) else 1.0


def sentence_records(split: TokenizedSplit, probs: np.ndarray, label_names: list[str], tok) -> list[dict[str, Any]]:
    """Per test sentence: its words, true and predicted tags, and the true and predicted entities (type, words
    [start, end) and their text) for evaluate's predictions.jsonl."""
    true, pred = word_tags(split.labels, probs, label_names)
    out = []
    for w, t, p in zip(split_words(split, tok), true, pred):
        ents = {k: [{"type": typ, "start": a, "end": b, "text": " ".join(w[a:b])} for typ, a, b in spans(tags)]
                for k, tags in (("true_entities", t), ("predicted_entities", p))}
        out.append({"words": w, "true": t, "predicted": p, **ents})
    return out


def split_words(split: TokenizedSplit, tok) -> list[list[str]]:
    """Each sentence's words as the tokenizer reads them back (its first sub-token and the ones after it): the
    test split keeps ids, not strings, so an uncased model gives lower-cased words and unknown characters
    its unknown token."""
    special = set(tok.all_special_ids) - {tok.unk_token_id}  # [CLS]/[SEP]/padding; an unknown word stays [UNK]
    out = []
    for i in range(len(split)):
        ids, starts = split.sequence(i), np.flatnonzero(split.labels[i][:split.lengths[i]] != IGNORE)
        bounds = [*starts[1:], len(ids)]
        out.append([tok.convert_tokens_to_string(tok.convert_ids_to_tokens(
            [int(t) for t in ids[a:b] if int(t) not in special])) for a, b in zip(starts, bounds)])
    return out


def decide(probs: np.ndarray, label_names: list[str], thresholds: np.ndarray | None = None) -> list:
    """Per row, the IOB2 tag of each position (argmax). Entities with character offsets need the text and the
    tokenizer: see ner_align.decode_entities, which predict and serving use for this task."""
    return [[label_names[t] for t in row.argmax(axis=-1)] for row in probs]


# ---- decisions and curves: argmax per word needs no stored thresholds; no per-text curves ----

CURVE_AXES = ("recall", "precision", "ap", "average_precision")  # unused: curves() returns none for this task


def decision_files(val_logits: Any, val_labels: np.ndarray | None, label_names: list[str]) -> dict[str, Any]:
    return {}


def read_thresholds(model_dir: Any, label_names: list[str]) -> None:
    return None


def curves(y_true: np.ndarray, probs: np.ndarray, labels: list[str], max_points: int = 1000,
           curves_for: Any = None) -> dict[str, dict[str, Any]]:
    return {}


def predicted_word_tags(text: str, entities: Sequence[dict]) -> list[str]:
    """IOB2 tags of ``text``'s words (validate's: single spaces between them) from predicted entities with
    character offsets: a word inside an entity's span takes its type, B- on the first."""
    starts = np.cumsum([0] + [len(w) + 1 for w in text.split(" ")[:-1]])
    tags = ["O"] * len(starts)
    for e in sorted(entities, key=lambda e: e["start"]):
        inside = [i for i, s0 in enumerate(starts) if e["start"] <= s0 < e["end"]]
        for n, i in enumerate(inside):
            tags[i] = f"{'I' if n else 'B'}-{e['type']}"
    return tags


def score_decisions(metric: str, texts: Sequence[str], y_true: Sequence, predictions: Sequence,
                    labels: Sequence[str]) -> float:
    """``metric`` (entity micro/macro-F1, token accuracy: seqeval, as evaluate) of a pyfunc's entity records on
    validate's texts against their true tag lists: how register re-scores a champion on new test data."""
    pred = [predicted_word_tags(t, p["entities"]) for t, p in zip(texts, predictions)]
    return float(entity_scores([list(t) for t in y_true], pred)[metric])

