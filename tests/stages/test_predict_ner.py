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
