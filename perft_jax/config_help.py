"""`--help` text for the config keys of a command, read from the config dataclasses themselves.

Each key is listed as `section.key  type  default  doc`. The doc of a field is the first sentence of its
entry under `Attributes:` in the class docstring (Google style, `name: text` with indented continuation lines)
or, failing that, the `# comment` on the field's line in the class source; the type is the annotation as
`config_parsing` describes it in its errors. Nothing is written twice: a field's doc lives next to the field.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
import typing
from typing import Any

from perft_jax.config_parsing import describe_type, to_dict


def _docstring_attributes(cls: type) -> dict[str, str]:
    """`name -> text` from the `Attributes:` section of `cls`'s docstring (continuation lines joined)."""
    doc = inspect.getdoc(cls) or ""
    if "Attributes:" not in doc:
        return {}
    body = doc.split("Attributes:", 1)[1]
    out: dict[str, str] = {}
    current = None
    current = None
    for line in body.splitlines():
        match = re.match(r"^\s{0,4}([A-Za-z_][A-Za-z0-9_]*)\s*(\([^)]*\))?:\s*(.*)$", line)
        if match and not line.startswith("        "):
            current = match.group(1)
            out[current] = match.group(3).strip()
        elif current and line.strip():
            out[current] += " " + line.strip()
        elif not line.strip():
            current = None
    return out


def _source_comments(cls: type) -> dict[str, str]:
    """`name -> text` of the `# comment` ending each `name: type = default` line of the class body."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        line = lines[tok.start[0] - 1]
        match = re.match(r"^\s+([A-Za-z_][A-Za-z0-9_]*)\s*:", line)
        if match and tok.start[1] > len(line) - len(line.lstrip()):
            out[match.group(1)] = tok.string.lstrip("#").strip()
    return out


_ABBREVIATIONS = ("e.g", "i.e", "etc", "cf")


def _first_sentence(text: str) -> str:
    """Up to the first full stop outside brackets that ends the text or is followed by a capitalised word (not
    `e.g.`, `0 .. n`); `;` clauses stay, as they often say what 0 or an empty value means."""
    text = " ".join(text.split())
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(ch, 0)
        if ch != "." or depth != 0 or text[:i].endswith(_ABBREVIATIONS):
            continue
        if i + 1 == len(text) or (text[i + 1] == " " and text[i + 2:i + 3].isupper()):
            return text[:i]
    return text


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return to_dict(field.default)
    if field.default_factory is not dataclasses.MISSING:
        return to_dict(field.default_factory())
    return "(required)"


def config_keys(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type description, default, one-line doc) of every leaf field of config dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    docs = {**_source_comments(cls), **_docstring_attributes(cls)}
    rows = []
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        key = f"{prefix}.{field.name}" if prefix else field.name
        tp = hints[field.name]
        if dataclasses.is_dataclass(tp):
            rows += config_keys(tp, key)
        else:
            rows.append((key, describe_type(tp), _default(field), _first_sentence(docs.get(field.name, ""))))
    return rows


def format_config_keys(cls: type, prefix: str = "", width: int = 120, only: tuple[str, ...] = ()) -> str:
    """The keys of `cls` as an aligned text table (for an argparse epilog); with `only`, the keys starting with
    one of those strings."""
    rows = [row for row in config_keys(cls, prefix) if not only or row[0].startswith(only)]
    key_w = max(len(r[0]) for r in rows)
    lines = []
    for key, tp, default, doc in rows:
        head = f"  {key:<{key_w}}  {tp}, default {default!r}"
        indent = " " * 6
        wrapped = textwrap.fill(doc, width, initial_indent=indent, subsequent_indent=indent)
        lines.append(head if not doc else f"{head}\n{wrapped}")
    return "\n".join(lines)


KEY_SYNTAX = """\
Config keys are set in the --config YAML file, or as key=value arguments that override it (dotted paths,
values read as YAML): perft.top_k=4, optim.learning_rate=2e-5, eval.benchmarks=[boolq,piqa]; a single item
where a list of strings is expected is a one-element list (data.train_files=data/train.json); key= is the
empty string (eval.adapters=); key=null is none (model.dtype=null)."""


def config_command_parser(prog: str, description: str, cls: type, prefix: str = "") -> argparse.ArgumentParser:
    """The parser of a config-driven command: `[--config FILE] [key=value ...]`, its `--help` listing every key of
    `cls` (under `prefix`) with its type, default and doc."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"{KEY_SYNTAX}\n\nconfig keys:\n{format_config_keys(cls, prefix)}")
    parser.add_argument("--config", help="YAML config file; key=value arguments override it")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. perft.top_k=2")
    return parser
