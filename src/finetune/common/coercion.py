"""Type checks of YAML values against the config schema's hints, with one-line errors."""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from typing import Any

MAX_MESSAGE = 1000  # characters of a ConfigError: a value echoed in full once made a 358 MB line


MAX_INT = 2 ** 63 - 1  # what torch, numpy and SQLite hold; beyond it an "integer" fails far from its key


_SHOW = reprlib.Repr()
_SHOW.maxstring, _SHOW.maxother, _SHOW.maxlist, _SHOW.maxdict, _SHOW.maxlevel = 80, 80, 8, 8, 3


def shown(value: Any) -> str:
    """A value for an error message: its repr, bounded in length and in the work spent on it."""
    return _SHOW.repr(value)


class ConfigError(ValueError):
    """A params value is missing, unknown or out of range. One line: file, key, value, allowed range."""

    located = False  # True once the message names the params file (load_config adds it)

    def __init__(self, message: str = ""):
        message = str(message)
        if len(message) > MAX_MESSAGE:
            message = f"{message[:MAX_MESSAGE - 200]} ... ({len(message)} characters in all) ... {message[-150:]}"
        super().__init__(message)


def rule(obj: Any, name: str, ok: bool, allowed: str) -> None:
    """Refuse ``obj.name`` unless ``ok``; the message names the dotted key, the value and what is allowed."""
    if not ok:
        raise ConfigError(f"{obj.SECTION}.{name} = {shown(getattr(obj, name))}: must be {allowed}")


_TYPE_WORDS = {float: "a number", int: "an integer", str: "a string", bool: "true or false"}


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Check a YAML value against the field's type; numbers written as '1e-4' (a YAML string) become floats."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        args = tuple(a for a in args if a is not type(None))
        hint = args[0] if len(args) == 1 else typing.Union[args]
    if hint is Any:
        return value
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # e.g. str | list[float]: the first that fits
        for option in args:
            try:
                return coerce(value, option, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where} = {shown(value)}: must be "
                          f"{' or '.join(_TYPE_WORDS.get(a, 'a list') for a in args)}")
    origin = typing.get_origin(hint)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} = {shown(value)}: must be a mapping")
        return {str(k): coerce(v, typing.get_args(hint)[1], f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} = {shown(value)}: must be a list")
        return [coerce(v, typing.get_args(hint)[0], where) for v in value]
    if hint is float and not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            pass
        else:
            if math.isfinite(number):  # .inf / .nan epochs or rates overflow far from here
                return number
            raise ConfigError(f"{where} = {shown(value)}: must be a finite number")
    elif hint is int and isinstance(value, (int, float)) and not isinstance(value, bool) and \
            math.isfinite(value) and value == int(value):
        # KFP passes every number as a double: 10.0 is the int 10; a float past 2**53 is no exact integer
        if abs(value) > (MAX_INT if isinstance(value, int) else 2 ** 53):
            raise ConfigError(f"{where} = {shown(value)}: must be an integer of magnitude at most "
                              f"{MAX_INT if isinstance(value, int) else 2 ** 53}")
        return int(value)
    elif hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    elif hint is bool and isinstance(value, bool):
        return value
    raise ConfigError(f"{where} = {shown(value)}: must be {_TYPE_WORDS.get(hint, getattr(hint, '__name__', hint))}")


def build(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'the top level'} = {shown(values)}: must be a mapping of keys to values")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    prefix = f"{where}." if where else ""
    unknown = sorted(str(k) for k in set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {', '.join(prefix + k for k in unknown)}: allowed in "
                          f"{where or 'the top level'}: {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = build(hints[name], {} if value is None else value, prefix + name)
        else:
            kwargs[name] = coerce(value, hints[name], prefix + name)
    return cls(**kwargs)


def located_error(msg: str) -> ConfigError:
    """A ConfigError whose message already says where the value came from (a file, a flag)."""
    err = ConfigError(msg)
    err.located = True
    return err
