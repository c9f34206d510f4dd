"""The fp32 and int8 pyfunc models of a token (NER) model: entity records with character offsets into the
ORIGINAL text on tricky strings, ONNX/PyTorch parity, and MLflow's scoring server (what `mlflow models serve`
runs) answering those records."""

from __future__ import annotations

import json
import math

import mlflow.pyfunc
import pytest
from mlflow.pyfunc.scoring_server import invocations

from conftest import NER_MAX_LENGTH

TAGGED = math.exp(4) / (math.exp(4) + 4)  # the tagging model's probability of its tag (conftest)
LONG = " ".join(["filler"] * 30) + "  met   Zoë"
# (text, [(entity text, type)]): emoji, composed and decomposed accents, repeated spaces, tabs and newlines,
# upper case, empty, longer than max_length
TRICKY = [
    ("😀  Hi   José  from São   Paulo!! ❤️", [("José", "PER"), ("São   Paulo", "LOC")]),
    ("Jose\u0301 went to Sa\u0303o Paulo", [("Jose\u0301", "PER"), ("Sa\u0303o Paulo", "LOC")]),
    ("\tzoe\n\nmet  JOSÉ\t\t in  sao\tpaulo ", [("zoe", "PER"), ("JOSÉ", "PER"), ("sao\tpaulo", "LOC")]),
    ("👍🏽Zoë👍🏽", [("Zoë", "PER")]),
    ("", []),
    (LONG, [("Zoë", "PER")]),
]


def expected(text: str, entities: list[tuple[str, str]]) -> list[tuple[str, str, int, int]]:
    out, at = [], 0
    for ent, typ in entities:
        at = text.index(ent, at)
        out.append((ent, typ, at, at + len(ent)))
        at += len(ent)
    return out


def spans(record: dict) -> list[tuple[str, str, int, int]]:
    return [(e["text"], e["type"], e["start"], e["end"]) for e in record["entities"]]


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
