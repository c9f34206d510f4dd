"""The model card's base-model section (issue 23): parameter count, trained parameters under LoRA, the base's
licence (a GGUF file's ``general.license``, a LICENSE file) and the pad token finetune chose for a decoder."""

from __future__ import annotations

import json

import torch

from conftest import make_tiny_decoder
from finetune.common.base_model import base_facts, license_of_base
from finetune.common.config import LoraConfig, TrainConfig
from finetune.common.tokens import load_tokenizer
from finetune.reporting.model_card import model_card
from finetune.training.model import build_model, exportable

METRICS = {"n": 20, "accuracy": 0.8, "macro_f1": 0.79, "labels": ["fresh", "rotten"],
           "per_class": {"fresh": {"precision": 0.8, "recall": 0.8, "f1": 0.8, "support": 10},
                         "rotten": {"precision": 0.8, "recall": 0.8, "f1": 0.8, "support": 10}}}


def test_card_states_parameters_trained_share_licence_and_the_pad_token_set_for_a_decoder(tmp_path):
    base = make_tiny_decoder(tmp_path / "llama", "llama")
    (base / "LICENSE").write_text("Apache License 2.0\n\nThe full text.\n")
    tok = load_tokenizer(base)
    model, _ = build_model(base, ["fresh", "rotten"], TrainConfig(lora=LoraConfig(enabled=True, target_modules=["auto"])),
                           torch.device("cpu"), tok.pad_token_id)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    folder = tmp_path / "model"
    merged = exportable(model)
    merged.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)  # as train saves it: the pad token it chose goes with the model
    summary = {"parameters": sum(p.numel() for p in merged.parameters()), "trainable_parameters": trainable}
    facts = base_facts(folder, str(base), summary)
    assert facts["license"] == "Apache License 2.0" and facts["architecture"] == "LlamaForSequenceClassification"
    assert facts["pad_token"] == "</s>" and facts["pad_token_id"] == tok.pad_token_id and facts["pad_token_set_by"]
    card = model_card("reviews", "1", METRICS, None, {"model.base": str(base)}, base=facts)
    section = card.split("## Base model", 1)[1].split("## Training", 1)[0]
    share = trainable / summary["parameters"]
    assert 0 < share < 0.5  # LoRA: adapters and the head only
    assert f"| parameters | {summary['parameters']:,} |" in section
    assert f"| trained parameters | {trainable:,} ({share:.2%}) |" in section
    assert "| licence of the base | Apache License 2.0 |" in section
    assert f"| pad token | `</s>` (id {tok.pad_token_id}), set by finetune (the tokenizer shipped none) |" in section


def test_licence_comes_from_a_gguf_files_metadata_without_dequantizing(tmp_path, monkeypatch):
    from gguf import GGUFWriter

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_string("general.license", "apache-2.0")
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    assert license_of_base(str(path)) == "apache-2.0"
    assert not (tmp_path / "cache").exists()  # read from the header: nothing dequantized or cached
    assert license_of_base(str(tmp_path / "missing.gguf")) is None
    card = model_card("reviews", "1", METRICS, None, {}, base={"base": "x", "license": None})
    assert "| licence of the base | not shipped with the base: check its source |" in card
    assert json.dumps(base_facts(tmp_path, "x"))  # a folder without config or tokenizer: facts still serialize
