"""Locate the pretrained base model on disk. Nothing is ever downloaded from a model hub."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from finetune.common.coercion import ConfigError
from finetune.common.config import Config
from finetune.common.digests import file_sha256
from finetune.common.files import write_json

# Belt and braces: transformers must never try the network, in any stage.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class ModelNotFound(FileNotFoundError):
    pass


def resolve_base(base: str) -> Path:
    """``pkg:<module>`` -> the folder that the installed package's get_model_path() returns, or the one GGUF file
    it ships; a ``.gguf`` file -> its dequantized copy (gguf_folder); else a local folder."""
    if base.startswith("pkg:"):
        path = _packaged_model(base[4:], base)
    else:
        path = Path(base)
    if path.suffix == ".gguf":
        return gguf_folder(path, base)
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"base model folder {path} has no config.json (model.base={base})")
    return path


def _packaged_model(name: str, base: str) -> Path:
    """The one GGUF file an installed package ships (found without importing it: such packages often import a
    runtime of their own), else its get_model_path()."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModelNotFound(f"base model package '{name}' is not installed (model.base={base})")
    roots = list(spec.submodule_search_locations or []) or [str(Path(spec.origin).parent)]
    files = sorted(f for root in roots for f in Path(root).glob("*.gguf"))
    if len(files) > 1:
        raise ModelNotFound(f"base model package '{name}' ships {len(files)} .gguf files, not one: give the file "
                            f"as model.base ({', '.join(str(f) for f in files)})")
    if files:
        return files[0]
    try:
        return Path(importlib.import_module(name).get_model_path())
    except (ImportError, AttributeError) as exc:
        raise ModelNotFound(f"base model package '{name}' cannot be used: {exc} (model.base={base})") from exc


def _cache_root() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE") or Path.home() / ".cache" / "finetune")


def gguf_folder(gguf: Path, base: str) -> Path:
    """A GGUF file dequantized once into a transformers folder (config, tokenizer, fp32 safetensors) under the
    cache (``$FINETUNE_CACHE``, default ~/.cache/finetune), keyed by the file's sha256, so every stage loads the
    same plain folder. base_model.json there records the source file, its digest and its licence."""
    if not gguf.is_file():
        raise ModelNotFound(f"GGUF file {gguf} does not exist (model.base={base})")
    digest = file_sha256(gguf)
    folder = _cache_root() / "gguf" / f"{gguf.stem}-{digest[:16]}"
    if (folder / "base_model.json").is_file():
        return folder
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils.import_utils import is_gguf_available
    except ImportError as exc:  # pragma: no cover - transformers is a core dependency
        raise ModelNotFound(f"cannot read GGUF file {gguf}: {exc}") from exc
    if not is_gguf_available():
        raise ModelNotFound(f"model.base={base} is a GGUF file: install the `gguf` package (pip install gguf)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        kw = {"gguf_file": gguf.name, "local_files_only": True}
        AutoTokenizer.from_pretrained(str(gguf.parent), **kw).save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype="float32", **kw)
        model.hf_quantizer = None  # the weights were dequantized on load: what is saved is plain fp32
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        write_json(tmp / "base_model.json", {"source": str(gguf), "sha256": digest, "format": "gguf",
                                             "license": _gguf_license(gguf)})
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished the same folder first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception as exc:  # a truncated or foreign file: one line naming it, nothing left in the cache
        shutil.rmtree(tmp, ignore_errors=True)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelNotFound(f"GGUF file {gguf} cannot be read as a model: {first} (model.base={base})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _gguf_license(gguf: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get("general.license")
    return bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None else None


def base_license(model_dir: str | Path) -> str | None:
    """The base model's licence as it ships it: base_model.json (GGUF), a LICENSE file, or config.json."""
    folder = Path(model_dir)
    for name in ("base_model.json", "config.json"):
        f = folder / name
        if f.is_file() and (lic := json.loads(f.read_text(encoding="utf-8")).get("license")):
            return str(lic)
    files = sorted(p for p in folder.glob("LICEN[CS]E*") if p.is_file())
    return files[0].read_text(encoding="utf-8", errors="replace").strip().splitlines()[0] if files else None


def license_of_base(base: str) -> str | None:
    """The licence model.base ships, without dequantizing a GGUF file: its cached folder's base_model.json when
    there is one, else the file's own ``general.license``; None when the base is not at hand or ships none."""
    try:
        path = _packaged_model(base[4:], base) if base.startswith("pkg:") else Path(base)
        if path.suffix != ".gguf":
            return base_license(path)
        cached = _cache_root() / "gguf" / f"{path.stem}-{file_sha256(path)[:16]}"
        return base_license(cached) if (cached / "base_model.json").is_file() else _gguf_license(path)
    except (ModelNotFound, OSError, ValueError):
        return None


def base_facts(model_dir: str | Path, base: str, summary: dict | None = None) -> dict:
    """What the model card says about the base: architecture, parameter counts (train's summary.json), the
    licence and the pad token (which one, and whether finetune chose it because the tokenizer shipped none)."""
    folder = Path(model_dir)

    def read(name: str) -> dict:
        f = folder / name
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}

    config, tok = read("config.json"), read("tokenizer_config.json")
    summary = summary or {}
    pad = tok.get("pad_token")
    return {"base": base, "architecture": (config.get("architectures") or [config.get("model_type")])[0],
            "parameters": summary.get("parameters"), "trainable_parameters": summary.get("trainable_parameters"),
            "license": license_of_base(base),
            "pad_token": pad.get("content") if isinstance(pad, dict) else pad,
            "pad_token_id": config.get("pad_token_id"), "pad_token_set_by": tok.get("pad_token_set_by")}


def check_model_limits(cfg: Config, model_dir: str | Path) -> None:
    """Limits that depend on the base model, checked before a stage does any work."""

    conf = Path(model_dir) / "config.json"
    model_cfg = json.loads(conf.read_text(encoding="utf-8")) if conf.is_file() else {}
    positions = model_cfg.get("max_position_embeddings")
    if positions and cfg.tokenize.max_length > positions:
        raise ConfigError(f"tokenize.max_length = {cfg.tokenize.max_length}: must be <= {positions}, the "
                          f"max_position_embeddings of the base model {cfg.model.base}")
    layers = model_cfg.get("num_hidden_layers")
    if layers and (cfg.train.frozen_layers or 0) > layers:
        raise ConfigError(f"train.freeze = {cfg.train.freeze!r}: must be <= {layers}, the num_hidden_layers of the "
                          f"base model {cfg.model.base} (or none, encoder)")
