"""`--help` of config-driven commands: every key of the config tree, with its type, default and doc."""
from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from perft_jax.cli import train_main
from perft_jax.config import Config
from perft_jax.config_help import config_keys, format_config_keys


@dataclasses.dataclass(frozen=True)
class _Inner:
    """Attributes:
    depth: how deep it goes (in layers; never negative). The rest is detail.
    """

    depth: int = 2


@dataclasses.dataclass(frozen=True)
class _Outer:
    name: str = "x"  # what it is called; shown in logs
    kind: Literal["a", "b"] | None = None
    sizes: tuple[int, ...] = (1, 2)
    inner: _Inner = _Inner()


def test_keys_types_defaults_and_docs_come_from_the_dataclass():
    rows = {key: (tp, default, doc) for key, tp, default, doc in config_keys(_Outer)}
    assert rows == {
        "name": ("a string", "x", "what it is called"),
        "kind": ("one of 'a', 'b' or null", None, ""),
        "sizes": ("a list of an integer", [1, 2], ""),
        "inner.depth": ("an integer", 2, "how deep it goes (in layers; never negative)"),
    }


def test_every_leaf_of_the_run_config_is_listed():
    def leaves(cls, prefix=""):
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            default = f.default if f.default is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(default):
                yield from leaves(type(default), key + ".")
            else:
                yield key

    listed = [row[0] for row in config_keys(Config)]
    assert listed == list(leaves(Config))
    text = format_config_keys(Config)
    assert "perft.top_k" in text and "K of M adapters per token" in text


def test_train_help_lists_the_config_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for expected in ("--config", "config keys", "perft.variant", "one of 'none', 'perft_s'", "data.train_files",
                     "a list of a string", "train.max_steps"):
        assert expected in out
