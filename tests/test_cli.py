"""cli.py: its table of commands names real modules, its expected errors are real classes, and a command loads
only what it needs (`finetune --version` none of the heavy libraries)."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from finetune.cli import COMMANDS, EXPECTED, build_parser, command_name

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
HEAVY = ("torch", "mlflow", "great_expectations", "optuna", "kfp", "transformers", "onnxruntime")


def _source(module: str) -> Path:
    base = SRC if module.startswith("finetune.") else REPO
    path = base.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_names_a_module_with_what_its_call_uses(name):
    module, call = COMMANDS[name]
    tree = ast.parse(_source(module).read_text(encoding="utf-8"))
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    # the attributes the call takes from the module it is handed (stage.run_validate, runner.run_tune ...)
    used = {n.attr for n in ast.walk(ast.parse(_call_source(call)))
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == _first_arg(call)}
    assert used and used <= defined, f"{name}: {module} lacks {sorted(used - defined)}"


def _call_source(call) -> str:
    return textwrap.dedent(inspect.getsource(call))


def _first_arg(call) -> str:
    return call.__code__.co_varnames[0]


def test_every_parsed_command_has_an_entry():
    parser = build_parser()
    argv = [["validate"], ["tokenize"], ["train"], ["evaluate"], ["distill"], ["compress"], ["register"], ["tune"],
            ["tune", "--katib"], ["predict", "x"], ["compare"], ["materialize"], ["serve"], ["pipeline", "compile"],
            ["pipeline", "submit", "--host", "h"], ["monitor", "--input", "x"]]
    assert sorted(command_name(parser.parse_args(a)) for a in argv) == sorted(COMMANDS)


@pytest.mark.parametrize("entry", EXPECTED)
def test_each_expected_error_is_an_exception_class_of_its_module(entry):
    module, _, name = entry.partition(":")
    tree = ast.parse(_source(module).read_text(encoding="utf-8"))
    assert name in {n.name for n in tree.body if isinstance(n, ast.ClassDef)}, entry


def test_version_loads_none_of_the_heavy_libraries():
    code = ("import sys, json\nfrom finetune.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n"
            f"    pass\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.startswith("finetune ")
    assert json.loads(out.stdout.splitlines()[-1]) == []
