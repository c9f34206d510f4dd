"""The fp32 and int8 pyfunc models of a token (NER) model: entity records with character offsets into the
ORIGINAL text on tricky strings, ONNX/PyTorch parity, and MLflow's scoring server (what `mlflow models serve`
runs) answering those records."""

from __future__ import annotations

import json
import math

import mlflow.pyfunc
import pytest
from mlflow.pyfunc.scoring_server import invocations

from conftest import LONG, NER_MAX_LENGTH, TAGGED, TRICKY
from conftest import ner_expected as expected
from conftest import ner_spans as spans


@pytest.fixture(scope="module")
def models(ner_pyfunc_dirs):
    return {k: mlflow.pyfunc.load_model(str(v)) for k, v in ner_pyfunc_dirs.items()}


def test_fp32_entities_have_exact_offsets_into_the_original_text(models, base_model_dir):
    from transformers import AutoTokenizer

    texts = [t for t, _ in TRICKY]
    out = models["fp32"].predict(texts, params={"probabilities": True})
    for (text, ents), record in zip(TRICKY, out):
        assert spans(record) == expected(text, ents), text
        assert all(text[e["start"]:e["end"]] == e["text"] for e in record["entities"])
        assert all(e["score"] == round(TAGGED, 6) for e in record["entities"]), record
    pieces = len(AutoTokenizer.from_pretrained(str(base_model_dir))(LONG.split(), is_split_into_words=True,
                                                                      add_special_tokens=False)["input_ids"])
    per_window, stride = NER_MAX_LENGTH - 2, NER_MAX_LENGTH // 2  # [CLS] ... [SEP]; stride min(32, max_length / 2)
    assert [r["windows"] for r in out] == [1, 1, 1, 1, 0, 1 + math.ceil((pieces - per_window) / (per_window - stride))]
    assert out[-1]["windows"] >= 4


def test_int8_onnx_gives_the_entities_pytorch_gives(models):
    texts = [t for t, _ in TRICKY]
    fp32 = models["fp32"].predict(texts)
    int8 = models["int8"].predict(texts)
    assert [spans(r) for r in int8] == [spans(r) for r in fp32]
    assert [r["windows"] for r in int8] == [r["windows"] for r in fp32]
    assert all(abs(a["score"] - b["score"]) < 0.02 for r, q in zip(int8, fp32) for a, b in zip(r["entities"], q["entities"]))


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_mlflow_scoring_server_answers_the_entity_records(models, variant):
    """MLflow's /invocations handler as `mlflow models serve` runs it (parsing, the params schema, output
    serialization), called in-process: a served model process would cost ~15 s of test time more."""
    model = models[variant]
    text = TRICKY[0][0]
    answer = invocations(json.dumps({"inputs": [text], "params": {"probabilities": True}}), "application/json",
                         model, model.metadata.get_input_schema())
    assert answer.status == 200, answer.response
    (record,) = json.loads(answer.response)["predictions"]
    assert spans(record) == expected(text, TRICKY[0][1]) and record["windows"] == 1
