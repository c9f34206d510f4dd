"""model.base as a GGUF file or a package that ships one: the refusals (the real file: test_decoder_real.py)."""

from __future__ import annotations

import sys

import pytest

from finetune.common.base_model import ModelNotFound, resolve_base


def test_a_missing_gguf_file_is_refused_naming_it(tmp_path):
    with pytest.raises(ModelNotFound, match=r"GGUF file .*nope.gguf does not exist \(model.base="):
        resolve_base(str(tmp_path / "nope.gguf"))


def test_a_package_shipping_two_gguf_files_is_refused_without_importing_it(tmp_path, monkeypatch):
    pkg = tmp_path / "two_ggufs"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('its own runtime is missing')\n")  # never imported
    for name in ("a.gguf", "b.gguf"):
        (pkg / name).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelNotFound, match=r"package 'two_ggufs' ships 2 .gguf files, not one: give the file"):
        resolve_base("pkg:two_ggufs")
    assert "two_ggufs" not in sys.modules
    with pytest.raises(ModelNotFound, match="package 'not_there_at_all' is not installed"):
        resolve_base("pkg:not_there_at_all")


def test_an_unreadable_gguf_file_is_refused_in_one_line_and_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ModelNotFound, match=r"GGUF file .*broken.gguf cannot be read as a model: "):
        resolve_base(str(bad))
    assert not any(p.name.startswith("broken") for p in (tmp_path / "cache" / "gguf").iterdir())
