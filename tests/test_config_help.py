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
        "name": ("a string", "x", "what it is called; shown in logs"),
        "kind": ("one of 'a', 'b' or null", None, ""),
        "sizes": ("a list of integers", [1, 2], ""),
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
                     "a list of strings", "train.max_steps", "train.wandb.mode", "empty string (eval.adapters=)"):
        assert expected in out


def test_every_key_of_the_run_config_has_a_doc_that_points_only_at_what_users_have():
    undocumented = [key for key, _, _, doc in config_keys(Config) if not doc]
    assert undocumented == []
    # The project's spec and the data README are not shipped with the package: --help must not send users there.
    for key, _, _, doc in config_keys(Config):
        assert not any(ref in doc for ref in (".md", "README", "spec/", "shared/")), (key, doc)


@pytest.mark.parametrize("text, first", [
    ("one clause; another. Second sentence.", "one clause; another"),
    ("like this, e.g. [a,b]. More.", "like this, e.g. [a,b]"),
    ("a rank, 0 .. n - 1", "a rank, 0 .. n - 1"),
    ("q in (0, 2]; 1.0 is Shannon.", "q in (0, 2]; 1.0 is Shannon"),
    ("see `x.y` for more. Then", "see `x.y` for more"),
])
def test_first_sentence_keeps_clauses_abbreviations_and_brackets(text, first):
    from perft_jax.config_help import _first_sentence

    assert _first_sentence(text) == first
