"""Entity scores equal seqeval's on hand-made cases; the span-error table sorts each wrong entity."""

import pytest

from finetune.tasks.ner_metrics import entity_scores, span_errors


def test_hand_made_case_scores_as_seqeval_defines_them():
    true = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    got = entity_scores(true, pred)
    # 2 true entities, 2 predicted, 1 exact: P = R = F1 = 0.5; MISC 0, PER 1: macro 0.5; 8 of 10 tags right
    assert got["entity_micro_f1"] == 0.5 and got["entity_micro_precision"] == 0.5 and got["entity_micro_recall"] == 0.5
    assert got["entity_macro_f1"] == 0.5 and got["token_accuracy"] == 0.8 and got["entities"] == 2
    assert got["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert got["per_type"]["MISC"]["f1"] == 0.0


def test_micro_differs_from_macro_when_types_differ_in_size():
    true = [["B-A", "O", "B-A", "O", "B-A", "O", "B-B"]]
    pred = [["B-A", "O", "B-A", "O", "B-A", "O", "O"]]
    got = entity_scores(true, pred)
    assert got["entity_micro_precision"] == 1.0 and got["entity_micro_recall"] == 0.75
    assert got["entity_micro_f1"] == pytest.approx(2 * 0.75 / 1.75, abs=1e-6)
    assert got["entity_macro_f1"] == 0.5  # A: 1.0, B: 0.0


def test_each_wrong_entity_is_sorted_into_one_kind_of_error():
    true = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG", "O", "O"]]
    pred = [["B-PER", "O", "O", "B-ORG", "O", "O", "O", "B-LOC"]]
    assert span_errors(true, pred) == {
        "LOC": {"correct": 0, "missed": 0, "spurious": 1, "wrong_type": 1, "wrong_boundary": 0},
        "ORG": {"correct": 0, "missed": 1, "spurious": 0, "wrong_type": 0, "wrong_boundary": 0},
        "PER": {"correct": 0, "missed": 0, "spurious": 0, "wrong_type": 0, "wrong_boundary": 1}}
