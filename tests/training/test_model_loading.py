"""Loading a trained model folder: safetensors only; a pickle-only folder is one line, never loaded."""

import shutil
import subprocess

import pytest
import torch
from conftest import BIN, ENV, REPO

from finetune.training.model import MismatchError, load_classifier


@pytest.fixture
def pickled_model(tiny_classifier_dir, tmp_path):
    """The tiny classifier as an old-style folder: config, tokenizer and pytorch_model.bin (a pickle)."""
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_classifier_dir, folder)
    weights = folder / "model.safetensors"
    torch.save(load_file(weights), folder / "pytorch_model.bin")
    weights.unlink()
    return folder


def test_a_pickle_only_folder_is_refused_naming_the_file(pickled_model):
    with pytest.raises(MismatchError, match=r"no safetensors weights \(found pytorch_model.bin \(pickle"):
        load_classifier(pickled_model)


@pytest.mark.parametrize("verb", ["evaluate", "compress"])
def test_evaluate_and_compress_end_in_one_line_on_a_pickle_only_model(pickled_model, stage_inputs, tmp_path, verb):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    proc = subprocess.run([str(BIN / "finetune"), verb, "--model", str(pickled_model), "--tokens",
                           str(stage_inputs / "tokenize"), "--out", str(tmp_path / "out")],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"model folder {pickled_model}: no safetensors weights" in proc.stderr
    assert not (tmp_path / "out").exists()
