from pathlib import Path

import pytest

from finetune.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_params_yaml_loads_with_every_required_key():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.tokenize.max_length == 64
    assert cfg.train.epochs == 2 and cfg.train.max_steps is None and cfg.train.batch_size == 32
    assert cfg.register.metric == "accuracy" and cfg.register.floor == 0.7
    assert cfg.validate.labels == ["fresh", "rotten"]
    # every key of params.yaml maps onto the typed config, nothing extra, nothing missing
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert {s: set(v) for s, v in raw.items()} == {s: set(v) for s, v in Config().to_dict().items()}


def test_overrides_parse_as_yaml(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  epochs: 1\n")
    cfg = load_config(p, ["train.epochs=3", "train.max_steps=7", "train.learning_rate=1e-3", "validate.labels=[a, b]"])
    assert cfg.train.epochs == 3 and cfg.train.max_steps == 7 and cfg.train.learning_rate == 1e-3
    assert cfg.validate.labels == ["a", "b"]


@pytest.mark.parametrize("override, words", [
    ("train.batch_size=0", "train.batch_size"),
    ("train.nonsense=1", "unknown key(s) in params.train: nonsense"),
    ("register.metric=loss", "register.metric"),
    ("validate.duplicates=keep", "validate.duplicates"),
    ("epochs=2", "section.key=value"),
])
def test_bad_values_name_the_key(tmp_path, override, words):
    p = tmp_path / "params.yaml"
    p.write_text("{}\n")
    with pytest.raises(ConfigError, match=None) as exc:
        load_config(p, [override])
    assert words in str(exc.value)


def test_flat_params_for_mlflow():
    flat = Config().flat()
    assert flat["train.learning_rate"] == 5e-5 and flat["register.model_name"] == "rotten-tomatoes-minilm"
