"""The adapter API on missing, garbled and mismatched directories (issue 15): `perft_jax.load_adapters` and
`perft_jax.save_adapters` raise one UserError line naming the directory or file, change nothing on disk, and
leave the model as it was."""
from __future__ import annotations

import json
import shutil

import pytest

from perft_jax import PerftConfig, init_model, load_adapters, save_adapters
from perft_jax.perft.adapter_configs import CONFIG_NAME, WEIGHTS_NAME
from perft_jax.perft.attach import attach_perft, has_adapters
from tests.robustness.battery import Tree, raises_cleanly
from tests.tiny_models import tiny_model_config

PERFT = PerftConfig(variant="perft_r", bottleneck=8, num_adapters=4, top_k=2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A PERFT-R adapter directory of the tiny OLMoE config."""
    model = attach_perft(init_model(tiny_model_config()), PERFT)
    return save_adapters(model, tmp_path_factory.mktemp("saved") / "adapters")


@pytest.fixture
def adapters(saved, work):
    return shutil.copytree(saved, work / "adapters")


def _refused(adapter_dir, work, *culprits, model=None):
    model = model or init_model(tiny_model_config())
    raises_cleanly(lambda: load_adapters(model, adapter_dir), *culprits, untouched=Tree(work))
    assert not has_adapters(model)  # everything is checked before anything is attached


def test_missing_directory(work):
    _refused(work / "nope", work, work / "nope" / CONFIG_NAME, "missing adapter config")


def test_directory_without_adapter_files(work):
    (work / "other").mkdir()
    (work / "other" / "notes.txt").write_text("not adapters")
    _refused(work / "other", work, work / "other" / CONFIG_NAME, "missing adapter config")


def test_garbled_config(adapters, work):
    (adapters / CONFIG_NAME).write_text('{"perft_jax": {"perft": ')
    _refused(adapters, work, adapters / CONFIG_NAME, "unreadable adapter config")


def test_config_that_is_not_an_object(adapters, work):
    (adapters / CONFIG_NAME).write_text("[1, 2]")
    _refused(adapters, work, adapters / CONFIG_NAME, "expected a JSON object")


def test_config_of_no_known_format(adapters, work):
    (adapters / CONFIG_NAME).write_text('{"r": 8}')
    _refused(adapters, work, adapters / CONFIG_NAME, "not an adapter config")


def _recorded(adapters, **fields):
    """Change PerftConfig fields recorded in the directory's config."""
    raw = json.loads((adapters / CONFIG_NAME).read_text())
    raw["perft_jax"]["perft"].update(fields)
    (adapters / CONFIG_NAME).write_text(json.dumps(raw))


def test_config_with_a_bad_value(adapters, work):
    _recorded(adapters, top_k=9)
    _refused(adapters, work, adapters / CONFIG_NAME, "perft.top_k")


def test_missing_weights(adapters, work):
    (adapters / WEIGHTS_NAME).unlink()
    _refused(adapters, work, adapters / WEIGHTS_NAME, "missing adapter weights file")


def test_truncated_weights(adapters, work):
    weights = adapters / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:200])  # a copy cut short
    _refused(adapters, work, weights, "unreadable safetensors file")


def test_weights_that_are_not_safetensors(adapters, work):
    (adapters / WEIGHTS_NAME).write_bytes(b"PK\x03\x04 a torch zip, say")
    _refused(adapters, work, adapters / WEIGHTS_NAME, "unreadable safetensors file")


def test_weights_of_another_bottleneck(adapters, work):
    _recorded(adapters, bottleneck=16)
    _refused(adapters, work, adapters / WEIGHTS_NAME, "has shape")


def test_adapters_of_another_base(adapters, work):
    wider = init_model(tiny_model_config(hidden_size=64))
    _refused(adapters, work, "base_model", model=wider)


def test_carried_adapters_of_another_config(adapters, work):
    model = attach_perft(init_model(tiny_model_config()), PerftConfig(variant="perft_s", bottleneck=8))
    before = Tree(work)
    raises_cleanly(lambda: load_adapters(model, adapters), adapters / CONFIG_NAME, untouched=before)


def _model_with_adapters():
    return attach_perft(init_model(tiny_model_config()), PERFT)


def test_save_onto_an_existing_directory_without_overwrite(adapters, work):
    raises_cleanly(lambda: save_adapters(_model_with_adapters(), adapters), adapters, "overwrite=True",
                   untouched=Tree(work))


def test_save_over_a_directory_holding_other_files(work):
    (work / "results").mkdir()
    (work / "results" / "eval.json").write_text("{}")
    raises_cleanly(lambda: save_adapters(_model_with_adapters(), work / "results", overwrite=True),
                   work / "results", "eval.json", untouched=Tree(work))


def test_save_onto_a_file(work):
    (work / "taken").write_text("")
    raises_cleanly(lambda: save_adapters(_model_with_adapters(), work / "taken", overwrite=True), work / "taken",
                   "not a directory", untouched=Tree(work))


def test_save_a_model_without_adapters(work):
    raises_cleanly(lambda: save_adapters(init_model(tiny_model_config()), work / "out"), "save_adapters",
                   untouched=Tree(work))


def test_save_with_unserialisable_extra_config(work):
    raises_cleanly(lambda: save_adapters(_model_with_adapters(), work / "out", {"when": object()}),
                   "extra_config", untouched=Tree(work))
