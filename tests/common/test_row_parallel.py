"""The ONNX session compress measures and the ONNX pyfunc models serve with: a batch's rows spread over
single-threaded calls must give exactly what one call on the whole batch gives."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

from finetune.common.row_parallel import RowParallelSession, available_cpus, balanced_groups
from finetune.stages.compress import export_onnx


def whole_batch(path, feed):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]


def right_padded_feed(rows: int, width: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, size=(rows, width), dtype=np.int64)
    lengths = rng.integers(2, width + 1, size=rows)
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


@pytest.mark.parametrize("threads", [2, 3])
def test_rows_spread_over_calls_give_the_whole_batchs_logits_in_row_order(tmp_path, tiny_classifier_dir, threads):
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_classifier_dir))
    export_onnx(model, tmp_path / "m.onnx", 17, "tiny")
    feed = right_padded_feed(7, 12, model.config.vocab_size)
    session = RowParallelSession(tmp_path / "m.onnx", threads)
    got = session(feed)
    assert session.pool is not None and session.threads == threads
    np.testing.assert_allclose(got, whole_batch(tmp_path / "m.onnx", feed), atol=1e-5)
    # row order: each row answers for itself, the same as alone
    np.testing.assert_allclose(got[4], session({k: v[4:5] for k, v in feed.items()})[0], atol=1e-5)
    assert session.session.get_session_options().intra_op_num_threads == 1


def test_per_token_outputs_keep_their_shape(tmp_path, tagging_model_dir):
    model = AutoModelForTokenClassification.from_pretrained(str(tagging_model_dir))
    export_onnx(model, tmp_path / "t.onnx", 17, "tagging")
    feed = right_padded_feed(5, 9, model.config.vocab_size, seed=1)
    got = RowParallelSession(tmp_path / "t.onnx", 2)(feed)
    assert got.shape == (5, 9, model.config.num_labels)
    real = feed["attention_mask"].astype(bool)  # padding positions: whatever the call computed there, or zeros
    np.testing.assert_allclose(got[real], whole_batch(tmp_path / "t.onnx", feed)[real], atol=1e-5)


def test_rows_are_grouped_by_length_and_each_group_cut_to_its_longest():
    lengths = np.array([5, 50, 12, 30, 8, 45, 20, 22])
    groups = balanced_groups(lengths, 2)
    assert [sorted(lengths[g].tolist()) for g in groups] == [[30, 45, 50], [5, 8, 12, 20, 22]]
    assert max(len(g) * lengths[g].max() for g in groups) == 150  # one call on all: 8 x 50 = 400
    assert sorted(np.concatenate(groups).tolist()) == list(range(8))  # every row once
    assert [len(g) for g in balanced_groups(lengths, 3)] == [2, 3, 3]
    assert [g.tolist() for g in balanced_groups(np.array([7]), 2)] == [[0]]


def test_one_thread_runs_on_the_callers_thread(tmp_path, tiny_classifier_dir):
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_classifier_dir))
    export_onnx(model, tmp_path / "m.onnx", 17, "tiny")
    session = RowParallelSession(tmp_path / "m.onnx", 1)
    feed = right_padded_feed(3, 6, model.config.vocab_size)
    assert session.pool is None
    np.testing.assert_allclose(session(feed), whole_batch(tmp_path / "m.onnx", feed), atol=1e-5)


@pytest.mark.parametrize("quota, want", [("150000 100000", 2), ("100000 100000", 1), ("50000 100000", 1)])
def test_a_containers_cpu_quota_bounds_the_threads(tmp_path, quota, want):
    (tmp_path / "cpu.max").write_text(quota + "\n")  # cgroup v2
    assert available_cpus(str(tmp_path)) == min(want, len(os.sched_getaffinity(0)))
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text(quota.split()[0] + "\n")
    (v1 / "cpu.cfs_period_us").write_text(quota.split()[1] + "\n")
    assert available_cpus(str(tmp_path / "v1")) == min(want, len(os.sched_getaffinity(0)))


def test_without_a_quota_the_schedulable_cpus_count(tmp_path):
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(str(tmp_path)) == len(os.sched_getaffinity(0))
    assert available_cpus(str(tmp_path / "absent")) == len(os.sched_getaffinity(0))
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(str(tmp_path / "v1")) == len(os.sched_getaffinity(0))
