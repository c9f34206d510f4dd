"""`finetune predict` with a registered token (NER) model: one record per text with its entities, character
offsets into the text as read from the input file (tabs, newlines, emoji, accents, a text past max_length)."""

from __future__ import annotations

import json

from conftest import NER_MAX_LENGTH, TRICKY
from conftest import ner_expected as expected
from conftest import ner_spans as spans
from finetune.cli import main
from finetune.common.config import RegisterConfig
from finetune.registry.request import RegistrationRequest
from finetune.registry.transaction import register


def test_cli_predict_returns_entities_with_offsets_into_each_input_text(tmp_path, monkeypatch, tagging_model_dir,
                                                                       capsys):
    cfg = RegisterConfig(model_name="ner-predict", experiment="p", floor=0.0)
    reg = register(RegistrationRequest.for_model(tagging_model_dir, {"accuracy": 0.9, "macro_f1": 0.9}, cfg,
                                                 f"sqlite:///{tmp_path / 'mlflow.db'}", max_length=NER_MAX_LENGTH,
                                                 artifact_location=(tmp_path / "mlartifacts").as_uri()))
    assert reg.alias == "champion"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    texts = [t for t, _ in TRICKY]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    assert main(["predict", "--model", "models:/ner-predict@champion", "--input", "in.jsonl", "--output",
                 "p.jsonl", "--batch-size", "4"]) == 0
    out = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in out] == texts and all(set(r) == {"text", "entities", "windows"} for r in out)
    for (text, ents), record in zip(TRICKY, out):
        assert spans(record) == expected(text, ents), text
    assert out[-1]["windows"] > 1 and out[4] == {"text": "", "entities": [], "windows": 0}

    assert main(["predict", "--model", "models:/ner-predict/1", "met José"]) == 0  # TEXT arguments, stdout
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert spans(record) == [("José", "PER", 4, 8)]


def test_entity_records_score_like_seqeval_on_validates_words():
    """register re-scores a NER champion from its pyfunc's entity records: words of validate's text (single
    spaces) inside an entity's character span take its type; seqeval's exact span-and-type F1 on the result."""
    from finetune.registry.gate import NER, score_predictions
    from finetune.tasks.token import predicted_word_tags

    text = "met José in São Paulo today"
    record = {"entities": [{"text": "José", "type": "PER", "start": 4, "end": 8},
                           {"text": "São Paulo", "type": "LOC", "start": 12, "end": 21}]}
    assert predicted_word_tags(text, record["entities"]) == ["O", "B-PER", "O", "B-LOC", "I-LOC", "O"]
    truth = [["O", "B-PER", "O", "B-LOC", "I-LOC", "O"], ["B-PER", "O"]]
    # the second text's person is missed: 2 of 3 entities found, no spurious one -> P 1, R 2/3, F1 0.8
    preds = [record, {"entities": []}]
    assert score_predictions("entity_micro_f1", [text, "Zoë left"], truth, preds, [], NER) == 0.8
    cut = [{"entities": [{"text": "São", "type": "LOC", "start": 12, "end": 15}]}, {"entities": []}]
    assert score_predictions("entity_micro_f1", [text, "Zoë left"], truth, cut, [], NER) == 0.0  # a cut span


def test_a_ner_champion_on_other_test_data_is_rescored_from_its_entities(tmp_path, tagging_model_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = RegisterConfig(model_name="ner-rescore", experiment="p", floor=0.0, metric="entity_micro_f1",
                         min_macro_f1=0.0)

    def reg(value, test_hash, test=None):
        return register(RegistrationRequest.for_model(
            tagging_model_dir, {"accuracy": 0.9, "macro_f1": 0.9, "entity_micro_f1": value}, cfg, uri,
            max_length=NER_MAX_LENGTH, artifact_location=(tmp_path / "mlartifacts").as_uri(), test_hash=test_hash,
            test=test))

    assert reg(0.2, "old").alias == "champion"
    texts = ["met jose in sao paulo", "zoe left"]
    tags = [["O", "B-PER", "O", "B-LOC", "I-LOC"], ["B-PER", "O"]]  # the tagging model finds all three
    r = reg(0.5, "new", (texts, tags))
    assert r.champion_before["source"] == "re-scored on this run's test data"
    assert r.champion_before["value"] == 1.0 and r.alias == "challenger"  # 0.5 does not beat the re-scored 1.0
