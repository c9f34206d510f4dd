"""Training regimes (params.yaml train:): each does what it says, on CPU with a tiny BERT.

Freezing leaves frozen weights byte for byte; early stopping stops and exports the best evaluation (also across a
resume); class weights give the loss computed by hand; FGM changes the gradients and puts the embeddings back;
validate states the class balance and warns; bad values are one clear line."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import toy_frame
from finetune.common.coercion import ConfigError
from finetune.common.config import AdversarialConfig, LoraConfig, TokenizeConfig, TrainConfig
from finetune.common.params import load_config
from finetune.stages.tokenize import tokenize
from finetune.stages.train import train, write_history

LABELS = ["fresh", "rotten"]


@pytest.fixture(scope="module")
def two_layer_model(tmp_path_factory, tiny_model_dir):
    """The tiny BERT with 2 layers and no dropout (runs compare exactly)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny-bert-2")
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    BertModel(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def toks(two_layer_model):
    df = toy_frame(40).sample(frac=1, random_state=0)
    return tokenize({"train": df.iloc[:48], "val": df.iloc[48:64], "test": df.iloc[64:]}, LABELS, two_layer_model,
                    TokenizeConfig(max_length=16))


def _cfg(**kw):
    return TrainConfig(**{**dict(epochs=2, batch_size=8, learning_rate=5e-3, seed=1, checkpoint_every=0, threads=1,
                                 warmup_ratio=0.0), **kw})


# ---- freezing ----

@pytest.mark.parametrize("freeze, lora", [("encoder", False), ("1", False), ("1", True)],
                         ids=["encoder", "bottom-layer", "bottom-layer-lora"])
def test_frozen_weights_are_exported_byte_for_byte(toks, two_layer_model, tmp_path, freeze, lora):
    tokens, meta = toks
    cfg = _cfg(freeze=freeze, max_steps=6, lora=LoraConfig(enabled=lora, r=4, alpha=8, dropout=0.0))
    res = train(tokens, meta, two_layer_model, cfg, tmp_path / "m")
    base = load_file(two_layer_model / "model.safetensors")  # BertModel keys, without the "bert." prefix
    out = {k.removeprefix("bert."): v for k, v in load_file(tmp_path / "m" / "model.safetensors").items()}

    def frozen(key):
        return freeze == "encoder" or key.startswith(("embeddings.", "encoder.layer.0."))

    same = {k for k in base if torch.equal(base[k], out[k])}
    assert {k for k in base if frozen(k)} <= same and len(same) > 10
    trained = {k for k in base if not frozen(k)} - same
    if freeze == "encoder":
        assert not trained and res.trainable_parameters == 32 * 2 + 2  # the head only: 2 x 32 weights + 2 biases
    elif not lora:  # the top layer and the pooler trained
        assert any(k.startswith("encoder.layer.1.") for k in trained) and "pooler.dense.weight" in trained
        frozen_count = sum(v.numel() for k, v in base.items() if frozen(k))
        assert res.trainable_parameters == res.parameters - frozen_count
    else:  # the top layer's query/value changed through its merged adapters; layer 0's adapters never trained
        assert {k for k in trained if k.startswith("encoder.")} == {
            f"encoder.layer.1.attention.self.{m}.weight" for m in ("query", "value")}
        assert 0 < res.trainable_parameters < res.parameters / 10
    assert res.freeze == freeze


def test_freezing_more_layers_than_the_model_has_is_refused(two_layer_model, toks, tmp_path):
    from finetune.common.base_model import check_model_limits

    cfg = load_config(_params(tmp_path), ["train.freeze=3"])
    with pytest.raises(ConfigError, match=r"^train.freeze = '3': must be <= 2, the num_hidden_layers of the base"):
        check_model_limits(cfg, two_layer_model)
    check_model_limits(load_config(_params(tmp_path), ["train.freeze=2"]), two_layer_model)
    tokens, meta = toks  # train() alone checks it against the layers it finds, before any step
    with pytest.raises(ConfigError, match=r"^train.freeze = '3': must be <= 2, the encoder layers found"):
        train(tokens, meta, two_layer_model, _cfg(freeze=3), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def _params(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("{}\n")
    return p


# ---- early stopping and best-checkpoint selection ----

def _val_loss_of(model_dir, split):
    from finetune.training.model import load_classifier, predict_logits

    logits = torch.from_numpy(predict_logits(load_classifier(model_dir), split, 64, 0, torch.device("cpu")))
    return float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(split.labels)))


STOPPING = dict(learning_rate=0.05, eval_every=1, patience=2, keep_best=True, max_steps=40, epochs=20)


def test_early_stopping_stops_and_exports_the_best_step(toks, two_layer_model, tmp_path):
    tokens, meta = toks
    res = train(tokens, meta, two_layer_model, _cfg(**STOPPING), tmp_path / "m")
    losses = [r["val_loss"] for r in res.val_history]
    best = int(np.argmin(losses))  # first of equals: a tie is no improvement
    assert res.steps < 40 and res.stop_reason.startswith(f"early stop at step {res.steps}: val_loss did not improve")
    assert res.best_step == res.exported_step == res.val_history[best]["step"] == res.steps - 2
    # the exported file is the best step's model: its validation loss is the best row's, not the last row's
    exported = _val_loss_of(tmp_path / "m", tokens["val"])
    assert exported == pytest.approx(losses[best], abs=1e-5) and abs(exported - losses[-1]) > 1e-4
    assert res.val_loss == losses[best] and not math.isnan(res.val_macro_f1)
    write_history(res, tmp_path / "logs")
    summary = json.loads((tmp_path / "logs" / "summary.json").read_text())
    assert summary["best_step"] == res.best_step and summary["stop_reason"] == res.stop_reason
    assert (tmp_path / "logs" / "val.csv").read_text().splitlines()[0] == "step,val_loss,val_accuracy,val_macro_f1"
    # default (patience 0, keep_best false): all steps, the last step exported, as before these settings existed
    plain = train(tokens, meta, two_layer_model, _cfg(**{**STOPPING, "patience": 0, "keep_best": False,
                                                         "max_steps": res.steps + 2}), tmp_path / "plain")
    assert plain.steps == plain.exported_step == res.steps + 2 and plain.stop_reason == "reached train.max_steps " \
        f"({res.steps + 2})"
    assert _val_loss_of(tmp_path / "plain", tokens["val"]) == pytest.approx(plain.val_history[-1]["val_loss"], abs=1e-5)


def test_a_resumed_run_keeps_the_best_so_far_and_stops_where_it_would_have(toks, two_layer_model, tmp_path):
    tokens, meta = toks
    cfg = _cfg(**STOPPING, checkpoint_every=1, log_every=1)
    full = train(tokens, meta, two_layer_model, cfg, tmp_path / "full")

    def crash(row):  # killed one step after the best: the best weights exist only in the checkpoint
        if row["step"] == full.best_step + 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tokens, meta, two_layer_model, cfg, tmp_path / "resumed", tmp_path / "ckpt", on_step=crash)
    res = train(tokens, meta, two_layer_model, cfg, tmp_path / "resumed", tmp_path / "ckpt")
    assert res.resumed_from_step == full.best_step
    assert (res.steps, res.best_step, res.stop_reason) == (full.steps, full.best_step, full.stop_reason)
    assert [r["step"] for r in res.val_history] == [r["step"] for r in full.val_history]
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.integration
def test_every_ddp_rank_stops_at_the_step_rank_0_chose(toks, two_layer_model, tmp_path):
    """torchrun, 2 CPU processes: rank 0 evaluates and decides; a rank that missed the decision would hang in the
    next step's all-reduce (timeout) or train on alone. DDP = one process with the same global batch, so both
    stop at the same step and export the same best weights."""
    import os
    import subprocess

    from conftest import BIN
    from finetune.stages.tokenize import write_tokens

    tokens, meta = toks
    write_tokens(tokens, meta, tmp_path / "tokens")
    args = ["train", "--params", str(_params(tmp_path)), "--tokens", str(tmp_path / "tokens"), "--checkpoints", "",
            "--set", f"model.base={two_layer_model}", "--set", "train.threads=1", "--set", "train.device=cpu"]
    for key, value in {**STOPPING, "batch_size": 8, "seed": 1, "warmup_ratio": 0.0}.items():
        args += ["--set", f"train.{key}={value}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python"]
    runs = {"single": [str(BIN / "finetune")], "ddp": [*torchrun, str(BIN / "finetune")]}
    for name, cmd in runs.items():
        out = ["--model", str(tmp_path / name), "--train-logs", str(tmp_path / f"{name}-logs")]
        proc = subprocess.run([*cmd, *args, *out], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    single, ddp = (json.loads((tmp_path / f"{n}-logs" / "summary.json").read_text()) for n in runs)
    assert ddp["world_size"] == 2 and ddp["stop_reason"].startswith("early stop") and ddp["steps"] < 40
    assert (ddp["steps"], ddp["best_step"], ddp["exported_step"]) == \
        (single["steps"], single["best_step"], single["exported_step"])
    a, b = load_file(tmp_path / "single" / "model.safetensors"), load_file(tmp_path / "ddp" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_selection_rules():
    from finetune.training.early_stopping import Selection

    s = Selection("val_accuracy", patience=2, min_delta=0.01)
    steps = [(1, 0.5), (2, 0.505), (3, 0.6), (4, 0.6), (5, float("nan"))]  # +0.005 is no improvement
    assert [s.update({"step": st, "val_accuracy": v}) for st, v in steps] == [False, False, False, False, True]
    assert (s.best_step, s.best_value) == (3, 0.6)
    assert Selection("val_accuracy", state=s.state()).state() == s.state()
    loss = Selection("val_loss")
    assert not any(loss.update({"step": i, "val_loss": v}) for i, v in enumerate([0.9, 0.5, 0.7], 1))
    assert loss.best_step == 2  # lower is better; patience 0 never stops


# ---- class weights ----

@pytest.mark.parametrize("spec", [[1.0, 3.0], "balanced"])
def test_class_weighted_loss_equals_the_hand_computed_one(toks, two_layer_model, tmp_path, spec):
    """One step over the whole (imbalanced) train split: the logged loss is the loss of the initial model on it."""
    from finetune.stages.evaluate import subset
    from finetune.training.batches import collate
    from finetune.training.model import build_model, seed_everything

    tokens, meta = toks
    labels = tokens["train"].labels
    keep = np.r_[np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)[::3]]  # a third of the rotten rows
    train_split = subset(tokens["train"], keep)
    tokens = {**tokens, "train": train_split}
    cfg = _cfg(batch_size=len(train_split), max_steps=1, class_weights=spec)
    res = train(tokens, meta, two_layer_model, cfg, tmp_path / "w")
    plain = train(tokens, meta, two_layer_model, _cfg(batch_size=len(train_split), max_steps=1), tmp_path / "p")

    seed_everything(cfg.seed)  # as train does: the same fresh head
    model, _ = build_model(two_layer_model, LABELS, cfg, torch.device("cpu"))
    batch = collate(train_split, np.arange(len(train_split)), 0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    y = batch["labels"].numpy()
    nll = -torch.log_softmax(logits, -1).numpy()[np.arange(len(y)), y]
    counts = np.bincount(y, minlength=2)
    w = np.array(spec) if spec != "balanced" else len(y) / (2 * counts)
    assert res.history[0]["loss"] == pytest.approx(float((w[y] * nll).sum() / len(y)), abs=1e-5)
    assert plain.history[0]["loss"] == pytest.approx(float(nll.mean()), abs=1e-5)
    assert abs(res.history[0]["loss"] - plain.history[0]["loss"]) > 1e-3


def test_class_weights_must_match_the_labels(toks, two_layer_model, tmp_path):
    tokens, meta = toks
    with pytest.raises(ConfigError, match=r"^train.class_weights = \[1.0, 2.0, 3.0\]: must hold one weight per "
                                          r"label, 2 \(fresh, rotten\)$"):
        train(tokens, meta, two_layer_model, _cfg(class_weights=[1.0, 2.0, 3.0]), tmp_path / "m")


# ---- FGM adversarial training ----

def test_fgm_changes_gradients_and_restores_the_embeddings(toks, two_layer_model):
    from finetune.training.distributed import Dist
    from finetune.training.loop import forward_backward
    from finetune.training.model import build_model, seed_everything
    from finetune.training.regimes import FGM
    from finetune.training.step_plan import StepPlan

    tokens, _ = toks
    cfg = _cfg()
    plan = StepPlan(tokens["train"], cfg, 1, 0, 0, 8, None, torch.device("cpu"))
    batch = next(plan.steps(0))
    grads, losses = [], []
    for eps in (None, 1.0):
        seed_everything(cfg.seed)
        model, _ = build_model(two_layer_model, LABELS, cfg, torch.device("cpu"))
        emb = model.get_input_embeddings().weight
        before = emb.detach().clone()
        fgm = FGM(model, eps) if eps else None
        if fgm:  # the perturbation has norm epsilon, along the gradient
            forward_backward(model, plan, batch, Dist("cpu"), False)
            with fgm.perturbed():
                delta = emb.detach() - before
                assert float(delta.norm()) == pytest.approx(1.0, rel=1e-4)
                assert float(torch.nn.functional.cosine_similarity(delta.flatten(), emb.grad.flatten(), 0)) > 0.999
            assert torch.equal(emb.detach(), before)
            model.zero_grad(set_to_none=True)
        losses.append(float(forward_backward(model, plan, batch, Dist("cpu"), False, fgm=fgm)))
        assert torch.equal(emb.detach(), before)  # restored exactly after the step's two passes
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert losses[0] == losses[1]  # the logged loss is the clean one
    assert all(not torch.allclose(grads[0][n], grads[1][n]) for n in ("classifier.weight", "bert.pooler.dense.weight"))


def test_adversarial_training_runs_and_changes_the_model(toks, two_layer_model, tmp_path):
    tokens, meta = toks
    off = train(tokens, meta, two_layer_model, _cfg(max_steps=3), tmp_path / "off")
    on = train(tokens, meta, two_layer_model, _cfg(max_steps=3, adversarial=AdversarialConfig(True, 1.0)),
               tmp_path / "on")
    assert on.history[0]["loss"] == off.history[0]["loss"]
    a, b = load_file(tmp_path / "off" / "model.safetensors"), load_file(tmp_path / "on" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


# ---- the validation report: class balance and its warnings ----

def test_validation_report_states_class_balance_and_warns(tmp_path, caplog):
    from finetune.common.config import Config, DataConfig, RegisterConfig, ValidateConfig
    from finetune.stages.validate import run_validate, validate
    from finetune.tasks.single_label import floor_warning

    df = toy_frame(60)
    df = df[(df["label"] == "fresh") | (df.index % 20 == 1)]  # 60 fresh, 6 rotten
    df.to_csv(tmp_path / "d.csv", index=False)
    vcfg = ValidateConfig(labels=LABELS, min_rows_per_class=5, min_class_fraction=0.15)
    r = validate(tmp_path / "d.csv", DataConfig(), vcfg)
    assert r.ok, r.summary()
    balance = r.report["class_balance"]
    assert balance["shares"] == {"fresh": round(60 / 66, 6), "rotten": round(6 / 66, 6)}
    assert balance["minority"] == "rotten" and balance["majority"] == "fresh"
    p = (r.splits["test"]["label"] == "fresh").mean()
    assert balance["baseline"] == {"accuracy": round(p, 6), "macro_f1": round(2 * p / (1 + p) / 2, 6)}
    assert r.report["warnings"] == ["class 'rotten' holds 9.1% of the rows, under validate.min_class_fraction "
                                    "(15.0%): consider train.class_weights: balanced and register.metric: macro_f1"]
    text = r.summary()
    assert "class balance: fresh 90.9%, rotten 9.1%" in text and "- WARNING: class 'rotten' holds 9.1%" in text
    assert "register.floor = 0.7 is not above the majority-class baseline: always predicting 'fresh' scores " \
           "accuracy" in floor_warning(balance, 0.7, "accuracy")
    assert floor_warning(balance, 0.95, "accuracy") is None and floor_warning(balance, 0.5, "macro_f1") is None
    # the stage logs both (the floor check is not written into the splits' folder: register.floor must not
    # make them stale)
    cfg = Config(validate=vcfg, register=RegisterConfig(floor=0.7))
    with caplog.at_level("WARNING", logger="finetune.stages"):
        run_validate(cfg, tmp_path / "d.csv", tmp_path / "out")
    logged = [rec.getMessage() for rec in caplog.records]
    assert any("holds 9.1%" in m for m in logged) and any("register.floor = 0.7" in m for m in logged)
    assert "register.floor" not in (tmp_path / "out" / "report.json").read_text()
    # balanced data: no warning
    toy_frame(30).to_csv(tmp_path / "b.csv", index=False)
    assert validate(tmp_path / "b.csv", DataConfig(), vcfg).report["warnings"] == []


# ---- settings ----

@pytest.mark.parametrize("override, words", [
    ("train.freeze=0", "train.freeze = '0': must be none, encoder or a number of bottom layers >= 1"),
    ("train.freeze=all", "train.freeze = 'all': must be none, encoder or a number of bottom layers >= 1"),
    ("train.select_metric=f1", "train.select_metric = 'f1': must be one of val_loss, val_accuracy, val_macro_f1"),
    ("train.patience=-1", "train.patience = -1: must be >= 0"),
    ("train.min_delta=-0.1", "train.min_delta = -0.1: must be a finite number >= 0"),
    ("train.class_weights=[1, 0]", "train.class_weights = [1.0, 0.0]: must be none, balanced or a list of weights"),
    ("train.class_weights=inverse", "train.class_weights = 'inverse': must be none, balanced or a list"),
    ("train.class_weights={a: 1}", "train.class_weights = {'a': 1}: must be a string or a list"),
    ("train.adversarial.epsilon=0", "train.adversarial.epsilon = 0.0: must be a finite number > 0"),
    ("validate.min_class_fraction=1", "validate.min_class_fraction = 1.0: must be in [0, 1)"),
])
def test_bad_regime_settings_are_one_line(tmp_path, override, words):
    p = _params(tmp_path)
    with pytest.raises(ConfigError) as exc:
        load_config(p, [override])
    assert str(exc.value).startswith(f"{p} + --set: ") and words in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("overrides, words", [
    (["train.freeze=encoder", "train.lora.enabled=true"], "train.freeze = 'encoder': must be none or a number"),
    (["train.adversarial.enabled=true", "train.freeze=2"], "train.adversarial.enabled = True: must be false with "
                                                           "train.freeze = '2'"),
    (["train.adversarial.enabled=true", "train.lora.enabled=true"], "train.lora.enabled = True (FGM needs"),
])
def test_regimes_that_cannot_combine_are_refused(tmp_path, overrides, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(".", r"\.")):
        load_config(_params(tmp_path), overrides)
