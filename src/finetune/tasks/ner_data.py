"""NER data as validate sees it: the tag rules each sentence must pass (reported with the file's lines), the
sentences converted to IOB2 with the input's scheme recorded, and the stratum each sentence is split by."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pandas as pd

from finetune.common.token_files import TaggedSentence
from finetune.common.tokens import SPLITS
from finetune.tasks.ner_tags import check_sentence, detect_scheme, entity_types, split_tag, to_iob2

NO_ENTITY = "(none)"


@dataclass
class TaggedData:
    scheme: str  # the input's scheme: bio, iob1 or iobes
    frame: pd.DataFrame  # tokens, tags (IOB2), line, text
    types: list[str]
    failures: list[dict] = field(default_factory=list)  # one per broken rule: rule, lines, message


def _group(violations: list[tuple[str, int, str]], path: str, max_examples: int) -> list[dict]:
    """One failure per rule: every line that broke it, and the first message as the example."""
    by_rule: dict[str, list[tuple[int, str]]] = {}
    for rule, line, message in violations:
        by_rule.setdefault(rule, []).append((line, message))
    return [{"rule": rule, "lines": [line for line, _ in hits], "count": len(hits),
             "message": f"{path}: line {hits[0][0]}: rule '{rule}': {hits[0][1]}"
                        + (f" (and {len(hits) - 1} more, e.g. lines {[h[0] for h in hits[1:max_examples]]})"
                           if len(hits) > 1 else "")}
            for rule, hits in by_rule.items()]


def check_tagged(sentences: list[TaggedSentence], path: str, scheme: str = "auto", types: list[str] | None = None,
                 max_examples: int = 5) -> TaggedData:
    """Apply every tag rule; convert passing data to IOB2. ``types``: the allowed entity types (None: any)."""
    scheme = detect_scheme([s.tags for s in sentences], scheme)
    violations = []
    for i, s in enumerate(sentences):
        for v in check_sentence(s.tags, s.tokens, scheme, types, i):
            line = s.lines[v.token] if 0 <= v.token < len(s.lines) else s.line
            violations.append((v.rule, line, v.message))
    frame = pd.DataFrame({"tokens": [s.tokens for s in sentences],
                          "tags": [to_iob2(s.tags, scheme) if not violations else s.tags for s in sentences],
                          "line": [s.line for s in sentences], "text": [" ".join(s.tokens) for s in sentences]})
    if any(s.split is not None for s in sentences):  # the user's split column (JSONL/Parquet)
        frame["split"] = [s.split for s in sentences]
    return TaggedData(scheme, frame, entity_types(list(frame["tags"])), _group(violations, path, max_examples))


def strata(tag_lists: list[list[str]]) -> list[str]:
    """What each sentence is stratified by: the rarest entity type it holds (rarest over all sentences), or
    NO_ENTITY. Rare types thus spread over train/val/test instead of landing by chance in one split."""
    present = [{split_tag(t)[1] for t in tags if t != "O"} for tags in tag_lists]
    freq = Counter(t for types in present for t in types)
    return [min(types, key=lambda t: (freq[t], t)) if types else NO_ENTITY for types in present]


def type_counts(tag_lists: list[list[str]]) -> dict[str, int]:
    """Entities per type (IOB2 tags)."""
    return dict(sorted(Counter(split_tag(t)[1] for tags in tag_lists for t in tags if t.startswith("B-")).items()))


def _rule(rule: str, ok: bool, message: str, lines: list[int] | None = None, max_examples: int = 5) -> dict:
    lines = lines or []
    return {"rule": rule, "column": "tags", "success": ok, "source": "finetune", "message": message,
            "unexpected_count": len(lines), "examples": [{"row": n, "value": None} for n in lines[:max_examples]]}


def _duplicate_rules(frame: pd.DataFrame, duplicates: str, path: str,
                     max_examples: int) -> tuple[pd.DataFrame, list[dict]]:
    """Repeated sentences: with duplicates: drop, the first occurrence is kept, also when a repeat carries other
    tags (annotators disagreeing on a retweet: WNUT-2016 has 28 such lines), and both are reported; with
    duplicates: fail, either is refused."""
    tag_key = frame["tags"].map(" ".join)
    conflict = list(frame["line"][tag_key.groupby(frame["text"]).transform("nunique").gt(1)])
    repeated = frame[frame["text"].duplicated()]
    fail = duplicates == "fail"
    rules = [_rule("duplicate_text_conflicting_labels", not (fail and conflict),
                   f"{path}: {len(conflict)} line(s) repeat a sentence with other tags, e.g. lines "
                   f"{conflict[:max_examples]}" + ("" if fail else "; the first tagging is kept")
                   if conflict else "no sentence carries two taggings", conflict, max_examples),
             _rule("duplicates", not (fail and len(repeated)),
                   f"{path}: {len(repeated)} repeated sentence(s), e.g. lines {list(repeated['line'][:max_examples])}"
                   + (" (validate.duplicates: fail)" if fail else ": dropped"), list(repeated["line"]), max_examples)]
    return frame.drop(repeated.index), rules


def _split_rules(frame: pd.DataFrame, path: str, max_examples: int) -> list[dict]:
    """A user-given split: each value train, val or test, and no sentence in two splits (leakage), checked before
    repeats are dropped."""
    bad = frame[~frame["split"].isin(SPLITS)]
    leak = list(frame["line"][frame["split"].groupby(frame["text"]).transform("nunique").gt(1)])
    first = f"line {bad['line'].iloc[0]}: split {bad['split'].iloc[0]!r}" if len(bad) else ""
    return [_rule("split_values", bad.empty, f"{path}: {first} is not one of {list(SPLITS)} ({len(bad)} row(s))"
                  if len(bad) else "every split value is train, val or test", list(bad["line"]), max_examples),
            _rule("text_in_one_split", not leak, f"{path}: lines {leak[:max_examples]}: the same sentence in more "
                  f"than one split (train/test leakage)" if leak else "every sentence is in one split only", leak,
                  max_examples)]


def given_splits(frame: pd.DataFrame, path: str, column: str) -> tuple[dict[str, pd.DataFrame] | None, list[dict]]:
    """The splits a JSONL/Parquet file's split column gives (values checked by check_frame), and the rule that each
    is not empty; (None, []) when the file has no such column (validate then splits, seeded and stratified)."""
    if "split" not in frame.columns:
        return None, []
    splits = {s: frame[frame["split"] == s].drop(columns="split") for s in SPLITS}
    empty = [s for s, f in splits.items() if f.empty]
    return splits, [_rule("splits_not_empty", not empty, f"{path}: no sentence in split(s) {empty} of column "
                          f"'{column}'" if empty else f"train, val and test from column '{column}'")]


def check_frame(data: TaggedData, path: str, duplicates: str, max_examples: int = 5) -> tuple[pd.DataFrame, list]:
    """Every rule of a tagged file as validate's report rules, and the de-duplicated frame (columns text, label =
    the IOB2 tag list, tokens, line). Failing rules carry their file and lines in the message."""
    rules = [_rule(f["rule"], False, f["message"], f["lines"], max_examples) for f in data.failures]
    if rules:
        return data.frame, rules
    rules.append(_rule("tag_scheme", True, f"tag scheme {data.scheme.upper()}, converted to IOB2"))
    if "split" in data.frame.columns:
        rules += _split_rules(data.frame, path, max_examples)
        if not all(r["success"] for r in rules):
            return data.frame, rules
    frame, dup_rules = _duplicate_rules(data.frame, duplicates, path, max_examples)
    frame = frame.assign(label=frame["tags"]).drop(columns="tags")
    return frame, rules + dup_rules
