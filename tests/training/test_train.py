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


def _tiny_state():
    import torch

    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def test_a_killed_checkpoint_write_is_cleaned_by_the_next_save(tmp_path, caplog):
    """kill -9 inside a checkpoint write leaves .step-*.tmp-*; the next save of the same run removes it."""
    import os
    import subprocess
    import sys
    import textwrap

    from conftest import ENV
    from finetune.training import checkpoint

    root = tmp_path / "ckpt"
    code = textwrap.dedent(f"""
        import os, signal, torch
        from finetune.training import checkpoint
        real = checkpoint.save_file
        def dying(tensors, path):
            real(tensors, path)
            os.kill(os.getpid(), signal.SIGKILL)  # after the weights, before the optimizer state
        checkpoint.save_file = dying
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.AdamW(model.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        checkpoint.save(__import__("pathlib").Path({str(root)!r}), 7, {{}}, model, opt, sched, [])
    """)
    proc = subprocess.run([sys.executable, "-c", code], check=False,
                          env={**ENV, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    assert proc.returncode == -9
    left = [p.name for p in root.iterdir()]
    assert len(left) == 1 and left[0].startswith(".step-0000007.tmp-")
    with caplog.at_level("INFO", logger="finetune"):
        checkpoint.save(root, 8, {}, *_tiny_state(), [])
    assert sorted(p.name for p in root.iterdir()) == ["step-0000008"]
    assert f"removed {root / left[0]}" in caplog.text and "left by a train run that was killed" in caplog.text


def test_a_full_disk_during_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch):
    from finetune.common.outputs import DiskFull
    from finetune.training import checkpoint

    root = tmp_path / "ckpt"
    model, opt, sched = _tiny_state()
    checkpoint.save(root, 10, {}, model, opt, sched, [])
    real = checkpoint.save_file

    def full(tensors, path):
        with open(path, "wb") as fh:
            fh.write(b"\0" * 100)  # a partly written file, as when the disk fills
        raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                           '"No space left on device" })')  # SafetensorError's text

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(DiskFull, match=rf"output folder {root / 'step-0000020'}: no space left on the device while "
                                       rf"writing it \(\d+ MiB free in {root}\); nothing of it was kept\. Free some space and rerun; "
                                       rf"training stopped at step 20, the last complete checkpoint "
                                       rf"{root / 'step-0000010'} is kept: a rerun resumes from it"):
        checkpoint.save(root, 20, {}, model, opt, sched, [])
    monkeypatch.setattr(checkpoint, "save_file", real)
    assert sorted(p.name for p in root.iterdir()) == ["step-0000010"]
    assert checkpoint.find(root, {}) == root / "step-0000010"
    assert set(load_file(root / "step-0000010" / "model.safetensors")) == {"weight", "bias"}
