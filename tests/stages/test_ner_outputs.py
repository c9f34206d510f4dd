"""task token's outputs downstream of training, on a tiny BERT trained on a learnable pattern: evaluate's files
(metrics, per-sentence predictions, plots), compress (ONNX token head, int8, parity on first sub-tokens), the
model card and report sections, and `finetune compare`'s NER rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from finetune.common.config import (
    CompressConfig,
    DataConfig,
    EvaluateConfig,
    TokenizeConfig,
    TrainConfig,
    ValidateConfig,
)
from finetune.stages.tokenize import tokenize
from finetune.stages.validate import validate_tagged

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_ner_stages import ner_file


@pytest.fixture(scope="module")
def ner_model(tmp_path_factory, tiny_model_dir):
    from finetune.stages.train import train

    tmp = tmp_path_factory.mktemp("ner-out")
    f = ner_file(tmp / "people.conll")
    valid = validate_tagged(f, DataConfig(path=str(f)), ValidateConfig(labels=[], val_fraction=0.15,
                                                                       test_fraction=0.15))
    toks, meta = tokenize(valid.splits, valid.labels, tiny_model_dir, TokenizeConfig(max_length=16), task="token")
    cfg = TrainConfig(epochs=4, batch_size=16, learning_rate=3e-3, warmup_ratio=0.0, checkpoint_every=0,
                      threads=2, eval_every=0)
    train(toks, meta, tiny_model_dir, cfg, tmp / "model")
    return tmp / "model", toks["test"], meta, valid.splits["test"]


def test_write_evaluation_writes_entity_metrics_sentences_and_plots(ner_model, tmp_path):
    from finetune.stages.evaluate import evaluate, write_evaluation

    model, test, meta, frame = ner_model
    result = evaluate(model, test, meta, EvaluateConfig())
    write_evaluation(result, tmp_path / "eval")
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["entity_micro_f1"] > 0.5 and m["macro_f1"] == m["entity_macro_f1"]
    assert set(m["per_class"]) == {"LOC", "PER"} and m["per_class"]["PER"]["support"] > 0
    errors = m["span_errors"]["LOC"]
    assert errors["correct"] + errors["missed"] + errors["wrong_type"] + errors["wrong_boundary"] \
        == m["per_class"]["LOC"]["support"]
    records = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == len(frame)
    # the words read back from the test ids are the test split's words (MiniLM's tokenizer lower-cases)
    assert [r["words"] for r in records] == [t.lower().split(" ") for t in frame["text"]]
    assert [r["true"] for r in records] == [list(tags) for tags in frame["label"]]
    first = records[0]
    assert first["true_entities"][0]["text"] == " ".join(first["words"][first["true_entities"][0]["start"]:
                                                                       first["true_entities"][0]["end"]])
    rows = (tmp_path / "eval" / "predictions.csv").read_text().splitlines()
    assert rows[0] == "sentence,word,actual,predicted" and len(rows) - 1 == m["words"]
    for png in ("roc.png", "confusion_matrix.png", "calibration.png"):  # dvc.yaml's evaluate outputs
        assert (tmp_path / "eval" / png).read_bytes()[:4] == b"\x89PNG"


def test_compress_exports_the_token_head_and_gates_int8_on_entity_f1(ner_model, tmp_path):
    import onnxruntime as ort

    from finetune.stages.compress import _batch, compress

    model, test, meta, _ = ner_model
    res = compress(model, test, meta, CompressConfig(threads=1, latency_requests=2, max_accuracy_drop=0.2),
                   tmp_path / "c")
    assert res.exported, res.message
    v = res.metrics["variants"]
    assert "entity_micro_f1" in res.message and res.metrics["parity_max_logit_diff"] < 1e-3
    assert v["onnx_fp32"]["label_agreement"] == 1.0 and "entity_micro_f1_delta" in v["onnx_int8"]
    assert v["onnx_int8"]["label_agreement"] > 0.9 and res.metrics["serving"]["variant"]
    ids, mask = _batch(test, np.arange(3), 0)
    out = ort.InferenceSession(str(res.files["onnx_int8"])).run(["logits"], {"input_ids": ids,
                                                                            "attention_mask": mask})[0]
    assert out.shape == (3, ids.shape[1], len(meta["labels"]))  # (batch, sequence, tags)


def test_card_report_and_compare_show_entity_scores():
    from finetune.registry.comparison import Side
    from finetune.reporting.model_card import model_card
    from finetune.reporting.report import ReportData, render_report
    from finetune.stages.compare import compare, format_comparison

    metrics = {"entity_micro_f1": 0.61, "entity_micro_precision": 0.6, "entity_micro_recall": 0.62,
               "entity_macro_f1": 0.55, "token_accuracy": 0.93, "accuracy": 0.93, "macro_f1": 0.55, "n": 40,
               "words": 300, "entities": 50, "loss": 0.3, "ece": 0.02, "labels": ["LOC", "PER"],
               "per_class": {"LOC": {"precision": 0.5, "recall": 0.6, "f1": 0.545, "support": 20},
                             "PER": {"precision": 0.7, "recall": 0.64, "f1": 0.669, "support": 30}},
               "span_errors": {"LOC": {"correct": 12, "missed": 5, "wrong_type": 1, "wrong_boundary": 2,
                                       "spurious": 7}}}
    card = model_card("ner", "1", metrics, None, {"model.base": "m"})
    assert "NER: entity micro-F1 **0.6100**" in card and "| LOC | 12 | 5 | 1 | 2 | 7 |" in card
    page = render_report(ReportData({"model_name": "ner", "version": "1"}, metrics, None, None, None, {},
                                    {"roc": b"png"}, ""))
    assert "<h3>Named entities</h3>" in page and "per-type F1 (exact span and type)" in page
    flat = {k: v for k, v in metrics.items() if isinstance(v, float)}
    c = compare(Side("champion v1", "r1", {**flat, "f1_LOC": 0.5}, {}, {}),
                Side("challenger v2", "r2", {**flat, "entity_micro_f1": 0.65, "f1_LOC": 0.6}, {}, {}))
    table = format_comparison(c)
    assert "| entity_micro_f1 | 0.6100 | 0.6500 | +0.0400 (better) |" in table and "| LOC | 0.5000 | 0.6000 |" in table


def _tagged_jsonl(path: Path, splits: list[str]) -> Path:
    rows = [{"tokens": [f"Ann{i}", "met", f"Rome{i}"], "tags": ["B-PER", "O", "B-LOC"], "split": s}
            for i, s in enumerate(splits)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_jsonl_split_column_is_read_and_bad_values_or_leaks_refused(tmp_path):
    from finetune.reporting.validation_summary import failure_message

    good = _tagged_jsonl(tmp_path / "good.jsonl", ["train"] * 6 + ["val", "test", "test"])
    result = validate_tagged(good, DataConfig(path=str(good)), ValidateConfig(labels=[]))
    assert result.ok and {s: len(f) for s, f in result.splits.items()} == {"train": 6, "val": 1, "test": 2}
    assert list(result.splits["val"]["text"]) == ["Ann6 met Rome6"] and "split" not in result.splits["val"]
    bad = _tagged_jsonl(tmp_path / "bad.jsonl", ["train", "train", "dev", "val", "test"])
    result = validate_tagged(bad, DataConfig(path=str(bad)), ValidateConfig(labels=[]))
    assert not result.ok and not result.splits
    assert f"{bad}: line 3: split 'dev' is not one of ['train', 'val', 'test']" in failure_message(result.report)
    leak = tmp_path / "leak.jsonl"
    leak.write_text(good.read_text() + json.dumps({"tokens": ["Ann0", "met", "Rome0"], "tags": ["B-PER", "O", "B-LOC"],
                                                   "split": "test"}) + "\n")
    result = validate_tagged(leak, DataConfig(path=str(leak)), ValidateConfig(labels=[]))
    assert not result.ok and "lines [1, 10]: the same sentence in more than one split" in \
        failure_message(result.report)
    empty = _tagged_jsonl(tmp_path / "noval.jsonl", ["train"] * 4 + ["test"])
    result = validate_tagged(empty, DataConfig(path=str(empty)), ValidateConfig(labels=[]))
    assert not result.ok and "no sentence in split(s) ['val']" in failure_message(result.report)


def test_a_token_head_is_registered_as_ner_not_as_a_single_label_classifier():
    from finetune.registry.gate import NER, TASK, kind_from_config

    config = {"problem_type": "single_label_classification", "id2label": {"1": "B-PER", "0": "O", "2": "I-PER"}}
    ner = kind_from_config({**config, "architectures": ["BertForTokenClassification"]})
    assert ner.task == NER == "token-classification/ner" and ner.labels == ("O", "B-PER", "I-PER")
    assert kind_from_config({**config, "architectures": ["BertForSequenceClassification"]}).task == TASK
