"""The token task's contract functions on hand-made arrays: labels, loss, validation and test scores, refusals."""

import numpy as np
import pytest
import torch

from finetune.tasks import token
from finetune.tasks.ner_metrics import entity_scores

NAMES = token.tag_names(["PER", "LOC"])


def logits_for(tag_ids):
    out = np.full((len(tag_ids), max(map(len, tag_ids)), len(NAMES)), -5.0)
    for i, row in enumerate(tag_ids):
        for j, t in enumerate(row):
            out[i, j, t] = 5.0
    return out


def test_tag_names_layout_and_labels_padded_with_ignore():
    assert NAMES == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    got = token.encode_labels([[-100, 3, 4, -100], [0]], NAMES)
    assert got.tolist() == [[-100, 3, 4, -100], [0, -100, -100, -100]]


def test_loss_ignores_minus_100_and_averages_per_sentence():
    logits = torch.randn(2, 3, len(NAMES))
    labels = torch.tensor([[-100, 1, 2], [-100, -100, -100]])
    want = torch.nn.functional.cross_entropy(logits[0, 1:], labels[0, 1:])
    assert token.loss_sum(logits, labels, None).item() == pytest.approx(want.item(), rel=1e-6)


def test_scores_read_only_first_subtokens_and_equal_seqeval():
    labels = np.array([[-100, 3, -100, 4, 0, -100], [-100, 1, 0, 1, -100, -100]])
    pred = [[0, 3, 0, 4, 0, 0], [0, 1, 0, 0, 0, 0]]  # second row misses its last LOC
    metrics, calib = token.scores(labels, token.probabilities(logits_for(pred)), NAMES, bins=10)
    want = entity_scores([["B-PER", "I-PER", "O"], ["B-LOC", "O", "B-LOC"]], [["B-PER", "I-PER", "O"],
                                                                               ["B-LOC", "O", "O"]])
    assert metrics["entity_micro_f1"] == want["entity_micro_f1"] == pytest.approx(0.8)
    assert metrics["per_class"]["LOC"]["recall"] == 0.5 and metrics["span_errors"]["LOC"]["missed"] == 1
    assert sum(r["count"] for r in calib) == metrics["words"] == 6 and 0 <= metrics["ece"] <= 1  # per scored word
    val = token.validation_scores(logits_for(pred), labels)  # without the names: the same entity F1
    assert val["val_entity_micro_f1"] == pytest.approx(0.8) and val["val_loss"] > 0


def test_packing_is_refused_in_one_line():
    class Cfg:
        pack_tokens = 4096
    assert "pack_tokens" in token.refused_regime(Cfg())
