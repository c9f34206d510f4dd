"""Multi-label monitoring on a tiny random multi-label BERT: the reference profile of its test texts (sigmoid
probabilities, decisions at the model's thresholds.json, per-label rates), a held-out-like batch that is quiet, a
labelled batch of one label only that fires the per-label rate test, another task's labels refused; and the
vectorised bootstrap agreeing with the task's own scores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import NEGATIVE, POSITIVE
from finetune.common.monitor_config import MonitorConfig
from finetune.monitoring.drift import compare_profiles
from finetune.monitoring.profiling import encoder_from_folder, load_reference, profile_texts, reference_profile
from finetune.monitoring.tasks import TASKS, MonitorInputError
from finetune.tasks import multi_label as ml

LABELS = ["action", "comedy", "drama"]
RATES = [0.4, 0.3, 0.5]
CFG = MonitorConfig(permutations=199, bootstrap=300)


def batch(n: int, seed: int) -> tuple[list[str], list[str]]:
    """Review-like texts and their labels, each label present at its rate (CSV style: "action|drama")."""
    rng = np.random.default_rng(seed)
    pool = POSITIVE + NEGATIVE
    texts = [f"{pool[rng.integers(len(pool))]}, {pool[rng.integers(len(pool))]}" for _ in range(n)]
    labels = ["|".join(lab for lab, r in zip(LABELS, RATES) if rng.random() < r) for _ in range(n)]
    return texts, labels


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    import torch
    from transformers import AutoModelForSequenceClassification

    out = tmp_path_factory.mktemp("ml-monitor") / "model"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_model_dir), num_labels=3, problem_type="multi_label_classification",
        id2label=dict(enumerate(LABELS)), label2id={lab: i for i, lab in enumerate(LABELS)})
    model.save_pretrained(out, safe_serialization=True)
    encoder = encoder_from_folder(tiny_model_dir, 16)
    encoder.tokenizer.save_pretrained(out)
    (out / ml.THRESHOLDS_FILE).write_text(json.dumps({"labels": LABELS, "thresholds": [0.45, 0.5, 0.55]}))
    texts, labels = batch(300, seed=0)
    joined = [lab.replace("|", ml.JOIN) for lab in labels]  # as the splits store them
    folder = reference_profile(out, texts, joined, 16, 2000, out.parent / "profile", task_name="multi_label")
    doc, emb = load_reference(folder)
    return encoder_from_folder(out, 16, "multi_label"), doc, emb


def test_the_reference_holds_per_label_rates_at_the_models_thresholds(reference):
    encoder, doc, _ = reference
    assert doc["task"] == "multi_label" and doc["thresholds"] == [0.45, 0.5, 0.55] == encoder.thresholds
    assert len(doc["predicted_counts"]) == 3 and sum(doc["predicted_set_sizes"]) == doc["n"] == 300
    assert 0.3 < doc["label_counts"][0] / 300 < 0.5 and set(doc["metrics"]) == {"micro_f1", "macro_f1"}


def test_held_out_batch_is_quiet_and_a_batch_of_one_label_drifts(reference):
    encoder, doc, emb = reference
    task = TASKS["multi_label"]
    texts, labels = batch(200, seed=1)
    ids = task.label_ids(labels, encoder.labels, "held-out", list(range(1, 201)))
    quiet = compare_profiles(doc, emb, profile_texts(encoder, texts, ids, doc["bigram_table"]), CFG)
    assert {"rates:predicted_labels", "chi2:predicted_label_set_size", "rates:true_labels"} <= {
        t["test"] for t in quiet["tests"]}
    assert not quiet["drift"], quiet["fired"]
    one = task.label_ids(["drama"] * 200, encoder.labels, "one-label", list(range(1, 201)))
    fired = compare_profiles(doc, emb, profile_texts(encoder, texts, one, doc["bigram_table"]), CFG)
    rates = next(t for t in fired["tests"] if t["test"] == "rates:true_labels")
    assert rates["drifted"] and rates["labels_shifted"] == ["action", "comedy", "drama"], rates


def test_another_tasks_labels_are_refused_naming_the_row(reference):
    encoder, _, _ = reference
    with pytest.raises(MonitorInputError, match=r"batch.csv: row 3: label \['PER'\] is not one of the model's"):
        TASKS["multi_label"].label_ids(["action", "drama|comedy", "PER|action"], encoder.labels, "batch.csv",
                                       [1, 2, 3])


def test_the_vectorised_bootstrap_scores_agree_with_the_tasks_scores():
    rng = np.random.default_rng(0)
    y, probs = (rng.random((150, 4)) < 0.3).astype(np.int64), rng.random((150, 4))
    task = TASKS["multi_label"]
    once = task.resampled_scores(y, task.predicted(probs), 4, np.arange(150)[None, :])
    expected = task.score(y, probs, list("abcd"))
    assert once["micro_f1"][0] == pytest.approx(expected["micro_f1"], abs=1e-6)
    assert once["macro_f1"][0] == pytest.approx(expected["macro_f1"], abs=1e-6)
