"""Integration: a decoder base (tiny random Llama, tokenizer without a pad token) through every stage of the real
`dvc repro` with LoRA ([auto] targets) and packed batches, then `finetune predict` from the registry in fp32 and
int8. Toy reviews that end on their sentiment word (the head reads the last token), so 100 steps learn them."""

from __future__ import annotations

import json

import pytest

from conftest import ENV, copy_repo, set_params, sh, toy_frame

pytestmark = pytest.mark.integration
MODEL = "rt-decoder"


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_llama_dir):
    root = copy_repo(tmp_path_factory.mktemp("decoder-project"))
    (root / "data").mkdir(exist_ok=True)
    frame = toy_frame(60)
    frame["text"] = ["#" + t.rsplit(" #", 1)[1] + " " + t.rsplit(" #", 1)[0] for t in frame["text"]]
    frame.to_csv(root / "data" / "reviews.csv", index=False)
    sh(["dvc", "add", "-q", "data"], root)
    set_params(root, model={"base": str(tiny_llama_dir)}, validate={"val_fraction": 0.2, "test_fraction": 0.2},
               tokenize={"max_length": 24},
               train={"max_steps": 100, "batch_size": 8, "learning_rate": 2e-2, "checkpoint_every": 0, "threads": 2,
                      "pack_tokens": 128, "lora": {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0,
                                                   "target_modules": ["auto"]}},
               register={"model_name": MODEL, "floor": 0.0}, compress={"latency_requests": 10})
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "fixture"], root)
    sh(["dvc", "repro"], root)
    return root


def test_decoder_runs_every_stage_registers_and_predicts_in_fp32_and_int8(project):
    out = project / "out"
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["pad_token_id"] == 2  # </s>: the tokenizer shipped no pad token
    assert not (out / "model" / "adapter_config.json").exists()  # adapters merged: loads without peft
    summary = json.loads((out / "train" / "summary.json").read_text())
    assert summary["packed"] and 0 < summary["trainable_parameters"] < summary["parameters"]
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert metrics["accuracy"] >= 0.7, metrics  # learned: the toy classes are separable, chance is 0.5
    gate = json.loads((out / "compress" / "metrics.json").read_text())
    assert gate["exported"], gate["message"]
    assert gate["variants"]["onnx_fp32"]["label_agreement"] == 1.0
    reg = json.loads((out / "register" / "registration.json").read_text())
    assert reg["alias"] == "champion" and reg["version"] == "1"
    assert reg["int8"]["registered"] is gate["int8_passed"], (reg["int8"], gate["message"])
    texts = ["#1 a wonderful film", "#2 a dull mess", "#3 brilliant and beautiful", "#4 boring and far too long"]
    direct = _labels_of(out / "model", texts)  # the trained folder itself, read with transformers alone
    assert sorted(set(direct)) == ["fresh", "rotten"], direct
    got = {}
    for name in [MODEL] + ([f"{MODEL}-int8"] if gate["int8_passed"] else []):
        proc = sh(["finetune", "predict", "--model", f"models:/{name}@champion", *texts], project, env=ENV)
        got[name] = [json.loads(line)["label"] for line in proc.stdout.splitlines() if line.strip()]
    assert got[MODEL] == direct, (got, direct)  # the registered, verified fp32 model is the trained one
    if gate["int8_passed"]:
        assert sum(a == b for a, b in zip(got[f"{MODEL}-int8"], direct)) >= 3, got


def _labels_of(folder, texts):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    enc = AutoTokenizer.from_pretrained(str(folder))(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return [model.config.id2label[int(i)] for i in model(**enc).logits.argmax(1)]
