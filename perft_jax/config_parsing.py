"""Typed config trees from YAML: frozen dataclasses, strict keys, `key=value` overrides.

A config section is a frozen dataclass whose field annotations are the schema. `from_dict` builds one
from plain data (parsed YAML / JSON), refusing unknown keys and values of the wrong type with a one-line
error naming the full dotted key, then calls the section's `validate_config(prefix)` for range and cross-field
checks. `apply_overrides` folds command-line `a.b.c=value` strings (values parsed as YAML scalars or
lists; `a.b.c=` is the empty string) into the data before it is built. A list of strings (`tuple[str, ...]`, e.g.
`data.train_files`) also takes one string alone, as a one-element list: `data.train_files=train.json`.
"""
from __future__ import annotations

import dataclasses
import pathlib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

import yaml

from perft_jax.errors import UserError

T = TypeVar("T")


_PLURALS = {"a string": "strings", "an integer": "integers", "a number": "numbers", "true or false": "booleans"}


def describe_type(tp: Any) -> str:
    """An annotation in words, as errors and `--help` show it (`one of 'a', 'b'`, `a list of strings`)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(a) for a in typing.get_args(tp))
    if origin is tuple:
        item = describe_type(typing.get_args(tp)[0])
        return f"a list of {_PLURALS.get(item, item)}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp) or origin is Mapping:
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp` and convert it (lists -> tuples, ints -> floats, sections)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, key)
            except UserError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
    elif origin is tuple:
        (item_type, *_rest) = typing.get_args(tp)
        if isinstance(value, str) and item_type is str:  # one path where a list of paths is expected
            return (value,)
        if isinstance(value, (list, tuple)):
            return tuple(_convert(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return from_dict(tp, value, key)
        if isinstance(value, tp):
            return value
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-5` (no dot) as a string; users write it anyway
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise UserError(f"{key}: expected {describe_type(tp)}, got {value!r}")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str) -> T:
    """Build dataclass `cls` from `data`; errors name `prefix.key`."""
    data = data or {}
    if not isinstance(data, dict):
        raise UserError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise UserError(f"{_join(prefix, key)}: unknown key (known: {', '.join(sorted(fields))})")
    values = {key: _convert(value, hints[key], _join(prefix, key)) for key, value in data.items()}
    for key in fields.keys() - data.keys():  # absent sections are validated with their defaults too
        if dataclasses.is_dataclass(hints[key]) and hasattr(hints[key], "validate_config"):
            values[key] = from_dict(hints[key], {}, _join(prefix, key))
    try:
        obj = cls(**values)
    except TypeError as e:  # a required field without default
        raise UserError(f"{prefix or 'config'}: {e}") from None
    validate = getattr(obj, "validate_config", None)
    if callable(validate):
        validate(prefix)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain JSON/YAML-able data of a config tree (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def load_yaml(path: str | pathlib.Path) -> dict[str, Any]:
    path = pathlib.Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise UserError(f"{path}: cannot read config ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                        "save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}:{where} invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Fold `a.b.c=value` strings into a copy of `data`; values are parsed as YAML (`4`, `[2,4]`, `null`), and an
    empty value (`eval.adapters=`) is the empty string, as the shell wrote it, not YAML's null."""
    data = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r}: expected key=value, e.g. perft.top_k=2")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise UserError(f"override {key}: cannot parse value {raw!r}") from None
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"override {key}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    return data
