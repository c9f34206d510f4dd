"""The order-aware text feature on real reviews, no model: word-shuffled reviews fire its PSI test, other reviews
of the same kind do not, and the stored table has a fixed size whatever the reference's."""

from __future__ import annotations

import random

import numpy as np

from finetune.common.monitor_config import MonitorConfig
from finetune.monitoring.drift import feature_tests
from finetune.monitoring.order import FEATURE, TABLE_BITS, bigram_seen_rates, reference_bigrams


def _shuffled(texts: list[str], seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.sample(t.split(), len(t.split()))) for t in texts]


def _order_test(reference: dict, texts: list[str], table: np.ndarray) -> dict:
    batch = {FEATURE: bigram_seen_rates(texts, table)}
    (test,) = feature_tests(reference, batch, MonitorConfig())  # the only feature both have
    return test


def test_shuffled_reviews_fire_the_bigram_test_and_held_out_reviews_do_not(real_reviews):
    texts = real_reviews["text"].tolist()
    rates, table = reference_bigrams(texts[:1200])
    reference = {FEATURE: rates}
    assert table.nbytes == TABLE_BITS // 8  # 128 KiB, bounded
    for seed in range(3):
        held_out = random.Random(seed).sample(texts[1200:], 300)
        quiet = _order_test(reference, held_out, table)
        assert quiet["test"] == f"psi:{FEATURE}" and not quiet["drifted"], quiet
        fired = _order_test(reference, _shuffled(held_out, seed), table)
        assert fired["drifted"] and fired["statistic"] > 5 * fired["threshold"], fired
        assert fired["batch_mean"] < 0.7 * fired["reference_mean"]


def test_reference_rates_are_leave_one_out_and_one_word_texts_count_as_seen():
    rates, table = reference_bigrams(["the film was great", "the film was dull", "nothing alike here", "ok"])
    assert rates.tolist() == [2 / 3, 2 / 3, 0.0, 1.0]  # "was great" / "was dull" are in one text only
    assert bigram_seen_rates(["great the film was", "fine", "film the"], table).tolist() == [2 / 3, 1.0, 0.0]
