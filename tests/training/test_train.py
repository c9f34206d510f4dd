import math

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import toy_frame
from finetune.common.config import TokenizeConfig, TrainConfig
from finetune.stages.tokenize import tokenize
from finetune.stages.train import train, write_history
from finetune.training.recipe import TrainingError


@pytest.fixture(scope="module")
def toy_tokens(tiny_model_dir):
    df = toy_frame(50).sample(frac=1, random_state=0)
    splits = {"train": df.iloc[:60], "val": df.iloc[60:80], "test": df.iloc[80:]}
    return tokenize(splits, ["fresh", "rotten"], tiny_model_dir, TokenizeConfig(max_length=16))


def _cfg(**kw):
    base = dict(epochs=12, batch_size=8, learning_rate=5e-3, seed=1, checkpoint_every=0, threads=1, warmup_ratio=0.1)
    return TrainConfig(**{**base, **kw})


def test_trains_to_high_accuracy_and_saves_model(toy_tokens, tiny_model_dir, tmp_path):
    toks, meta = toy_tokens
    res = train(toks, meta, tiny_model_dir, _cfg(), tmp_path / "model")
    assert res.steps == 12 * math.ceil(60 / 8)
    assert res.val_accuracy >= 0.9, res.val_history
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    files = {p.name for p in (tmp_path / "model").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in (tmp_path / "model").iterdir())
    write_history(res, tmp_path / "logs")
    lines = (tmp_path / "logs" / "loss.csv").read_text().splitlines()
    assert lines[0] == "step,loss,lr" and len(lines) == res.steps + 1


def test_same_seed_same_model(toy_tokens, tiny_model_dir, tmp_path):
    toks, meta = toy_tokens
    a = train(toks, meta, tiny_model_dir, _cfg(epochs=1), tmp_path / "a")
    b = train(toks, meta, tiny_model_dir, _cfg(epochs=1), tmp_path / "b")
    train(toks, meta, tiny_model_dir, _cfg(epochs=1, seed=2), tmp_path / "c")
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    wa, wb, wc = (load_file(tmp_path / d / "model.safetensors") for d in "abc")
    assert all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa)
    assert any(not np.array_equal(wa[k].numpy(), wc[k].numpy()) for k in wa)


@pytest.mark.parametrize("pack_tokens", [0, 64], ids=["padded", "packed"])
def test_crash_then_resume_matches_uninterrupted_run(toy_tokens, tiny_model_dir, tmp_path, pack_tokens):
    toks, meta = toy_tokens
    cfg = _cfg(epochs=2, checkpoint_every=4, pack_tokens=pack_tokens)
    full = train(toks, meta, tiny_model_dir, cfg, tmp_path / "full")

    def crash(row):
        if row["step"] == 10:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        train(toks, meta, tiny_model_dir, cfg, tmp_path / "resumed", tmp_path / "ckpt", on_step=crash)
    assert not (tmp_path / "resumed").exists()  # no half-written model
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-0000004", "step-0000008"]
    res = train(toks, meta, tiny_model_dir, cfg, tmp_path / "resumed", tmp_path / "ckpt")
    assert res.resumed_from_step == 8 and res.steps_run == res.steps - 8 and res.packed == bool(pack_tokens)
    assert [h["loss"] for h in res.history] == pytest.approx([h["loss"] for h in full.history], abs=1e-6)
    wf, wr = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(np.allclose(wf[k].numpy(), wr[k].numpy(), atol=1e-6) for k in wf)
    assert not list((tmp_path / "ckpt").iterdir())  # cleaned once the final model is saved


def test_checkpoints_of_another_config_are_not_resumed(toy_tokens, tiny_model_dir, tmp_path, caplog):
    toks, meta = toy_tokens

    def crash(row):
        if row["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(toks, meta, tiny_model_dir, _cfg(epochs=1, checkpoint_every=2), tmp_path / "m", tmp_path / "ckpt",
              on_step=crash)
    with caplog.at_level("WARNING", logger="finetune.training.checkpoint"):
        res = train(toks, meta, tiny_model_dir, _cfg(epochs=1, checkpoint_every=2, learning_rate=1e-3),
                    tmp_path / "m", tmp_path / "ckpt")
    assert res.resumed_from_step == 0
    refused = [r.getMessage() for r in caplog.records if "not resuming" in r.getMessage()]
    assert refused and all("train.learning_rate: 0.005 -> 0.001" in m for m in refused), refused
    assert all("train.epochs" not in m for m in refused)  # only the keys that differ are named


def test_diverging_loss_stops_with_clear_error(toy_tokens, tiny_model_dir, tmp_path):
    toks, meta = toy_tokens
    with pytest.raises(TrainingError, match="diverged"):
        train(toks, meta, tiny_model_dir, _cfg(learning_rate=1e30, max_grad_norm=1e30, warmup_ratio=0.0),
              tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_tokenizer_mismatch_is_refused(toy_tokens, tiny_model_dir, tmp_path):
    toks, meta = toy_tokens
    bad = {**meta, "tokenizer": {**meta["tokenizer"], "vocab_size": 123}}
    with pytest.raises(TrainingError, match="different tokenizer"):
        train(toks, bad, tiny_model_dir, _cfg(), tmp_path / "m")
