"""NER data as validate sees it: the tag rules each sentence must pass (reported with the file's lines), the
sentences converted to IOB2 with the input's scheme recorded, and the stratum each sentence is split by."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pandas as pd

from finetune.common.token_files import TaggedSentence
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
