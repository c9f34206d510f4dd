"""task: token through the stage cores on a tiny random BERT: validate (CoNLL file) -> tokenize (aligned, -100 on
inner sub-tokens) -> train (token head, CE) -> evaluate (entity scores), with a learnable pattern so that the
trained model must find the entities."""

import numpy as np
import pytest

from finetune.common.config import DataConfig, EvaluateConfig, TokenizeConfig, TrainConfig, ValidateConfig
from finetune.stages.tokenize import tokenize
from finetune.stages.validate import validate_tagged

CITIES = ["Paris", "Rome", "Oslo", "Lima", "Kyiv", "Cairo"]
PEOPLE = ["Anna", "Omar", "Ines", "Ravi", "Yuki", "Lars"]


def ner_file(path, n=120):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        person, city = PEOPLE[i % 6], CITIES[(i // 6) % 6]
        lines += [f"{person} B-PER", "visited O", f"{city} B-LOC", "on O", f"day{i} O", ""]
        if rng.random() < 0.5:
            lines[-1:] = [f"{person} B-PER", f"{person}son I-PER", "left O", ""]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def ner_splits(tmp_path_factory):
    f = ner_file(tmp_path_factory.mktemp("ner") / "people.conll")
    result = validate_tagged(f, DataConfig(path=str(f)), ValidateConfig(labels=[], val_fraction=0.15,
                                                                        test_fraction=0.15))
    assert result.ok, result.report["rules"]
    return result


def test_validate_splits_keep_every_entity_type_and_record_the_scheme(ner_splits):
    rep = ner_splits.report
    assert rep["tag_scheme"] == "bio" and ner_splits.labels == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert all(set(rep["splits"][s]["classes"]) == {"LOC", "PER"} for s in ("train", "val", "test"))


def test_tokenize_train_evaluate_learns_the_entities(ner_splits, tiny_model_dir, tmp_path):
    from finetune.stages.evaluate import evaluate
    from finetune.stages.train import train

    toks, meta = tokenize(ner_splits.splits, ner_splits.labels, tiny_model_dir, TokenizeConfig(max_length=16),
                          task="token")
    assert meta["task"] == "token" and toks["train"].labels.ndim == 2
    assert meta["stats"]["train"]["entities_cut"] == 0
    cfg = TrainConfig(epochs=4, batch_size=16, learning_rate=3e-3, warmup_ratio=0.0, checkpoint_every=0,
                      threads=2, eval_every=0)
    train(toks, meta, tiny_model_dir, cfg, tmp_path / "model")
    result = evaluate(tmp_path / "model", toks["test"], meta, EvaluateConfig())
    assert result.metrics["entity_micro_f1"] > 0.5, result.metrics  # an untrained head finds ~none
    assert set(result.metrics["per_class"]) == {"LOC", "PER"}


def test_broken_files_are_refused_naming_file_line_and_rule(tmp_path):
    import json

    from finetune.reporting.validation_summary import failure_message

    conll = tmp_path / "bad.conll"
    conll.write_text("Ann B-PER\nLee I-PER\n\nin O\nRome I-LOC\n")
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(json.dumps({"tokens": ["a", "b"], "tags": ["O", "O"]}) + "\n"
                     + json.dumps({"tokens": ["Ann", "Lee"], "tags": ["B-PER"]}) + "\n")
    for path, where in ((conll, "line 5: rule 'entity_start'"), (jsonl, "line 2: rule 'tags_match_tokens'")):
        result = validate_tagged(path, DataConfig(path=str(path)), ValidateConfig(labels=[]))
        assert not result.ok and not result.splits
        assert f"{path}: {where}" in failure_message(result.report)


def test_run_validate_with_task_token_writes_iob2_splits_of_a_conll_2003_file(tmp_path, monkeypatch):
    """The stage as `finetune validate --set task=token` runs it: CoNLL-2003's four columns, IOB1 named."""
    from finetune.common.config import Config
    from finetune.common.tokens import read_splits
    from finetune.stages.validate import run_validate

    monkeypatch.chdir(tmp_path)
    blocks = [f"-DOCSTART- -X- -X- O\n\nPeter{i} NNP I-NP I-PER\nBlackburn NNP I-NP I-PER\nin IN O O\n"
              f"Rome{i} NNP I-NP I-LOC\n" for i in range(40)]
    (tmp_path / "c03.conll").write_text("\n".join(blocks))
    cfg = Config(task="token")
    cfg.validate.labels, cfg.data.tag_scheme = [], "iob1"
    report = run_validate(cfg, "c03.conll", tmp_path / "out")
    assert report["tag_scheme"] == "iob1"
    frames, labels = read_splits(tmp_path / "out")
    assert labels == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert list(frames["train"]["label"].iloc[0]) == ["B-PER", "I-PER", "O", "B-LOC"]  # IOB1 -> IOB2
