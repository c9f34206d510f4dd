"""Distillation on a tiny task: the student is smaller, its soft-target loss falls, and it beats the same student
trained on the labels alone when the labels it sees are noisy and the teacher learned from clean ones."""

import json

import numpy as np
import pytest

from conftest import toy_frame
from finetune.common.config import TokenizeConfig, TrainConfig
from finetune.common.distill_config import DistillConfig
from finetune.common.params import config_from_dict
from finetune.common.tokens import TokenizedSplit
from finetune.stages.distill import run_distill
from finetune.stages.tokenize import tokenize
from finetune.stages.train import train
from finetune.training.distill import SUPPORTED_TASKS, check_distillable_task, distill, student_layers
from finetune.training.model import load_classifier, predict_logits
from finetune.training.recipe import TrainingError


@pytest.fixture(scope="module")
def four_layer_base(tmp_path_factory, base_model_dir):
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny-bert-4")
    tok = AutoTokenizer.from_pretrained(str(base_model_dir))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def _cfg(**kw):
    base = dict(epochs=12, batch_size=8, learning_rate=5e-3, seed=1, checkpoint_every=0, threads=1, warmup_ratio=0.1)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def teacher(four_layer_base, tmp_path_factory):
    """A 4-layer teacher trained on clean labels, and the tokens."""
    df = toy_frame(50).sample(frac=1, random_state=0)
    splits = {"train": df.iloc[:60], "val": df.iloc[60:80], "test": df.iloc[80:]}
    toks, meta = tokenize(splits, ["fresh", "rotten"], four_layer_base, TokenizeConfig(max_length=16))
    out = tmp_path_factory.mktemp("teacher") / "model"
    res = train(toks, meta, four_layer_base, _cfg(learning_rate=2e-3), out)
    assert res.val_accuracy >= 0.9, res.val_history
    return out, toks, meta


def _noisy(split: TokenizedSplit, share: float) -> TokenizedSplit:
    rng = np.random.default_rng(0)
    labels = split.labels.copy()
    flip = rng.random(len(labels)) < share
    labels[flip] = 1 - labels[flip]
    return TokenizedSplit(split.ids, split.offsets, labels)


def _student(teacher, tmp_path, alpha, train_split=None):
    out, toks, meta = teacher
    toks = {**toks, "train": train_split if train_split is not None else toks["train"]}
    dcfg = DistillConfig(layers=[0], temperature=4.0, alpha=alpha, hidden_weight=0.0, mask_rate=0.0, epochs=6,
                         learning_rate=5e-3, patience=0, eval_every=0)
    return distill(toks, meta, out, _cfg(), dcfg, tmp_path / f"student-{alpha}", tmp_path / "ckpt")


def test_student_is_smaller_and_its_soft_target_loss_falls(teacher, tmp_path):
    res, info = _student(teacher, tmp_path, alpha=0.5)
    cfg = json.loads((tmp_path / "student-0.5" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and info["student_layers"] == [0]
    assert info["student_parameters"] < info["teacher_parameters"]
    assert info["soft_loss_last"] < 0.7 * info["soft_loss_first"], info  # 0.097 -> 0.053 measured
    assert res.val_accuracy >= 0.8
    # the teacher's logits were computed once and cached next to the checkpoints
    assert len(list((tmp_path / "ckpt").glob("teacher_logits-*.npy"))) == 1


def test_student_learns_from_the_teacher_not_only_the_labels(teacher, tmp_path):
    """Train labels 35% flipped: the student on labels alone learns the noise, the distilled one the teacher."""
    out, toks, meta = teacher
    noisy = _noisy(toks["train"], 0.35)
    _student(teacher, tmp_path, alpha=1.0, train_split=noisy)
    _student(teacher, tmp_path, alpha=0.0, train_split=noisy)
    test = toks["test"]

    def accuracy(folder):
        logits = predict_logits(load_classifier(folder), test, 64, 0, __import__("torch").device("cpu"))
        return float((logits.argmax(1) == test.labels).mean())
    distilled, alone = accuracy(tmp_path / "student-1.0"), accuracy(tmp_path / "student-0.0")
    assert distilled > alone, (distilled, alone)


def _hidden_gap(teacher_dir, student, layers, split) -> float:
    """Mean squared gap between the student's blocks and the teacher blocks they came from, on ``split``."""
    import torch

    from finetune.training.batches import collate
    from finetune.training.distill import LiveTeacher

    live = LiveTeacher(load_classifier(teacher_dir), student.eval(), layers)
    batch = collate(split, np.arange(len(split)), 0)
    with torch.no_grad():
        student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        live.logits(batch)
        gap = float(live.hidden_gap(batch).mean())
    live.close()
    return gap


def test_hidden_state_transfer_pulls_the_students_block_towards_the_teachers(teacher, tmp_path):
    """Student = the teacher's top block alone: trained with hidden-state transfer, its block's output comes
    closer to the teacher's top block than when it learns from the soft targets alone."""
    from finetune.training.distill import build_student

    out, toks, meta = teacher
    runs = {}
    for weight in (0.0, 1.0):
        dcfg = DistillConfig(layers=[3], temperature=4.0, alpha=0.5, hidden_weight=weight, mask_rate=0.0, epochs=6,
                             learning_rate=5e-3, patience=0, eval_every=0)
        res, info = distill(toks, meta, out, _cfg(), dcfg, tmp_path / f"s{weight}", tmp_path / f"ck{weight}")
        runs[weight] = (res, info, _hidden_gap(out, load_classifier(tmp_path / f"s{weight}"), [3], toks["test"]))
    untrained = _hidden_gap(out, build_student(load_classifier(out), [3]), [3], toks["test"])
    soft_only, hidden = runs[0.0][2], runs[1.0][2]
    assert hidden < 0.5 * untrained and hidden < soft_only, (untrained, soft_only, hidden)
    assert runs[1.0][0].val_accuracy >= 0.8 and runs[1.0][1]["hidden_weight"] == 1.0
    # the teacher ran live: no cached logits; without hidden transfer they were cached
    assert not list((tmp_path / "ck1.0").glob("teacher_logits-*.npy"))
    assert len(list((tmp_path / "ck0.0").glob("teacher_logits-*.npy"))) == 1


def test_masking_augments_what_the_student_trains_on_and_the_teacher_labels_the_same_text(teacher, tmp_path):
    import torch

    from finetune.training.batches import collate
    from finetune.training.distill import LiveTeacher, TokenMasking, build_student

    out, toks, meta = teacher
    model = load_classifier(out)
    student = build_student(model, [0])
    special = [0, 101, 102]
    masking = TokenMasking(student, 0.5, 103, special, seed=0)
    live = LiveTeacher(load_classifier(out), student, [0], masking)
    batch = collate(toks["train"], np.arange(32), 0)
    ids = batch["input_ids"]
    student.train()
    student(input_ids=ids, attention_mask=batch["attention_mask"])
    seen = masking.last
    masked = seen != ids
    ordinary = ~torch.isin(ids, torch.tensor(special))
    assert (seen[masked] == 103).all() and not masked[~ordinary].any()  # never [CLS], [SEP] or padding
    assert 0.35 < masked.sum() / ordinary.sum() < 0.65
    expected = model.eval()(input_ids=seen, attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(live.logits(batch), expected, atol=1e-5)  # the teacher labels the masked text
    student(input_ids=ids, attention_mask=batch["attention_mask"])
    assert not torch.equal(masking.last, seen)  # afresh every step
    student.eval()
    student(input_ids=ids, attention_mask=batch["attention_mask"])
    assert masking.last is None  # validation sees the text as it is
    live.close()

    dcfg = DistillConfig(layers=[3], temperature=4.0, alpha=0.5, hidden_weight=0.0, mask_rate=0.15, epochs=6,
                         learning_rate=5e-3, patience=0, eval_every=0)
    res, info = distill(toks, meta, out, _cfg(), dcfg, tmp_path / "masked", tmp_path / "ck")
    assert info["mask_rate"] == 0.15 and res.val_accuracy >= 0.8
    assert not list((tmp_path / "ck").glob("teacher_logits-*.npy"))  # live teacher: nothing cached


def test_unsupported_task_and_bad_layers_are_refused():
    assert "single_label" in SUPPORTED_TASKS
    with pytest.raises(TrainingError, match="task 'token' is not supported"):
        check_distillable_task("token")
    assert student_layers(6, []) == [0, 2, 3, 5]
    assert student_layers(4, []) == [0, 2, 3]
    with pytest.raises(TrainingError, match="fewer than the teacher's 6 layers"):
        student_layers(6, [0, 6])


@pytest.mark.parametrize("overrides, why", [({"distill": {"enabled": False}}, "distill.enabled is false"),
                                            ({"distill": {"enabled": True}, "task": "multi_label"}, "'multi_label'")])
def test_a_skipped_distill_writes_only_why_and_compress_ignores_it(tmp_path, overrides, why):
    cfg = config_from_dict(overrides)
    out = tmp_path / "student"
    summary = run_distill(cfg, tmp_path / "model-never-read", tmp_path / "tokens-never-read", out, tmp_path / "ck")
    assert why in summary["skipped"] and (tmp_path / "ck").is_dir()  # dvc.yaml's out exists either way
    assert json.loads((out / "distill.json").read_text()) == summary
    assert not (out / "config.json").exists()  # compress keeps only students with a model (run_compress)
