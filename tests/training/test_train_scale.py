"""Training options beyond the default loop: data-parallel under torchrun (gloo on CPU), LoRA merged on export,
gradient accumulation and token-budget batches."""

import json
import os
import subprocess

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import BIN, toy_frame
from finetune.common.config import LoraConfig, TokenizeConfig, TrainConfig
from finetune.stages.tokenize import tokenize, write_tokens
from finetune.stages.train import train
from finetune.training.batches import epoch_batches


@pytest.fixture(scope="module")
def toks(tiny_model_dir):
    df = toy_frame(50).sample(frac=1, random_state=0)
    return tokenize({"train": df.iloc[:64], "val": df.iloc[64:80], "test": df.iloc[80:]}, ["fresh", "rotten"],
                    tiny_model_dir, TokenizeConfig(max_length=16))


def _cfg(**kw):
    return TrainConfig(**{**dict(epochs=2, batch_size=8, learning_rate=3e-3, seed=3, checkpoint_every=0, threads=1),
                          **kw})


def _weights(path):
    return load_file(path / "model.safetensors")


def _close(a, b, atol):
    return all(np.allclose(a[k].numpy(), b[k].numpy(), atol=atol) for k in a)


@pytest.mark.integration
@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_ddp_two_processes_match_single_process(toks, tiny_model_nodropout, tmp_path, pack):
    tokens, meta = toks
    write_tokens(tokens, meta, tmp_path / "tokens")
    (tmp_path / "params.yaml").write_text("{}\n")
    args = ["train", "--params", str(tmp_path / "params.yaml"), "--tokens", str(tmp_path / "tokens"),
            "--checkpoints", "", "--set", f"model.base={tiny_model_nodropout}", "--set", "train.epochs=2",
            "--set", "train.batch_size=8", "--set", "train.learning_rate=3e-3", "--set", "train.seed=3",
            "--set", "train.threads=1", "--set", "train.device=cpu"]
    # packed: a DDP step is one pack per rank, which a single process sees as 2 accumulated packs
    args += ["--set", "train.pack_tokens=64"] if pack else []
    single = ["--set", "train.grad_accum_steps=2"] if pack else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([str(BIN / "finetune"), *args, *single, "--model", str(tmp_path / "single"), "--train-logs",
                    str(tmp_path / "single-logs")], check=True, env=env, capture_output=True, timeout=600)
    ddp = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python",
                          str(BIN / "finetune"), *args, "--model", str(tmp_path / "ddp"), "--train-logs",
                          str(tmp_path / "ddp-logs")], env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    s1 = json.loads((tmp_path / "single-logs" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "ddp-logs" / "summary.json").read_text())
    assert s2["world_size"] == 2 and s1["world_size"] == 1 and s1["packed"] == s2["packed"] == pack
    assert s1["steps"] == s2["steps"] and (pack or s1["steps"] == 16) and s1["steps"] > 4
    l1 = [float(r.split(",")[1]) for r in (tmp_path / "single-logs" / "loss.csv").read_text().splitlines()[1:]]
    l2 = [float(r.split(",")[1]) for r in (tmp_path / "ddp-logs" / "loss.csv").read_text().splitlines()[1:]]
    assert np.allclose(l1, l2, atol=1e-4), (l1, l2)
    assert _close(_weights(tmp_path / "single"), _weights(tmp_path / "ddp"), atol=1e-4)


@pytest.mark.parametrize("pack_tokens", [0, 64], ids=["padded", "packed"])
def test_lora_trains_adapters_and_exports_a_plain_merged_model(toks, tiny_model_dir, tmp_path, pack_tokens):
    from transformers import AutoModelForSequenceClassification

    tokens, meta = toks
    res = train(tokens, meta, tiny_model_dir, _cfg(lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0),
                                                   pack_tokens=pack_tokens), tmp_path / "m")
    assert res.packed == bool(pack_tokens) and res.history[-1]["loss"] < res.history[0]["loss"]
    assert res.trainable_parameters < res.parameters / 10  # adapters + head only
    w = _weights(tmp_path / "m")
    assert not [k for k in w if "lora" in k or "base_model" in k]  # merged: plain transformers keys
    base = load_file(tiny_model_dir / "model.safetensors")
    q = next(k for k in w if k.endswith("attention.self.query.weight"))
    kk = next(k for k in w if k.endswith("attention.self.key.weight"))
    bq = next(b for b in base if b.endswith("attention.self.query.weight"))
    bk = next(b for b in base if b.endswith("attention.self.key.weight"))
    assert not np.allclose(w[q].numpy(), base[bq].numpy())  # adapter merged into query
    assert np.allclose(w[kk].numpy(), base[bk].numpy())  # key was not a target: untouched
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")  # loads without peft
    assert model.config.id2label == {0: "fresh", 1: "rotten"}
    assert model.config._attn_implementation == "sdpa"  # the packed attention is not saved with the model


def test_grad_accumulation_equals_the_bigger_batch(toks, tiny_model_nodropout, tmp_path):
    tokens, meta = toks
    a = train(tokens, meta, tiny_model_nodropout, _cfg(batch_size=4, grad_accum_steps=2, epochs=1), tmp_path / "a")
    b = train(tokens, meta, tiny_model_nodropout, _cfg(batch_size=8, epochs=1), tmp_path / "b")
    assert a.steps == b.steps == 8
    # not bit-identical: pools and batches are cut from different batch sizes; both must learn the same amount
    assert abs(a.history[-1]["loss"] - b.history[-1]["loss"]) < 0.2


def test_token_budget_batches_cover_every_row_once_within_budget(toks):
    split = toks[0]["train"]
    batches = epoch_batches(split, batch_size=8, seed=1, epoch=0, max_tokens=40)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(len(split)))
    for b in batches:
        assert len(b) == 1 or len(b) * split.lengths[b].max() <= 40
    assert max(len(b) for b in batches) > 2  # short texts pack more rows than a fixed batch of 2
