"""NER monitoring on the hand-set tagging model (tests/conftest.py: it tags jose/zoe as PER and sao paulo as LOC,
everything else O, exactly): the reference profile of tagged sentences (per-type entity rates, entities per text,
tag distribution, entity micro-F1), a held-out-like batch that is quiet, batches of another entity mix that drift
with the test that fired named, mislabelled feedback caught by the bootstrap, another task's labels refused."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import NER_MAX_LENGTH
from finetune.common.monitor_config import MonitorConfig
from finetune.monitoring.batch import read_batch
from finetune.monitoring.drift import compare_profiles
from finetune.monitoring.profiling import encoder_from_folder, load_reference, profile_texts, reference_profile
from finetune.monitoring.tasks import TASKS, MonitorInputError

CFG = MonitorConfig(permutations=199, bootstrap=300)
FILLERS = ["met", "in", "went", "to", "the", "park", "and", "city", "with", "friends"]
ENTITIES = {"PER": [["jose"], ["zoe"]], "LOC": [["sao", "paulo"]]}


def sentences(n: int, seed: int, mix: dict[str, float]) -> tuple[list[str], list[list[str]]]:
    """Tagged sentences of filler words with, per type, an entity present at its rate in ``mix`` (a second one
    of the same type at half that rate): texts as validate stores them (tokens joined by spaces) and IOB2 tags."""
    rng = np.random.default_rng(seed)
    texts, tags = [], []
    for _ in range(n):
        words = [[(None, w)] for w in rng.choice(FILLERS, size=int(rng.integers(3, 8)))]
        for typ, rate in mix.items():
            for r in (rate, rate / 2):
                if rng.random() < r:
                    ent = ENTITIES[typ][int(rng.integers(len(ENTITIES[typ])))]
                    words.insert(int(rng.integers(len(words) + 1)), [(typ, w) for w in ent])
        toks = [w for item in words for _, w in item]
        tg = ["O" if typ is None else f"{'B' if j == 0 else 'I'}-{typ}" for item in words
              for j, (typ, _) in enumerate(item)]
        texts.append(" ".join(toks))
        tags.append(tg)
    return texts, tags


MIX = {"PER": 0.6, "LOC": 0.5}


@pytest.fixture(scope="module")
def reference(tagging_model_dir, tmp_path_factory):
    texts, tags = sentences(300, seed=0, mix=MIX)
    folder = reference_profile(tagging_model_dir, texts, tags, NER_MAX_LENGTH, 2000,
                               tmp_path_factory.mktemp("ner-monitor") / "profile", task_name="token")
    doc, emb = load_reference(folder)
    return encoder_from_folder(tagging_model_dir, NER_MAX_LENGTH, "token"), doc, emb


def test_the_reference_holds_entity_rates_tag_counts_and_the_exact_f1(reference):
    _, doc, emb = reference
    assert doc["task"] == "token" and doc["metrics"] == {"entity_micro_f1": 1.0}  # the model tags exactly
    ents = doc["predicted_entities"]
    assert ents["types"] == ["LOC", "PER"] and ents == doc["true_entities"]
    assert 0.55 < ents["texts_with_type"][0] / 300 < 0.75 and sum(ents["entity_count_hist"]) == 300
    assert len(doc["predicted_counts"]) == 5 and doc["predicted_counts"][0] > sum(doc["predicted_counts"][1:])
    assert emb.shape == (300, 8) and len(doc["features"]["entity_count"]) == 300


def _profile(encoder, doc, texts, tags=None):
    ids = TASKS["token"].label_ids(tags, encoder.labels, "batch", list(range(1, len(tags) + 1))) if tags else None
    return profile_texts(encoder, texts, ids, doc["bigram_table"])


def test_held_out_batch_is_quiet_and_other_entity_mixes_drift(reference, tmp_path):
    encoder, doc, emb = reference
    texts, tags = sentences(200, seed=1, mix=MIX)
    conll = tmp_path / "feedback.conll"  # labelled feedback in a format validate reads
    conll.write_text("\n\n".join("\n".join(f"{w}\t{t}" for w, t in zip(x.split(" "), y)) for x, y in
                                 zip(texts, tags)) + "\n", encoding="utf-8")
    read_texts, read_tags, rows, seen = read_batch(conll, "text", "label", 10_000)
    assert (read_texts, read_tags, seen) == (texts, tags, 200) and rows[1] == len(tags[0]) + 2
    quiet = compare_profiles(doc, emb, _profile(encoder, doc, texts, tags), CFG)
    assert {"rates:predicted_entity_types", "chi2:predicted_entity_count", "chi2:predicted_tags",
            "rates:true_entity_types", "bootstrap:entity_micro_f1"} <= {t["test"] for t in quiet["tests"]}
    assert not quiet["drift"], quiet["fired"]
    raw = [t.replace("jose", "José,") for t in sentences(200, seed=2, mix={"PER": 0.6})[0]]
    persons = compare_profiles(doc, emb, _profile(encoder, doc, raw), CFG)  # raw texts: no LOC entity at all
    rates = next(t for t in persons["tests"] if t["test"] == "rates:predicted_entity_types")
    assert rates["drifted"] and rates["labels_shifted"] == ["LOC"] and rates["entities_per_text"]["LOC"] == 0
    none = compare_profiles(doc, emb, _profile(encoder, doc, sentences(200, seed=3, mix={})[0]), CFG)
    assert {"chi2:predicted_entity_count", "chi2:predicted_tags"} <= set(none["fired"]), none["fired"]


def test_mislabelled_feedback_fires_the_entity_f1_bootstrap(reference):
    encoder, doc, emb = reference
    texts, tags = sentences(200, seed=4, mix=MIX)
    swapped = [[t.replace("PER", "LOC") for t in row] if i % 2 else row for i, row in enumerate(tags)]
    result = compare_profiles(doc, emb, _profile(encoder, doc, texts, swapped), CFG)
    f1 = next(t for t in result["tests"] if t["test"] == "bootstrap:entity_micro_f1")
    assert f1["drifted"] and f1["interval"][1] < 0.9 and f1["reference"] == 1.0, f1


def test_another_tasks_labels_are_refused_naming_the_row(reference, tmp_path):
    encoder, _, _ = reference
    reviews = tmp_path / "reviews.csv"  # a single-label batch: its labels are not tag lists
    reviews.write_text("text,label\nzoe met jose,positive\nthe park,negative\n", encoding="utf-8")
    _, labels, rows, _ = read_batch(reviews, "text", "label", 100)
    with pytest.raises(MonitorInputError, match=r"reviews.csv: row 1: label 'positive' is not one of the model's"):
        TASKS["token"].label_ids(labels, encoder.labels, str(reviews), rows)
    tagged = tmp_path / "tagged.conll"  # and a tagged batch against a single-label version
    tagged.write_text("zoe\tB-PER\nmet\tO\n\nsao\tB-LOC\n", encoding="utf-8")
    _, labels, rows, _ = read_batch(tagged, "text", "label", 100)
    with pytest.raises(MonitorInputError, match=r"tagged.conll: row 1: label \"\['B-PER', 'O'\]\" is not one of"):
        TASKS["single_label"].label_ids(labels, ["negative", "positive"], str(tagged), rows)
    broken = tmp_path / "broken.conll"  # a token line without its tag: validate's rule, file and line named
    broken.write_text("zoe\tB-PER\nmet\n", encoding="utf-8")
    with pytest.raises(MonitorInputError, match=r"broken.conll: line 2 has no tag column"):
        read_batch(broken, "text", "label", 100)
    with pytest.raises(MonitorInputError, match=r"batch.csv: row 2: label 'positive' is not one of the model's tags"):
        TASKS["token"].label_ids([["O", "B-PER"], "positive"], encoder.labels, "batch.csv", [1, 2])
    with pytest.raises(MonitorInputError, match=r"row 1: label 'B-ORG' is not one of the model's tags"):
        TASKS["token"].label_ids([["O", "B-ORG"]], encoder.labels, "batch.jsonl", [1])


def test_the_vectorised_bootstrap_agrees_with_seqeval():
    rng = np.random.default_rng(0)
    names = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    y = rng.choice(5, size=(120, 9), p=[0.6, 0.1, 0.1, 0.1, 0.1])
    probs = rng.random((120, 9, 5))
    y[:, 7:] = -100  # padding: not words
    probs[:, 7:] = 0
    task = TASKS["token"]
    once = task.resampled_scores(y, task.predicted(probs), 5, np.arange(120)[None, :])
    assert once["entity_micro_f1"][0] == pytest.approx(task.score(y, probs, names)["entity_micro_f1"], abs=1e-6)
