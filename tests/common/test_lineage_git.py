"""git_dirty means the code or params differ from the commit, not that the pipeline rewrote its own outputs."""

import subprocess
from pathlib import Path

from finetune.common.lineage import git_info

DVC_YAML = """stages:
  train:
    cmd: finetune train
    outs:
      - out/model
      - out/checkpoints:
          persist: true
    metrics:
      - out/train/summary.json:
          cache: false
    plots:
      - out/train/loss.csv:
          x: step
plots:
  - out/evaluate/roc.csv
"""


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def _repo(root: Path) -> Path:
    files = {"dvc.yaml": DVC_YAML, "dvc.lock": "schema: '2.0'\n", "params.yaml": "train:\n  epochs: 1\n",
             "src/code.py": "x = 1\n", "out/train/summary.json": "{}\n", "out/train/loss.csv": "step,loss\n",
             "out/evaluate/roc.csv": "fpr,tpr\n", "out/model/config.json": "{}\n"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    _git(root, "init", "-q")
    _git(root, "-c", "user.email=t@example.com", "-c", "user.name=t", "add", ".")
    _git(root, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "init")
    return root


def test_pipeline_outputs_do_not_make_the_tree_dirty(tmp_path):
    root = _repo(tmp_path)
    assert git_info(root)["git_dirty"] is False
    for name in ("dvc.lock", "out/train/summary.json", "out/train/loss.csv", "out/evaluate/roc.csv",
                 "out/model/config.json"):
        (root / name).write_text("rewritten by dvc repro\n")
    info = git_info(root)
    assert info["git_dirty"] is False and len(info["git_commit"]) == 40


def test_code_or_params_changes_make_it_dirty(tmp_path):
    root = _repo(tmp_path)
    (root / "out/train/loss.csv").write_text("rewritten\n")
    (root / "params.yaml").write_text("train:\n  epochs: 2\n")
    assert git_info(root)["git_dirty"] is True
    _git(root, "checkout", "params.yaml")
    (root / "src/code.py").write_text("x = 2\n")
    assert git_info(root)["git_dirty"] is True


def test_dirty_is_unknown_outside_git(tmp_path):
    assert git_info(tmp_path)["git_dirty"] is None
