"""Every shipped config parses, validates, and carries the paper's setup (spec/PERFT.md §7)."""
from __future__ import annotations

import pytest
from testing_utils import CONFIGS

from perft_jax.config import Config, load_config, read_config_data
from perft_jax.config_parsing import from_dict

TRAIN_CONFIGS = sorted(p for p in (CONFIGS / "train").glob("*.yaml") if p.name != "commonsense.yaml")


def test_a_config_per_model_and_variant():
    names = {p.stem for p in TRAIN_CONFIGS}
    for model in ("olmoe-1b-7b", "mixtral-8x7b"):
        for variant in ("perft-s", "perft-d", "perft-r", "perft-e", "qv-lora", "perft-r-dynmole"):
            assert f"{model}-{variant}" in names


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.stem)
def test_training_config_has_the_papers_hyper_parameters(path):
    cfg = from_dict(Config, read_config_data(path), "")  # the checkpoint itself need not exist here
    olmoe = path.stem.startswith("olmoe")
    want_lr = 2e-5 if not olmoe or path.stem.endswith("qv-lora") else 1e-5
    assert cfg.optim.learning_rate == want_lr
    assert (cfg.optim.warmup_steps, cfg.optim.schedule, cfg.optim.grad_clip_norm) == (100, "linear", 1.0)
    assert (cfg.train.epochs, cfg.train.eval_every_steps, cfg.data.val_set_size) == (3, 80, 120)
    assert (cfg.data.batch_size, cfg.data.cutoff_len, cfg.data.train_on_inputs) == (16, 256, True)
    assert cfg.model.dtype == "bfloat16" and cfg.model.adapter_dtype == "float32"
    assert cfg.model.checkpoint and not cfg.model.hf_config
    assert cfg.eval.num_beams == 4 and len(cfg.eval.benchmarks) == 7
    if "dynmole" in path.stem:
        assert cfg.perft.router == "dynmole"


def test_demo_config_is_what_train_py_runs_without_arguments(tmp_path):
    from perft_jax import demo

    paths = {"train": tmp_path / "train.json", "eval_dir": tmp_path / "eval", "base": tmp_path / "base"}
    cfg = demo.demo_config(tmp_path, paths, ["perft.top_k=1"])
    assert cfg.perft.variant == "perft_r" and cfg.perft.top_k == 1
    assert cfg.model.checkpoint == str(tmp_path / "base")


def test_include_cycles_and_missing_files_are_named(tmp_path):
    (tmp_path / "a.yaml").write_text("include: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("include: [a.yaml]\n")
    (tmp_path / "c.yaml").write_text("include: [nope.yaml]\n")
    from perft_jax import UserError

    with pytest.raises(UserError, match="include cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(UserError, match="include: no such file 'nope.yaml'"):
        load_config(tmp_path / "c.yaml")
