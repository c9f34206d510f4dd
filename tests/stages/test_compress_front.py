"""compress's front: students measured beside the teacher's variants, and the serving choice within the budget."""

from __future__ import annotations

import json
import shutil


from finetune.common.config import CompressConfig
from finetune.common.outputs import METRICS
from finetune.stages.compress import ServeBudget, choose_serving, compress, variant_file


def _v(accuracy, texts_per_s, p50=5.0):
    return {"accuracy": accuracy, "texts_per_s": texts_per_s, "latency_ms_p50": p50, "speedup": texts_per_s / 100}


FRONT = {"pytorch_fp32": _v(0.833, 100, 20.0), "onnx_fp32": _v(0.833, 130, 12.0), "onnx_int8": _v(0.834, 150, 8.0),
         "student_L3_onnx_int8": _v(0.826, 320, 4), "student_L2_onnx_int8": _v(0.81, 450, 3)}


def test_picks_the_cheapest_variant_within_the_accuracy_budget():
    choice = choose_serving(FRONT, ServeBudget(max_accuracy_drop=0.01))
    assert choice["variant"] == "student_L3_onnx_int8" and choice["file"] == "student_L3.int8.onnx"
    assert "within serve.max_accuracy_drop 0.01" in choice["reason"]
    assert choose_serving(FRONT, ServeBudget(max_accuracy_drop=0.05))["variant"] == "student_L2_onnx_int8"
    assert choose_serving(FRONT, ServeBudget(max_accuracy_drop=0.0))["variant"] == "onnx_int8"
    # a latency target removes the variants slower than it at batch 1
    assert choose_serving(FRONT, ServeBudget(0.01, max_latency_ms=10))["variant"] == "student_L3_onnx_int8"


def test_none_within_the_budget_serves_fp32_and_says_why():
    front = {k: (v if k == "pytorch_fp32" else {**v, "accuracy": 0.7}) for k, v in FRONT.items()}
    choice = choose_serving(front, ServeBudget(max_accuracy_drop=0.01))
    assert choice["variant"] == "pytorch_fp32" and choice["file"] is None
    assert choice["reason"].startswith("no variant within the budget, the fp32 model is served")
    assert "student_L3_onnx_int8: accuracy drop 0.1330 > serve.max_accuracy_drop 0.01" in choice["reason"]
    slow = choose_serving(FRONT, ServeBudget(1.0, max_latency_ms=1.0))
    assert slow["variant"] == "pytorch_fp32" and "onnx_int8: p50 8.0 ms > serve.max_latency_ms 1.0" in slow["reason"]


def test_variant_files():
    assert variant_file("onnx_int8") == "model.int8.onnx" and variant_file("onnx_fp32") == "model.onnx"
    assert variant_file("pruned_L2_onnx_fp32") == "pruned_L2.onnx"


def test_students_are_measured_on_the_same_split_and_their_files_digested(tiny_classifier_dir, toy_test, tmp_path):
    student = tmp_path / "student"
    shutil.copytree(tiny_classifier_dir, student)  # stands for a student folder: a classifier + distill.json
    (student / "distill.json").write_text(json.dumps({"alpha": 0.5, "made_by": "distilled: teacher layers [0]"}))
    test, meta = toy_test
    res = compress(tiny_classifier_dir, test, meta, CompressConfig(threads=1, latency_requests=3), tmp_path / "out",
                   students=[student], budget=ServeBudget(max_accuracy_drop=1.0))
    v = res.metrics["variants"]
    assert {"student_L1_onnx_fp32", "student_L1_onnx_int8"} <= set(v)
    assert v["student_L1_onnx_fp32"]["label_agreement"] == 1.0  # the same weights as the teacher here
    assert v["student_L1_onnx_int8"]["made_by"] == "distilled: teacher layers [0]; ONNX, dynamic int8"
    on_disk = json.loads((tmp_path / "out" / METRICS).read_text())
    assert {"student_L1.onnx", "student_L1.int8.onnx"} <= set(on_disk["files_sha256"])
    assert on_disk["serving"]["variant"] in v and on_disk["serving"]["variant"] != "pytorch_fp32"
    assert (tmp_path / "out" / on_disk["serving"]["file"]).is_file()


def test_the_choice_reads_the_tasks_primary_metric_and_never_a_variant_the_int8_gate_refused():
    """NER: token accuracy barely moves when int8 loses whole entities; the choice reads entity micro-F1 (the
    task's primary metric, the int8 gate's), and a variant the gate refused is never served."""
    front = {"pytorch_fp32": {"accuracy": 0.97, "entity_micro_f1": 0.96, "texts_per_s": 20.0, "latency_ms_p50": 9.0},
             "onnx_fp32": {"accuracy": 0.97, "entity_micro_f1": 0.96, "texts_per_s": 40.0, "latency_ms_p50": 5.0},
             "onnx_int8": {"accuracy": 0.965, "entity_micro_f1": 0.91, "texts_per_s": 90.0, "latency_ms_p50": 2.0}}
    assert choose_serving(front, ServeBudget(0.01))["variant"] == "onnx_int8"  # on token accuracy it would pass
    on_entities = choose_serving(front, ServeBudget(0.01), "entity_micro_f1")
    assert on_entities["variant"] == "onnx_fp32" and "its entity_micro_f1 drop 0.0000" in on_entities["reason"]
    none = choose_serving({k: v for k, v in front.items() if k != "onnx_fp32"}, ServeBudget(0.01), "entity_micro_f1")
    assert none["variant"] == "pytorch_fp32" and "onnx_int8: entity_micro_f1 drop 0.0500" in none["reason"]
    gated = choose_serving(front, ServeBudget(1.0), "entity_micro_f1", refused_by_gate=("onnx_int8",))
    assert gated["variant"] == "onnx_fp32"
    only_int8 = {k: v for k, v in front.items() if k != "onnx_fp32"}
    refused = choose_serving(only_int8, ServeBudget(1.0), "entity_micro_f1", refused_by_gate=("onnx_int8",))
    assert refused["variant"] == "pytorch_fp32" and "onnx_int8: refused by compress.max_accuracy_drop" in refused["reason"]
