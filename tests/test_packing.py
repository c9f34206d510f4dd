"""Packed batches: same logits as the padded forward, one shape per epoch, every row once."""

import numpy as np
import pytest
import torch

from conftest import toy_frame
from finetune.config import TokenizeConfig
from finetune.modeling import collate
from finetune.packing import IGNORE, PackedClassifier, build_pack, epoch_packs, pack_shape, to_tensors
from finetune.tokenize import tokenize


@pytest.fixture(scope="module")
def split(tiny_model_dir):
    toks, _ = tokenize({"train": toy_frame(20), "val": toy_frame(2), "test": toy_frame(2)}, ["fresh", "rotten"],
                       tiny_model_dir, TokenizeConfig(max_length=16))
    return toks["train"]


def _classifier(path, eval_mode=True):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=2, attn_implementation="sdpa")
    return model.eval() if eval_mode else model


def test_packed_forward_gives_the_padded_logits(split, tiny_model_dir):
    model = _classifier(tiny_model_dir)
    idx = np.arange(12)
    assert len(set(split.lengths[idx])) > 2, "needs sequences of different lengths"
    b = collate(split, idx, pad_id=0)
    with torch.no_grad():
        padded = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    shape = pack_shape(split, 256)
    packed_model = PackedClassifier(model, shape)
    p = to_tensors(build_pack(split, idx, shape, pad_id=0), torch.device("cpu"))
    with torch.no_grad():
        packed = packed_model(p["input_ids"], p["position_ids"], p["cu_seqlens"], p["starts"])
    assert packed.shape == (shape.slots, 2)
    # fp32 on CPU: the two paths differ only in summation order, so 1e-5 absolute
    torch.testing.assert_close(packed[:12], padded, atol=1e-5, rtol=1e-5)
    assert (p["labels"][12:] == IGNORE).all() and (p["labels"][:12] == torch.from_numpy(split.labels[idx])).all()
    # after release the model is an ordinary SDPA model again: the padded forward still gives the same logits
    packed_model.release("sdpa")
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        again = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(again, padded)


def test_attention_stays_inside_each_sequence(split, tiny_model_dir):
    """Changing one packed sequence must not move the logits of any other."""
    model = PackedClassifier(_classifier(tiny_model_dir), pack_shape(split, 256))
    arrays = build_pack(split, np.arange(6), model.shape, pad_id=0)
    with torch.no_grad():
        before = model(*(torch.from_numpy(arrays[k]) for k in ("input_ids", "position_ids", "cu_seqlens", "starts")))
        ids = arrays["input_ids"].copy()
        s, e = arrays["cu_seqlens"][2], arrays["cu_seqlens"][3]
        ids[0, s + 1:e - 1] = 1000  # rewrite the words of sequence 2
        after = model(torch.from_numpy(ids), *(torch.from_numpy(arrays[k]) for k in ("position_ids", "cu_seqlens",
                                                                                      "starts")))
    changed = (before - after).abs().amax(-1) > 1e-6
    assert changed.tolist()[:6] == [False, False, True, False, False, False]


def test_one_shape_per_epoch_and_every_row_once(split):
    shape = pack_shape(split, 64)
    packs = epoch_packs(split, shape, seed=1, epoch=0)
    assert len(packs) > 3
    assert sorted(np.concatenate(packs).tolist()) == list(range(len(split)))
    built = [build_pack(split, p, shape, 0) for p in packs] + [build_pack(split, np.array([], int), shape, 0)]
    shapes = {tuple((k, v.shape) for k, v in sorted(b.items())) for b in built}
    assert len(shapes) == 1, shapes
    for p, b in zip(packs, built):
        cu = b["cu_seqlens"]
        assert cu[-1] == shape.tokens and (np.diff(cu) >= 0).all() and np.diff(cu).max() <= shape.max_len
        assert int(split.lengths[p].sum()) <= shape.tokens and len(p) <= shape.slots
        assert (b["labels"] != IGNORE).sum() == len(p)


def test_pack_smaller_than_a_sequence_is_refused(split):
    with pytest.raises(ValueError, match="pack_tokens=8 is smaller than the longest sequence"):
        pack_shape(split, 8)
