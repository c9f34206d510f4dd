"""ONNX export of decoder classifiers (issue 23): the merged LoRA model of each tiny random family exports, and
the graph gives PyTorch's logits (compress's parity check) on right-padded batches longer than the example the
exporter traced (8 tokens). GPT-2 included: an earlier note that its graph was off by up to 0.3 did not reproduce."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_tiny_decoder
from finetune.common.config import LoraConfig, TrainConfig
from finetune.common.tokens import TokenizedSplit, load_tokenizer
from finetune.stages.compress import PARITY_TOLERANCE, check_onnx_parity, export_onnx, onnx_runner, torch_runner
from finetune.training.model import build_model, exportable

TEXTS = ["a dull mess", "great acting and a moving story #7, funny and warm, a delight from start to end #12",
         "funny", "the worst film this year, boring and far too long, an awful script and bad acting #3"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_decoder_exports_with_onnx_parity(tmp_path, family):
    base = make_tiny_decoder(tmp_path / family, family)
    tok = load_tokenizer(base)
    torch.manual_seed(0)
    model, _ = build_model(base, ["fresh", "rotten"], TrainConfig(lora=LoraConfig(enabled=True, target_modules=["auto"])),
                           torch.device("cpu"), tok.pad_token_id)
    with torch.no_grad():  # weights far from their init, as after training: logits of order 1, not 1e-2
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    merged = exportable(model).eval()
    seqs = [np.array(tok(t)["input_ids"], dtype=np.int32) for t in TEXTS]
    assert max(map(len, seqs)) > 8  # longer than the traced example
    split = TokenizedSplit(np.concatenate(seqs), np.cumsum([0] + [len(s) for s in seqs]), np.array([0, 0, 1, 1]))
    path = tmp_path / "model.onnx"
    export_onnx(merged, path, 17, family)
    check_onnx_parity(merged, path, split, tok.pad_token_id, family)  # raises ExportUnsupported past 1e-3
    enc = tok(TEXTS, padding=True, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    want = torch_runner(merged, 1)(ids, mask)
    assert np.abs(want).max() > 0.5 and np.abs(onnx_runner(path, 1)(ids, mask) - want).max() <= PARITY_TOLERANCE
