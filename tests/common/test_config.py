import math
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from finetune.common.base_model import check_model_limits
from finetune.common.coercion import ConfigError
from finetune.common.config import Config
from finetune.common.params import config_from_dict, load_config

REPO = Path(__file__).resolve().parents[2]


def test_params_yaml_loads_with_every_required_key():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.tokenize.max_length == 64
    assert cfg.train.epochs == 2 and cfg.train.max_steps is None and cfg.train.batch_size == 32
    assert cfg.register.metric == "accuracy" and cfg.register.floor == 0.7
    assert cfg.validate.labels == ["fresh", "rotten"]
    # every key of params.yaml maps onto the typed config, nothing extra, nothing missing
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert {s: set(v) for s, v in raw.items()} == {s: set(v) for s, v in Config().to_dict().items()}


def test_dataclass_defaults_equal_params_yaml():
    """Defaults live once: params.yaml is the source, the dataclass defaults repeat it exactly (a key missing
    from a params file then means the same everywhere)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert config_from_dict(raw).to_dict() == Config().to_dict()


def test_overrides_parse_as_yaml(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  epochs: 1\n")
    cfg = load_config(p, ["train.epochs=3", "train.max_steps=7", "train.learning_rate=1e-3", "validate.labels=[a, b]"])
    assert cfg.train.epochs == 3 and cfg.train.max_steps == 7 and cfg.train.learning_rate == 1e-3
    assert cfg.validate.labels == ["a", "b"]


def test_overrides_reach_any_depth_and_leave_the_input_alone(tmp_path):
    from finetune.common.params import apply_overrides

    raw = {"train": {"lora": {"r": 8}}}
    assert load_config(REPO / "params.yaml", ["train.lora.r=4", "train.lora.enabled=true"]).train.lora.r == 4
    assert apply_overrides(raw, ["train.lora.r=2"])["train"]["lora"]["r"] == 2 and raw["train"]["lora"]["r"] == 8
    p = tmp_path / "params.yaml"
    p.write_text("train:\n")  # an empty section is a section
    assert load_config(p, ["train.lora.alpha=32"]).train.lora.alpha == 32
    with pytest.raises(ConfigError, match="train.epochs is a value, not a section"):
        load_config(REPO / "params.yaml", ["train.epochs.sub=1"])


def test_max_steps_zero_means_no_cap():
    assert load_config(REPO / "params.yaml", ["train.max_steps=0"]).train.max_steps is None


@pytest.mark.parametrize("override, words", [
    ("train.batch_size=0", "train.batch_size = 0: must be >= 1"),
    ("train.nonsense=1", "unknown key train.nonsense: allowed in train: epochs,"),
    ("train.lora.nonsense=1", "unknown key train.lora.nonsense: allowed in train.lora: enabled,"),
    ("nonsense.key=1", "unknown key nonsense: allowed in the top level: data,"),
    ("train.epochs.sub=1", "train.epochs = {'sub': 1}: must be a number"),
    ("register.metric=loss", "register.metric = 'loss': must be one of accuracy, macro_f1"),
    ("validate.duplicates=keep", "validate.duplicates = 'keep': must be 'drop' or 'fail'"),
    ("epochs=2", "section.key=value"),
    ("train.epochs=two", "train.epochs = 'two': must be a number"),
    # issue 14 item 4: values that were accepted and could not work
    ("train.max_grad_norm=-1", "train.max_grad_norm = -1.0: must be > 0"),
    ("train.weight_decay=-5", "train.weight_decay = -5.0: must be >= 0"),
    ("train.learning_rate=0", "train.learning_rate = 0.0: must be > 0"),
    ("register.floor=7", "register.floor = 7.0: must be in [0, 1]"),
    ("register.min_macro_f1=2", "register.min_macro_f1 = 2.0: must be in [0, 1]"),
    ("register.min_improvement=-0.1", "register.min_improvement = -0.1: must be in [0, 1]"),
    ("train.epochs=.inf", "train.epochs = inf: must be a finite number"),
    ("train.learning_rate=.nan", "train.learning_rate = nan: must be a finite number"),
    ("train.threads=-3", "train.threads = -3: must be >= 0"),
    ("train.max_steps=-1", "train.max_steps = -1: must be >= 1, or 0/null for no cap"),
    ("train.lora.r=0", "train.lora.r = 0: must be >= 1"),
    ("train.lora.dropout=1", "train.lora.dropout = 1.0: must be in [0, 1)"),
    ("tokenize.max_length=4", "tokenize.max_length = 4: must be in [8, 8192]"),
    ("validate.seed=-1", "validate.seed = -1: must be in [0, 4294967295]"),
    # issue 27: a seed or another int given as a huge float passed, then a traceback in training
    ("train.seed=1.0e+23", "train.seed = 1e+23: must be an integer of magnitude at most 9007199254740992"),
    ("train.seed=4294967296", "train.seed = 4294967296: must be in [0, 4294967295]"),
    ("tune.seed=100000000000000000000000", "tune.seed = 100000000000000000000000: must be an integer of magnitude"),
    ("train.batch_size=1.0e+300", "train.batch_size = 1e+300: must be an integer of magnitude at most"),
    ("evaluate.calibration_bins=1", "evaluate.calibration_bins = 1: must be >= 2"),
    ("register.retries=-1", "register.retries = -1: must be >= 0"),
])
def test_bad_values_are_one_line_naming_file_key_value_and_range(tmp_path, override, words):
    p = tmp_path / "params.yaml"
    p.write_text("{}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p, [override])
    msg = str(exc.value)
    assert msg.startswith(f"{p} + --set: ") and words in msg and "\n" not in msg, msg


def test_dataclasses_check_values_built_in_code():
    from finetune.common.config import TrainConfig

    with pytest.raises(ConfigError, match=r"^train.epochs = inf: must be a finite number > 0$"):
        TrainConfig(epochs=float("inf"))


def test_bad_value_in_the_file_names_the_file(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  max_grad_norm: -1\n")
    with pytest.raises(ConfigError, match=rf"^{p}: train.max_grad_norm = -1.0: must be > 0$"):
        load_config(p)


@pytest.mark.parametrize("text, words", [
    ("train:\n  epochs: [1,\n", ":3: YAML syntax error"),
    ("- train\n- validate\n", ": the top level is a list; it must be a mapping"),
])
def test_broken_params_file_is_one_line_and_exit_2(tmp_path, capsys, text, words):
    from finetune.cli import main

    p = tmp_path / "params.yaml"
    p.write_text(text)
    assert main(["tokenize", "--params", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{p}{words}" in err and "Traceback" not in err, err


def test_cli_config_error_exits_2_and_data_errors_stay_1(tmp_path, capsys):
    from finetune.cli import main

    assert main(["train", "--set", "train.max_grad_norm=-1"]) == 2
    err = capsys.readouterr().err
    assert err == "finetune train: error: params.yaml + --set: train.max_grad_norm = -1.0: must be > 0\n"
    # a stage failure (here: no tokenize output) keeps exit status 1
    assert main(["evaluate", "--model", str(tmp_path / "none"), "--tokens", str(tmp_path / "none")]) == 1


def test_max_length_beyond_the_models_positions_is_refused_before_any_work(tmp_path, tiny_model_dir, capsys):
    """The tiny model has 128 positions: tokenize and train refuse 256 before reading any input."""
    from finetune.cli import main

    cfg = load_config(REPO / "params.yaml", ["tokenize.max_length=256"])
    with pytest.raises(ConfigError, match=r"^tokenize.max_length = 256: must be <= 128, the max_position_embed"):
        check_model_limits(cfg, tiny_model_dir)
    check_model_limits(load_config(REPO / "params.yaml", ["tokenize.max_length=128"]), tiny_model_dir)
    for verb in ("tokenize", "train"):  # the inputs do not exist: the limit is checked first
        args = [verb, "--set", f"model.base={tiny_model_dir}", "--set", "tokenize.max_length=256"]
        args += ["--splits" if verb == "tokenize" else "--tokens", str(tmp_path / "missing")]
        assert main(args) == 2, verb
        err = capsys.readouterr().err
        assert "params.yaml: tokenize.max_length = 256: must be <= 128" in err and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


def test_version_flag(capsys):
    from importlib.metadata import version

    from finetune.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"finetune {version('finetune')}"


def test_flat_params_for_mlflow():
    flat = Config().flat()
    assert flat["train.learning_rate"] == 1e-4 and flat["register.model_name"] == "rotten-tomatoes-minilm"
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in flat.values())


# ---- dvc.yaml: each stage tracks the exact keys and the code that change its results ----

# Settings that change how a run goes, not what it produces: no stage lists them, so they never rerun one.
COSMETIC = {"train.log_every", "train.threads", "train.checkpoint_every", "tokenize.batch_size",
            "register.retries", "register.retry_backoff",
            # where training runs on a cluster (KFP compile time); `dvc repro` always trains in-process
            "launch.launcher", "launch.nodes", "launch.procs_per_node"}
# Code a stage runs without importing it: register logs the pyfunc files as the model's code; the CLI's register
# verb configures tracking and collects lineage.
NOT_IMPORTED = {"register": ("registry/pyfunc_model.py", "registry/onnx_pyfunc_model.py", "common/tracking.py",
                             "common/lineage.py")}
# Folders a stage depends on as a whole; a stage file under stages/ is listed on its own.
FOLDERS = ("common", "tasks", "training", "registry", "reporting", "tuning", "cluster", "monitoring")
SRC = REPO / "src" / "finetune"


def _dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _leaf_keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out |= _leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


def test_every_config_key_that_affects_results_is_a_param_of_some_stage():
    """A new key (e.g. train.pack_tokens) must be added to a stage's params in dvc.yaml, or to COSMETIC."""
    # tune: and serve: are read by `finetune tune` and `finetune serve` only, no dvc.yaml stages (dvc repro stays the
    # cheap default path)
    # monitor: is read by `finetune monitor`, but for the two keys of the reference profile register stores
    keys = {k for k in _leaf_keys(Config().to_dict()) if not k.startswith(("tune.", "serve.", "monitor."))
            or k in ("monitor.reference_rows", "monitor.seed")}
    keys |= {"serve.max_accuracy_drop", "serve.max_latency_ms"}  # compress picks the serving variant with them
    listed = {k for stage in _dvc_stages().values() for k in stage.get("params", [])}
    assert listed <= keys, f"dvc.yaml lists keys the config does not have: {sorted(listed - keys)}"
    assert keys - COSMETIC <= listed, f"keys no stage tracks: {sorted(keys - COSMETIC - listed)}"
    assert not listed & COSMETIC, f"cosmetic keys that would rerun a stage: {sorted(listed & COSMETIC)}"


def _module_file(dotted: str) -> Path | None:
    rel = Path(*dotted.split(".")[1:])
    return next((f for f in (SRC / rel.with_suffix(".py"), SRC / rel / "__init__.py") if f.is_file()), None)


def _imported_files(path: Path) -> set[Path]:
    """Every finetune module a file imports, at the top or inside a function (``from finetune.a import b``
    counts for finetune.a and, when it is a module, finetune.a.b)."""
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("finetune."):
            for dotted in [node.module] + [f"{node.module}.{a.name}" for a in node.names]:
                out |= {f for f in [_module_file(dotted)] if f}
    return out


def _stage_code(verb: str) -> set[str]:
    """stages/<verb>.py and everything it imports, transitively, as dvc deps: a file under stages/ by itself,
    anything else as its whole folder; common/ and the stages package always."""
    seen, todo = set(), [SRC / "stages" / f"{verb}.py", *(SRC / f for f in NOT_IMPORTED.get(verb, ()))]
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo += _imported_files(f)
    deps = {"src/finetune/common", "src/finetune/stages/__init__.py"}
    for f in seen:
        rel = f.relative_to(SRC)
        deps.add(f"src/finetune/{rel.parts[0]}" if rel.parts[0] in FOLDERS else f"src/finetune/{rel.as_posix()}")
    return deps


@pytest.mark.parametrize("verb", ["validate", "tokenize", "train", "evaluate", "compress", "register"])
def test_each_stage_depends_on_the_code_it_runs(verb):
    deps = {d for d in _dvc_stages()[verb]["deps"] if str(d).startswith("src/")}
    expected = _stage_code(verb)
    assert deps == expected, f"dvc.yaml {verb}: missing {sorted(expected - deps)}, extra {sorted(deps - expected)}"


def test_the_deps_check_sees_an_import_of_another_folder(tmp_path, monkeypatch):
    """A stage file that starts importing a folder its deps do not list is caught (the check above can fail)."""
    copy = tmp_path / "finetune"
    shutil.copytree(SRC, copy)
    stage = copy / "stages" / "tokenize.py"
    stage.write_text(stage.read_text() + "\nfrom finetune.reporting import plots  # noqa\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", copy)
    assert "src/finetune/reporting" in _stage_code("tokenize")
    assert "src/finetune/reporting" not in {d for d in _dvc_stages()["tokenize"]["deps"]}


def test_cosmetic_settings_leave_train_up_to_date_and_learning_rate_reruns_it(tmp_path):
    """Real DVC on a copy of the repo: train's lock entry recorded (dvc commit, no training), then
    `dvc status train` after editing params.yaml."""
    from conftest import copy_repo, set_params, sh

    root = copy_repo(tmp_path)
    for out in ("out/tokenize", "out/model", "out/checkpoints"):  # train's dep and outputs, stand-ins
        (root / out).mkdir(parents=True, exist_ok=True)
    (root / "out" / "tokenize" / "meta.json").write_text("{}")
    (root / "out" / "model" / "config.json").write_text("{}")
    sh(["dvc", "commit", "-f", "-q", "train"], root)
    assert "up to date" in sh(["dvc", "status", "train"], root).stdout
    set_params(root, train={"log_every": 7, "threads": 1, "checkpoint_every": 3})
    status = sh(["dvc", "status", "train"], root).stdout
    assert "up to date" in status, status
    set_params(root, train={"learning_rate": 3e-5})
    status = sh(["dvc", "status", "train"], root).stdout
    assert "changed deps" in status and "train.learning_rate" in status and "log_every" not in status, status


def _alias_bomb() -> str:
    """Nine levels of nine aliases: about 400 bytes that stand for 9**9 values (a list where tune.space wants a
    mapping, so the error message echoes all of it)."""
    parts = ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        parts.append(f"&{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "[" + ", ".join(parts) + ", [" + ",".join(["*i"] * 9) + "]]"


@pytest.mark.parametrize("where", ["override", "file"])
def test_a_yaml_alias_bomb_is_one_short_line_at_once(tmp_path, capsys, where):
    import time

    from finetune.cli import main

    p = tmp_path / "params.yaml"
    bomb = _alias_bomb()
    p.write_text("{}\n" if where == "override" else f"tune:\n  space: {bomb}\n")
    t0 = time.perf_counter()
    code = main(["tokenize", "--params", str(p)] + (["--set", f"tune.space={bomb}"] if where == "override" else []))
    err = capsys.readouterr().err
    # before: a 358 MB one-line error after 48 s
    assert code == 2 and time.perf_counter() - t0 < 10, err[:500]
    assert len(err) < 400 and err.count("\n") == 1 and "expands to more than 100,000 values" in err, err[:500]
    assert str(p) in err and "Traceback" not in err


def test_error_messages_echo_a_value_in_bounded_length(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("{}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p, ["train.epochs=" + "x" * 50_000])
    assert len(str(exc.value)) < 300 and "train.epochs = 'xxx" in str(exc.value) and "must be a number" in str(exc.value)
    with pytest.raises(ConfigError) as exc:  # a value built in code (no YAML) is bounded by ConfigError itself
        load_config(p, [f"train.class_weights=[{', '.join(['0'] * 5000)}]"])
    assert len(str(exc.value)) < 1000, len(str(exc.value))
    with pytest.raises(ConfigError, match="refers to the value that contains it"):
        load_config(p, ["tune.space=&x [*x]"])
