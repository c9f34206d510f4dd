"""The drift tests: each compares the reference profile with a batch's and says whether it fired.

- text features: PSI on the reference's deciles (reported with the KS p-value);
- embeddings: MMD (RBF kernel, median bandwidth) with a permutation test: false-alarm rate ``alpha`` by design;
- predictions: chi-square of the predicted-label counts (with an effect-size floor) and the drop of the mean
  confidence;
- labels (when the batch has them): the task's metrics with a bootstrap interval against the version's test metrics.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

from finetune.common.monitor_config import MonitorConfig
from finetune.monitoring import ner
from finetune.monitoring.profiling import TEXT_FEATURES, Profile
from finetune.monitoring.tasks import task_of


def psi(reference: np.ndarray, batch: np.ndarray, bins: int = 10) -> float:
    """Population stability index over the reference's quantile bins (x <= edge; ties merged) plus one bin above
    the reference's maximum: a rate that is 0 throughout the reference still gets a bin for "more than 0"."""
    edges = np.unique(np.r_[np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]), reference.max()])
    ref = np.bincount(np.searchsorted(edges, reference, side="left"), minlength=len(edges) + 1) / len(reference)
    cur = np.bincount(np.searchsorted(edges, batch, side="left"), minlength=len(edges) + 1) / len(batch)
    ref, cur = np.clip(ref, 1e-4, None), np.clip(cur, 1e-4, None)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def feature_tests(reference: dict[str, np.ndarray], batch: dict[str, np.ndarray], cfg: MonitorConfig
                  ) -> list[dict[str, Any]]:
    out = []
    for name in (n for n in TEXT_FEATURES if n in reference and n in batch):  # older profiles lack some
        # profile.json stores 6 decimals: a batch's 1/3 must fall in the bin of the reference's 0.333333
        ref, cur = np.round(reference[name], 6), np.round(batch[name], 6)
        value = psi(ref, cur)
        ks = stats.ks_2samp(ref, cur)
        out.append({"test": f"psi:{name}", "kind": "text", "statistic": round(value, 6), "threshold":
                    cfg.psi_threshold, "ks_p_value": float(ks.pvalue), "reference_mean": float(ref.mean()),
                    "batch_mean": float(cur.mean()), "drifted": value > cfg.psi_threshold})
    return out


def mmd_permutation(x: np.ndarray, y: np.ndarray, permutations: int, rng: np.random.Generator
                    ) -> tuple[float, float]:
    """(MMD², permutation p-value) of two samples of embeddings, RBF kernel with the median-distance bandwidth."""
    z = np.vstack([x, y]).astype(np.float64)
    sq = (z * z).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0)
    bandwidth = np.median(d2[np.triu_indices(len(z), 1)]) or 1.0
    kernel = np.exp(-d2 / bandwidth).astype(np.float32)
    n = len(x)
    groups = np.zeros((len(z), permutations + 1), dtype=np.float32)
    groups[:n, 0] = 1
    for p in range(1, permutations + 1):
        groups[rng.permutation(len(z))[:n], p] = 1
    kg = kernel @ groups  # one matrix product for the observed split and every permutation
    total = kernel.sum(dtype=np.float64)
    xx = (groups * kg).sum(0, dtype=np.float64)
    xy = kg.sum(0, dtype=np.float64) - xx
    yy = total - xx - 2 * xy
    m = len(z) - n
    mmd2 = xx / n ** 2 + yy / m ** 2 - 2 * xy / (n * m)
    return float(mmd2[0]), float((1 + np.sum(mmd2[1:] >= mmd2[0])) / (permutations + 1))


def embedding_test(reference: np.ndarray, batch: np.ndarray, cfg: MonitorConfig) -> dict[str, Any]:
    rng = np.random.default_rng(cfg.seed)
    sample = batch[rng.permutation(len(batch))[:cfg.embedding_rows]]
    mmd2, p = mmd_permutation(reference.astype(np.float32), sample.astype(np.float32), cfg.permutations, rng)
    return {"test": "mmd:embeddings", "kind": "embedding", "statistic": round(mmd2, 8), "p_value": p,
            "threshold": cfg.alpha, "rows": [len(reference), len(sample)], "drifted": p < cfg.alpha}


def _chi2_shift(name: str, ref_counts: np.ndarray, cur_counts: np.ndarray, names: list, cfg: MonitorConfig
                ) -> dict[str, Any]:
    """Chi-square of two count vectors over the same categories, with a total-variation floor."""
    ref_counts, cur_counts = np.asarray(ref_counts, np.float64), np.asarray(cur_counts, np.float64)
    seen = (ref_counts + cur_counts) > 0
    p = float(stats.chi2_contingency(np.vstack([ref_counts[seen], cur_counts[seen]]))[1]) if seen.sum() > 1 else 1.0
    tvd = float(0.5 * np.abs(ref_counts / ref_counts.sum() - cur_counts / cur_counts.sum()).sum())
    shares = {str(lab): round(float(c / cur_counts.sum()), 6) for lab, c in zip(names, cur_counts)}
    return {"test": name, "kind": "prediction", "p_value": p, "statistic": round(tvd, 6), "threshold": cfg.alpha,
            "min_effect": cfg.min_label_shift, "batch_shares": shares,
            "drifted": p < cfg.alpha and tvd >= cfg.min_label_shift}


def label_rate_test(name: str, ref_positive: np.ndarray, ref_n: int, cur_positive: np.ndarray, cur_n: int,
                    labels: list[str], cfg: MonitorConfig) -> dict[str, Any]:
    """Multi-label: each label's rate (texts with it / texts) against the reference's, a 2x2 chi-square per label
    (Bonferroni over the labels) with a floor on the rate's change."""
    ps, diffs = [], []
    for ref_i, cur_i in zip(ref_positive, cur_positive):
        table = np.array([[ref_i, ref_n - ref_i], [cur_i, cur_n - cur_i]], dtype=np.float64)
        ps.append(float(stats.chi2_contingency(table)[1]) if (table.sum(0) > 0).all() else 1.0)
        diffs.append(cur_i / cur_n - ref_i / ref_n)
    ps = np.minimum(np.asarray(ps) * len(labels), 1.0)
    fired = (ps < cfg.alpha) & (np.abs(diffs) >= cfg.min_label_shift)
    return {"test": name, "kind": "prediction", "p_value": float(ps.min()), "statistic": round(float(np.abs(
            diffs).max()), 6), "threshold": cfg.alpha, "min_effect": cfg.min_label_shift,
            "batch_rates": {lab: round(float(c / cur_n), 6) for lab, c in zip(labels, cur_positive)},
            "labels_shifted": [lab for lab, f in zip(labels, fired) if f], "drifted": bool(fired.any())}


def _entity_rate_test(name: str, ref: dict[str, Any], cur: dict[str, Any], ref_n: int, cur_n: int,
                      cfg: MonitorConfig) -> dict[str, Any]:
    """Per entity type: the share of texts holding one of its entities, as the multi-label per-label rates; the
    entities per text of each type reported beside it."""
    test = label_rate_test(name, np.asarray(ref["texts_with_type"]), ref_n, np.asarray(cur["texts_with_type"]),
                           cur_n, ref["types"], cfg)
    return {**test, "entities_per_text": cur["entities_per_text"],
            "reference_entities_per_text": ref["entities_per_text"]}


def token_tests(ref_doc: dict[str, Any], batch: Profile, predicted: np.ndarray, cfg: MonitorConfig
                ) -> list[dict[str, Any]]:
    """NER: per-type entity rates, entities per text and the tag distribution (over words) of the predictions;
    with labels also the true per-type rates."""
    labels, n = ref_doc["labels"], len(batch)
    cur = ner.entity_summary(predicted, labels)
    ref = ref_doc["predicted_entities"]
    bins = [f"{i}" for i in range(ner.COUNT_BINS - 1)] + [f"{ner.COUNT_BINS - 1}+"]
    tests = [_entity_rate_test("rates:predicted_entity_types", ref, cur, ref_doc["n"], n, cfg),
             _chi2_shift("chi2:predicted_entity_count", ref["entity_count_hist"], cur["entity_count_hist"], bins,
                         cfg),
             _chi2_shift("chi2:predicted_tags", ref_doc["predicted_counts"],
                         task_of("token").counts(predicted, len(labels)), labels, cfg)]
    if batch.labels is not None and ref_doc.get("true_entities") is not None:
        tests.append(_entity_rate_test("rates:true_entity_types", ref_doc["true_entities"],
                                       ner.entity_summary(batch.labels, labels), ref_doc["n"], n, cfg))
    return tests


def prediction_tests(ref_doc: dict[str, Any], batch: Profile, task_name: str, cfg: MonitorConfig
                     ) -> list[dict[str, Any]]:
    task = task_of(task_name)
    labels = ref_doc["labels"]
    predicted = task.predicted(batch.probs, ref_doc.get("thresholds"))
    if task_name == "multi_label":
        sizes = np.bincount(predicted.sum(1), minlength=len(labels) + 1)
        tests = [label_rate_test("rates:predicted_labels", np.asarray(ref_doc["predicted_counts"]), ref_doc["n"],
                                 task.counts(predicted, len(labels)), len(batch), labels, cfg),
                 _chi2_shift("chi2:predicted_label_set_size", ref_doc["predicted_set_sizes"], sizes,
                             list(range(len(sizes))), cfg)]
        if batch.labels is not None and ref_doc.get("label_counts") is not None:
            tests.append(label_rate_test("rates:true_labels", np.asarray(ref_doc["label_counts"]), ref_doc["n"],
                                         batch.labels.sum(0), len(batch), labels, cfg))
    elif task_name == "token":
        tests = token_tests(ref_doc, batch, predicted, cfg)
    else:
        tests = [_chi2_shift("chi2:predicted_labels", ref_doc["predicted_counts"],
                             task.counts(predicted, len(labels)), labels, cfg)]
    ref_conf = float(ref_doc["features"]["confidence"].mean())
    drop = ref_conf - float(batch.features["confidence"].mean())
    return [*tests, {"test": "drop:confidence", "kind": "prediction", "statistic": round(drop, 6),
                     "threshold": cfg.confidence_drop, "reference_mean": ref_conf,
                     "drifted": drop > cfg.confidence_drop}]


def metric_tests(ref_doc: dict[str, Any], batch: Profile, task_name: str, cfg: MonitorConfig
                 ) -> list[dict[str, Any]]:
    """The task's metrics on the labelled batch, a 95% percentile bootstrap interval, against the test metrics."""
    task = task_of(task_name)
    labels = ref_doc["labels"]
    y_pred = task.predicted(batch.probs, ref_doc.get("thresholds"))
    rng = np.random.default_rng(cfg.seed)
    idx = rng.integers(0, len(batch), size=(cfg.bootstrap, len(batch)))
    resampled = task.resampled_scores(batch.labels, y_pred, len(labels), idx)
    observed = task.score(batch.labels, batch.probs, labels, ref_doc.get("thresholds"))
    out = []
    for name in task.metrics:
        low, high = np.quantile(resampled[name], [0.025, 0.975])
        ref = float(ref_doc["metrics"][name])
        out.append({"test": f"bootstrap:{name}", "kind": "metric", "statistic": round(observed[name], 6),
                    "interval": [round(float(low), 6), round(float(high), 6)], "reference": ref,
                    "threshold": cfg.metric_drop, "drifted": float(high) < ref - cfg.metric_drop})
    return out


def compare_profiles(ref_doc: dict[str, Any], ref_embeddings: np.ndarray, batch: Profile, cfg: MonitorConfig
            ) -> dict[str, Any]:
    """Every test's outcome, and whether any fired."""
    task = ref_doc["task"]
    tests = feature_tests(ref_doc["features"], batch.features, cfg)
    if len(batch.embeddings):  # a request log without texts has none
        tests.append(embedding_test(ref_embeddings, batch.embeddings, cfg))
    tests += prediction_tests(ref_doc, batch, task, cfg)
    if batch.labels is not None:
        tests += metric_tests(ref_doc, batch, task, cfg)
    fired = [t["test"] for t in tests if t["drifted"]]
    ran = {t["test"] for t in tests}
    skipped = [f"psi:{n}" for n in TEXT_FEATURES if f"psi:{n}" not in ran] + [
        "mmd:embeddings"] * ("mmd:embeddings" not in ran)  # what this batch or an older reference could not give
    return {"drift": bool(fired), "fired": fired, "rows": len(batch), "reference_rows": int(ref_doc["n"]),
            "labelled": batch.labels is not None, "tests": tests, "skipped": skipped}
