"""The drift tests on constructed arrays: each fires on the shift it is for, stays quiet on same-distribution
samples, and the MMD permutation test keeps its stated false-alarm rate."""

from __future__ import annotations

import numpy as np

from finetune.common.monitor_config import MonitorConfig
from finetune.monitoring.drift import (
    compare_profiles,
    feature_tests,
    metric_tests,
    mmd_permutation,
    prediction_tests,
    psi,
)
from finetune.monitoring.profiling import Profile

LABELS = ["fresh", "rotten"]


def profile(rng: np.random.Generator, n: int, shift: float = 0.0, p_fresh: float = 0.55, labels=None) -> Profile:
    """A synthetic profile: lengths, token counts, embeddings and class probabilities drawn around fixed values;
    ``shift`` moves the embeddings' mean, ``p_fresh`` the share predicted fresh."""
    fresh = rng.random(n) < p_fresh
    conf = rng.uniform(0.6, 1.0, n)
    probs = np.where(fresh[:, None], np.c_[conf, 1 - conf], np.c_[1 - conf, conf])
    chars = rng.normal(110, 40, n).clip(5)
    features = {"char_length": chars, "token_count": (chars / 4.5).round(), "unk_rate": np.zeros(n),
                "truncated": (rng.random(n) < 0.01).astype(float), "confidence": probs.max(1),
                "entropy": -(probs * np.log(probs)).sum(1)}
    emb = (rng.normal(0, 1, (n, 16)) + shift).astype(np.float16)
    return Profile(features, probs, emb, labels)


def reference(rng: np.random.Generator, n: int = 400) -> tuple[dict, np.ndarray]:
    p = profile(rng, n, labels=None)
    doc = {"task": "single_label", "labels": LABELS, "n": n, "features": p.features,
           "predicted_counts": np.bincount(p.probs.argmax(1), minlength=2).tolist(),
           "metrics": {"accuracy": 0.85, "macro_f1": 0.84}}
    return doc, p.embeddings.astype(np.float32)


CFG = MonitorConfig(permutations=199, bootstrap=500)


def test_same_distribution_is_quiet_and_each_shift_fires_its_own_test():
    rng = np.random.default_rng(1)
    doc, emb = reference(rng)
    assert not compare_profiles(doc, emb, profile(rng, 300), CFG)["drift"]
    longer = profile(rng, 300)
    longer.features["char_length"] = longer.features["char_length"] * 2
    assert compare_profiles(doc, emb, longer, CFG)["fired"] == ["psi:char_length"]
    assert compare_profiles(doc, emb, profile(rng, 300, shift=0.5), CFG)["fired"] == ["mmd:embeddings"]
    one_class = compare_profiles(doc, emb, profile(rng, 300, p_fresh=0.0), CFG)["fired"]
    assert one_class == ["chi2:predicted_labels"]


def test_psi_is_near_zero_for_one_distribution_and_large_for_a_shift():
    rng = np.random.default_rng(0)
    ref = rng.normal(100, 30, 2000)
    assert psi(ref, rng.normal(100, 30, 500)) < 0.05
    assert psi(ref, rng.normal(160, 30, 500)) > 1.0
    assert psi(np.zeros(1000), np.ones(100)) > 1.0  # a 0/1 rate (truncation) gets two bins


def test_mmd_permutation_test_keeps_its_false_alarm_rate_and_finds_a_shift():
    """100 pairs of samples from one distribution: the share with p < 0.05 is what a valid test allows
    (Binomial(100, 0.05) exceeds 12 with probability < 0.1%)."""
    rng = np.random.default_rng(0)
    alarms = sum(mmd_permutation(rng.normal(0, 1, (60, 8)), rng.normal(0, 1, (60, 8)), 99, rng)[1] < 0.05
                 for _ in range(100))
    assert alarms <= 12
    _, p = mmd_permutation(rng.normal(0, 1, (60, 8)), rng.normal(0.6, 1, (60, 8)), 99, rng)
    assert p < 0.05


def test_flipped_labels_are_flagged_by_the_bootstrap_interval_and_true_ones_are_not():
    rng = np.random.default_rng(3)
    doc, _ = reference(rng)
    y = rng.integers(0, 2, 500)
    probs = np.where((rng.random(500) < 0.86)[:, None] == (y == 0)[:, None], [[0.9, 0.1]], [[0.1, 0.9]])
    batch = Profile({"confidence": probs.max(1)}, probs, np.zeros((500, 2), np.float16), y)
    assert not any(t["drifted"] for t in metric_tests(doc, batch, "single_label", CFG))
    flip = rng.choice(500, 150, replace=False)
    batch.labels = y.copy()
    batch.labels[flip] = 1 - batch.labels[flip]
    tests = metric_tests(doc, batch, "single_label", CFG)
    assert all(t["drifted"] for t in tests), tests
    assert tests[0]["interval"][1] < 0.85 - CFG.metric_drop


def test_a_confidence_drop_fires_without_a_label_shift():
    rng = np.random.default_rng(4)
    doc, _ = reference(rng)
    unsure = profile(rng, 300)
    unsure.probs = np.clip(unsure.probs, 0.35, 0.65) / np.clip(unsure.probs, 0.35, 0.65).sum(1, keepdims=True)
    unsure.features["confidence"] = unsure.probs.max(1)
    fired = [t["test"] for t in prediction_tests(doc, unsure, "single_label", CFG) if t["drifted"]]
    assert fired == ["drop:confidence"]


def test_a_rate_compares_equal_to_the_6_decimals_profile_json_stores():
    """Rates like 1/3 are stored as 0.333333: the same texts' unrounded rates must land in the same PSI bins."""
    rates = np.random.default_rng(5).choice([0.0, 1 / 3, 0.5, 2 / 3, 1.0], 1000)
    stored = {"unk_rate": np.round(rates, 6)}
    (test,) = feature_tests(stored, {"unk_rate": rates}, CFG)
    assert test["statistic"] < 1e-6 and not test["drifted"], test
