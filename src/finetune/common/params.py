"""params.yaml and overrides -> the typed Config: YAML reading, dotted overrides, KFP's dict form."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from finetune.common.coercion import ConfigError, build, located_error, shown
from finetune.common.config import Config

MAX_YAML_NODES = 100_000  # values after alias expansion; params.yaml holds ~150, an alias bomb billions


MAX_YAML_DEPTH = 50


MAX_OVERRIDE_CHARS, MAX_PARAMS_BYTES = 65_536, 1_048_576


def safe_yaml(text: str, where: str) -> Any:
    """yaml.safe_load, refusing (ConfigError, one line) what would expand past MAX_YAML_NODES values through
    aliases, nest past MAX_YAML_DEPTH or refer to itself; YAML syntax errors pass through as yaml.YAMLError."""
    try:
        value = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply") from None
    _expanded_size(value, where, {}, 0)
    return value


def _expanded_size(value: Any, where: str, seen: dict[int, int | None], depth: int) -> int:
    """How many values ``value`` stands for once every alias is expanded (shared objects counted at each use,
    computed once each)."""
    if not isinstance(value, (dict, list)):
        return 1
    if depth > MAX_YAML_DEPTH:
        raise ConfigError(f"{where}: YAML nested deeper than {MAX_YAML_DEPTH} levels")
    key = id(value)
    if key in seen:
        if seen[key] is None:
            raise ConfigError(f"{where}: a YAML alias refers to the value that contains it")
        return seen[key]
    seen[key] = None
    items = list(value.keys()) + list(value.values()) if isinstance(value, dict) else value
    total = 1
    for item in items:
        total += _expanded_size(item, where, seen, depth + 1)
        if total > MAX_YAML_NODES:
            raise ConfigError(f"{where}: YAML expands to more than {MAX_YAML_NODES:,} values (aliases repeating "
                              f"aliases?); write the values out")
    seen[key] = total
    return total


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """A copy of ``raw`` with ``section.key[.sub...]=value`` strings applied (the syntax of ``dvc exp run -S``);
    values parse as YAML (``2``, ``1e-4``, ``null``, ``[a, b]``). Unknown keys are refused when the config is built."""
    out = copy.deepcopy(raw)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        path = key.strip().split(".")
        top_values = {k for k, v in Config().to_dict().items() if not isinstance(v, dict)}  # task=...
        if not sep or not all(path) or (len(path) < 2 and path[0] not in top_values):
            raise ConfigError(f"override {shown(item)} is not of the form section.key=value (e.g. train.lora.r=4) "
                              f"or task=value")
        node = out
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:  # absent, or an empty section in YAML
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {shown(item)}: {'.'.join(path[:depth + 1])} is a value, not a section")
            node = child
        if len(value) > MAX_OVERRIDE_CHARS:
            raise ConfigError(f"override {key.strip()}=...: the value has {len(value):,} characters, more than "
                              f"{MAX_OVERRIDE_CHARS:,}; put it in params.yaml")
        try:
            node[path[-1]] = safe_yaml(value, f"override {key.strip()}")
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {shown(item)}: the value is not valid YAML "
                              f"({getattr(exc, 'problem', None) or type(exc).__name__})") from None
    return out


def drop_none(d: dict[str, Any]) -> dict[str, Any]:
    """Without null values (KFP struct parameters cannot hold them); absent keys take the config default."""
    return {k: drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}


def config_from_dict(raw: dict[str, Any] | None) -> Config:
    """The one way a params.yaml-shaped dict becomes the typed config (CLI, submit, every KFP component)."""
    return build(Config, {} if raw is None else raw, "")


def as_params(cfg: Config) -> dict[str, Any]:
    """The resolved config as the KFP ``params`` struct: every key, nulls dropped (they are the defaults)."""
    return drop_none(cfg.to_dict())


def read_params(path: str | Path) -> dict[str, Any]:
    """params.yaml as a dict; a missing file, a YAML syntax error or a non-mapping is one ConfigError line."""
    p = Path(path)
    if not p.is_file():
        raise located_error(f"{p}: params file not found")
    if p.stat().st_size > MAX_PARAMS_BYTES:
        raise located_error(f"{p}: {p.stat().st_size:,} bytes, more than {MAX_PARAMS_BYTES:,} for a params file")
    try:
        raw = safe_yaml(p.read_text(encoding="utf-8"), str(p))
    except ConfigError as exc:
        raise located_error(str(exc)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise located_error(f"{where}: YAML syntax error: {getattr(exc, 'problem', None) or exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise located_error(f"{p}: the top level is a {type(raw).__name__}; it must be a mapping of sections "
                          f"(data:, validate:, train: ...)")
    return raw


def load_config(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Config:
    """Read params.yaml (missing keys take the defaults above), apply overrides, check everything."""
    raw = read_params(path)
    try:
        return config_from_dict(apply_overrides(raw, overrides))
    except ConfigError as exc:
        raise located_error(f"{path}{' + --set' if overrides else ''}: {exc}") from None
