"""Config values as users write them: one path where a list of paths is expected, and empty-string overrides."""
from __future__ import annotations

import pytest
import yaml

from perft_jax.config import load_config
from perft_jax.errors import UserError

BASE = ["model.hf_config=configs/hf/olmoe-1b-7b.json"]  # any valid model section; nothing is read here


def test_a_single_path_on_the_command_line_is_a_one_element_list():
    cfg = load_config(None, [*BASE, "data.train_files=path/train.json", "eval.benchmarks=boolq",
                             "eval.data_dir=data/eval"])
    assert cfg.data.train_files == ("path/train.json",)
    assert cfg.eval.benchmarks == ("boolq",)
    assert load_config(None, [*BASE, "data.train_files=[a.json,b.json]"]).data.train_files == ("a.json", "b.json")


def test_a_single_path_in_yaml_is_a_one_element_list_resolved_beside_the_file(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text("[]")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"hf_config": "hf.json"}, "data": {"train_files": "data/train.json"}}))
    assert load_config(config).data.train_files == (str(tmp_path / "data" / "train.json"),)


def test_a_single_value_is_no_list_of_other_types():
    with pytest.raises(UserError, match=r"data.length_buckets: expected a list of integers, got 128"):
        load_config(None, [*BASE, "data.length_buckets=128"])


def test_an_empty_override_is_the_empty_string():
    cfg = load_config(None, [*BASE, "eval.adapters=", 'model.tokenizer=""', "train.wandb.mode="])
    assert (cfg.eval.adapters, cfg.model.tokenizer, cfg.train.wandb.mode) == ("", "", "")
    assert load_config(None, [*BASE, "model.dtype=null"]).model.dtype is None


def test_an_empty_override_of_a_non_string_key_is_one_line_naming_it():
    with pytest.raises(UserError, match=r"^model.dtype: expected one of 'float32', 'bfloat16' or null, got ''$"):
        load_config(None, [*BASE, "model.dtype="])
    with pytest.raises(UserError, match=r"^train.max_steps: expected an integer, got ''$"):
        load_config(None, [*BASE, "train.max_steps="])
