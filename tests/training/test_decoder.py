"""Decoder LLM bases (training/decoder.py): pooling position, LoRA targets per family, the merged export, packing,
the refusals and the dry run. Tiny random models of six families, built here (conftest.make_tiny_decoder)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import DECODER_FAMILIES, make_tiny_decoder, toy_frame
from finetune.common.coercion import ConfigError
from finetune.common.config import LoraConfig, TokenizeConfig, TrainConfig
from finetune.common.decoder_config import DecoderConfig
from finetune.common.tokens import load_tokenizer
from finetune.training.decoder import check_decoder_task, lora_targets
from finetune.training.decoder_resources import check_fits, footprint
from finetune.training.model import adapters_on_fp32_base, build_model, exportable, load_classifier
from finetune.training.packing import PackedClassifier, build_pack, pack_shape

CPU = torch.device("cpu")
LABELS = ["fresh", "rotten"]
TEXTS = ["a dull mess", "great acting and a moving story #7", "funny", "the worst film this year #12"]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    return {f: make_tiny_decoder(root / f, f, seed=i) for i, f in enumerate(DECODER_FAMILIES)}


def classifier(base, **train):
    tok = load_tokenizer(base)
    model, _ = build_model(base, LABELS, TrainConfig(**train), CPU, tok.pad_token_id)
    return model.eval(), tok


def batch(tok, side: str):
    tok.padding_side = side
    return tok(TEXTS, padding=True, return_tensors="pt")


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_head_reads_the_last_real_token_left_and_right_padded(families, family):
    model, tok = classifier(families[family])
    shipped = "<|endoftext|>" if family == "qwen2" else "</s>"  # others: none shipped, eos set
    assert tok.pad_token == shipped and model.config.pad_token_id == tok.pad_token_id < model.config.vocab_size
    singles = torch.cat([model(**tok(t, return_tensors="pt")).logits for t in TEXTS])
    with torch.no_grad():
        for side in ("right", "left"):
            enc = batch(tok, side)
            out = model(**enc, output_hidden_states=True)
            last = enc["attention_mask"].shape[1] - 1 - enc["attention_mask"].flip(1).argmax(1)  # rightmost real
            if side == "right":
                assert (last < enc["attention_mask"].shape[1] - 1).any()  # the batch really is padded
            per_position = model.score(out.hidden_states[-1])
            torch.testing.assert_close(out.logits, per_position[torch.arange(len(TEXTS)), last])
            if side == "right" or family != "gpt2":  # GPT-2's absolute positions shift under left padding
                torch.testing.assert_close(out.logits, singles.detach(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_lora_targets_per_family_with_the_head_trained_in_full(families, family):
    model, _ = classifier(families[family], lora=LoraConfig(enabled=True, target_modules=["auto"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = ["c_attn"] if family == "gpt2" else ["q_proj", "v_proj"]
    assert set(model.peft_config["default"].target_modules) == set(expected)
    assert any(".score." in n and "modules_to_save" in n for n in trainable)  # the whole head, not an adapter
    assert all("lora_" in n or ".score." in n for n in trainable)
    plain, _ = classifier(families[family])
    assert set(lora_targets(plain, ["all-linear"])) > set(expected)  # MLP layers too, never the head
    assert "score" not in lora_targets(plain, ["all-linear"])


def test_lora_names_missing_in_the_architecture_are_refused(families):
    with pytest.raises(ConfigError, match=r"target_modules = \['query', 'value'\]: model type 'llama' has no "
                                          r"module query, value .*q_proj.*use \[auto\]"):
        classifier(families["llama"], lora=LoraConfig(enabled=True))


def _adapted(base):
    """LoRA model with non-zero adapters and head (B starts at zero: merged == base otherwise)."""
    model, tok = classifier(base, lora=LoraConfig(enabled=True, target_modules=["auto"], dropout=0.0))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model, tok


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_export_gives_the_adapted_outputs_and_loads_without_peft(families, family, tmp_path):
    model, tok = _adapted(families[family])
    enc = batch(tok, "right")
    with torch.no_grad():
        adapted = model(**enc).logits
        moved = adapters_on_fp32_base(model, families[family], TrainConfig(
            lora=LoraConfig(enabled=True, target_modules=["auto"], dropout=0.0))).eval()
        torch.testing.assert_close(moved(**enc).logits, adapted)  # the path bf16 / 4-bit runs take on export
        merged = exportable(model)
        assert not any("lora" in n for n, _ in merged.named_parameters())
        merged.save_pretrained(tmp_path, safe_serialization=True)
        loaded = load_classifier(tmp_path).eval()
        assert type(loaded).__module__.startswith("transformers.") and loaded.config.pad_token_id == tok.pad_token_id
        torch.testing.assert_close(loaded(**enc).logits, adapted, atol=1e-5, rtol=1e-4)
    assert (adapted.argmax(1) == loaded(**enc).logits.argmax(1)).all()


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_packed_logits_equal_padded_logits(families, family):
    from finetune.stages.tokenize import tokenize

    base = families[family]
    model, tok = classifier(base)
    toks, _ = tokenize({s: toy_frame(4) for s in ("train", "val", "test")}, LABELS, base, TokenizeConfig(max_length=24))
    split = toks["train"]
    shape = pack_shape(split, 64)
    idx = np.arange(5)
    arrays = build_pack(split, idx, shape, tok.pad_token_id)
    packed = PackedClassifier(model, shape).eval()
    with torch.no_grad():
        got = packed(*(torch.from_numpy(arrays[k]) for k in ("input_ids", "position_ids", "cu_seqlens", "starts")))
        packed.release("sdpa")
        ids = [torch.tensor(split.sequence(int(i)))[None] for i in idx]
        want = torch.cat([model(input_ids=x, attention_mask=torch.ones_like(x)).logits for x in ids])
    assert got.shape == (shape.slots, 2)  # one shape whatever the pack holds
    torch.testing.assert_close(got[: len(idx)], want, atol=2e-5, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients(families):
    grads = []
    for on in (False, True):
        torch.manual_seed(0)
        model, tok = classifier(families["llama"], decoder=DecoderConfig(gradient_checkpointing=on),
                                lora=LoraConfig(enabled=True, target_modules=["auto"], dropout=0.0))
        model.train()
        torch.nn.functional.cross_entropy(model(**batch(tok, "right")).logits, torch.tensor([0, 1, 0, 1])).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert model.get_base_model().is_gradient_checkpointing
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n])


def test_options_that_do_not_apply_are_refused(families):
    base = families["llama"]
    with pytest.raises(ConfigError, match="load_in_4bit = true: QLoRA's 4-bit weights need CUDA .* on cpu"):
        classifier(base, lora=LoraConfig(enabled=True, target_modules=["auto"]),
                   decoder=DecoderConfig(load_in_4bit=True))
    with pytest.raises(ConfigError, match="train.freeze = '1': .* decoder model type 'llama'"):
        classifier(base, freeze="1")
    model, _ = classifier(base)
    with pytest.raises(ConfigError, match="task = 'token' with decoder base model type 'llama'"):
        check_decoder_task("token", model.config)
    check_decoder_task("multi_label", model.config)  # allowed: the loss is the task's, the base only pools


def test_dry_run_states_the_footprint_and_refuses_what_cannot_fit(families):
    base = families["llama"]
    full = TrainConfig(batch_size=8)
    lora = dataclasses.replace(full, lora=LoraConfig(enabled=True, target_modules=["auto"]))
    fp_full, fp_lora = (footprint(base, LABELS, c, 32, CPU, 2) for c in (full, lora))
    model, _ = classifier(base, lora=LoraConfig(enabled=True, target_modules=["auto"]))
    assert fp_lora.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert fp_lora.parameters == fp_full.parameters == sum(p.numel() for p in exportable(model).parameters())
    assert fp_lora.optimizer_bytes < fp_full.optimizer_bytes and fp_full.tokens_per_step == 8 * 32
    line = check_fits(fp_lora, lora, CPU)
    assert f"{fp_lora.parameters:,} parameters, {fp_lora.trainable:,} trainable" in line and "256 tokens per step" \
        in line
    with pytest.raises(ConfigError, match=r"does not fit: estimated .* GiB > 0.00 GiB available on cpu; lower it "
                                          r"with train.batch_size .*train.lora.enabled: true"):
        check_fits(fp_full, full, CPU, available=1000)
