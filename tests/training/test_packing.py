"""Packed batches: same logits as the padded forward, one shape per epoch, every row once."""

import numpy as np
import pytest
import torch

from conftest import toy_frame
from finetune.common.config import TokenizeConfig
from finetune.stages.tokenize import tokenize
from finetune.training.batches import collate
from finetune.training.packing import IGNORE, PackedClassifier, build_pack, epoch_packs, pack_shape, to_tensors


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


# ---- the train stage on packed batches ----

def _train_cfg(**kw):
    from finetune.common.config import TrainConfig

    return TrainConfig(**{**dict(epochs=2, batch_size=8, learning_rate=3e-3, seed=3, checkpoint_every=0, threads=1,
                                 warmup_ratio=0.0, log_every=3), **kw})


@pytest.fixture(scope="module")
def toks(tiny_model_dir):
    df = toy_frame(50).sample(frac=1, random_state=0)
    return tokenize({"train": df.iloc[:64], "val": df.iloc[64:80], "test": df.iloc[80:]}, ["fresh", "rotten"],
                    tiny_model_dir, TokenizeConfig(max_length=16))


def test_packed_training_follows_the_padded_loss_curve(toks, tiny_model_nodropout, tmp_path, monkeypatch):
    """Same rows in each step (the padded side is handed the packs' rows): the same losses and weights, and the
    packed model sees one input shape all run long."""
    from safetensors.torch import load_file

    import finetune.training.step_plan
    from finetune.stages.train import train
    from finetune.training.packing import PackedClassifier

    tokens, meta = toks
    shapes = set()
    forward = PackedClassifier.forward

    def recording(self, input_ids, position_ids, cu_seqlens, starts):
        shapes.add((input_ids.shape, position_ids.shape, cu_seqlens.shape, starts.shape))
        return forward(self, input_ids, position_ids, cu_seqlens, starts)

    monkeypatch.setattr(PackedClassifier, "forward", recording)
    packed = train(tokens, meta, tiny_model_nodropout, _train_cfg(pack_tokens=96), tmp_path / "packed")
    assert packed.packed and len(shapes) == 1, shapes
    shape = pack_shape(tokens["train"], 96)
    monkeypatch.setattr(finetune.training.step_plan, "epoch_batches",
                        lambda split, batch_size, seed, epoch, **kw: epoch_packs(split, shape, seed, epoch))
    padded = train(tokens, meta, tiny_model_nodropout, _train_cfg(), tmp_path / "padded")
    assert not padded.packed and padded.steps == packed.steps > 10
    # fp32, no dropout: only summation order differs; 16 steps at lr 3e-3 keep that under 1e-4
    assert [h["loss"] for h in packed.history] == pytest.approx([h["loss"] for h in padded.history], abs=1e-4)
    a, b = load_file(tmp_path / "packed" / "model.safetensors"), load_file(tmp_path / "padded" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    assert packed.history[-1]["loss"] < packed.history[0]["loss"]


# Losses of the first 8 steps on CPU, fp32, recorded 2026-11-23 (torch 2.13, transformers 5.23). A change to
# batching, the loss, the optimizer or the schedule moves them by far more than the 1e-4 allowed for BLAS
# summation-order differences between machines.
GOLDEN = {
    96: [0.693518, 0.690204, 0.676242, 0.72591, 0.706326, 0.687295, 0.73246, 0.649689],
    0: [0.692119, 0.706732, 0.694607, 0.721111, 0.715121, 0.71616, 0.688504, 0.686081],
}


@pytest.mark.parametrize("pack_tokens", [96, 0], ids=["packed", "padded"])
def test_golden_losses_of_eight_cpu_steps(toks, tiny_model_nodropout, tmp_path, pack_tokens):
    from finetune.stages.train import train

    tokens, meta = toks
    res = train(tokens, meta, tiny_model_nodropout, _train_cfg(pack_tokens=pack_tokens, max_steps=8), tmp_path / "m")
    assert res.packed == bool(pack_tokens)
    assert [h["loss"] for h in res.history] == pytest.approx(GOLDEN[pack_tokens], abs=1e-4)


def test_a_model_it_cannot_pack_trains_padded_and_says_so(toks, tiny_model_dir, tmp_path, monkeypatch, caplog):
    import finetune.training.packing
    from finetune.stages.train import train

    monkeypatch.setattr(finetune.training.packing, "PACKABLE", ("roberta",))  # as if the tiny BERT were an unknown type
    tokens, meta = toks
    with caplog.at_level("INFO", logger="finetune"):
        res = train(tokens, meta, tiny_model_dir, _train_cfg(pack_tokens=96, max_steps=2), tmp_path / "m")
    assert not res.packed and res.steps == 2
    assert any("cannot be packed; training on padded batches" in r.getMessage() for r in caplog.records)
