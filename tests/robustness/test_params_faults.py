"""Bad configs and arguments for `python -m perft_jax.params` (issue 15): one line naming the file, key or option,
and exit code 2."""
from __future__ import annotations

import pytest

from perft_jax.params import main
from tests.robustness.battery import Tree, call_main, fails_cleanly


@pytest.fixture
def config(run_config):
    return run_config()


@pytest.mark.parametrize("args, culprits", [
    (["train.epoch=1"], ["train.epoch: unknown key"]),
    (["perft.variant=perft_x"], ["perft.variant", "'perft_x'"]),
    (["perft.bottleneck=0"], ["perft.bottleneck", "got 0"]),
    (["--plan", "h900"], ["--plan", "'h900'"]),
    (["--plan", "24XB"], ["--plan", "'24XB'"]),
    (["--devices", "2"], ["--devices: only with --plan"]),
    (["--plan", "h100-80gb", "--devices", "0"], ["--devices", "got 0"]),
    (["--plan", "h100-80gb", "--all-variants"], ["--plan", "--all-variants"]),
])
def test_bad_argument(config, work, capfd, args, culprits):
    before = Tree(work)
    fails_cleanly(call_main(main, ["--config", config, *args], capfd), *culprits, untouched=before)


def test_missing_config(work, capfd):
    fails_cleanly(call_main(main, ["--config", work / "none.yaml"], capfd), work / "none.yaml", "cannot read")


def test_config_that_is_a_directory(work, capfd):
    fails_cleanly(call_main(main, ["--config", work], capfd), work, "cannot read")


def test_config_that_is_not_yaml(work, capfd):
    (work / "bad.yaml").write_text("perft: {variant: perft_r\n")
    fails_cleanly(call_main(main, ["--config", work / "bad.yaml"], capfd), work / "bad.yaml", "invalid YAML")


def test_config_that_is_a_list(work, capfd):
    (work / "list.yaml").write_text("- model\n- perft\n")
    fails_cleanly(call_main(main, ["--config", work / "list.yaml"], capfd), work / "list.yaml", "mapping")


def test_config_that_is_not_utf8(work, capfd):
    (work / "latin1.yaml").write_bytes("perft: {variant: perft_r}  # café\n".encode("latin-1"))
    fails_cleanly(call_main(main, ["--config", work / "latin1.yaml"], capfd), work / "latin1.yaml", "not UTF-8")


def test_base_that_is_not_a_checkpoint(config, work, capfd):
    (work / "empty").mkdir()
    fails_cleanly(call_main(main, ["--config", config, f"model.checkpoint={work / 'empty'}"], capfd),
                  work / "empty", "not a perft-jax base checkpoint")


def test_missing_hf_config(config, work, capfd):
    fails_cleanly(call_main(main, ["--config", config, "model.checkpoint=", f"model.hf_config={work / 'c.json'}"],
                            capfd), "model.hf_config", work / "c.json")


def test_garbled_hf_config(config, work, capfd):
    (work / "config.json").write_text('{"model_type": ')
    fails_cleanly(call_main(main, ["--config", config, "model.checkpoint=", f"model.hf_config={work / 'config.json'}"],
                            capfd), work / "config.json", "unreadable model config")


def test_hf_config_of_an_unsupported_model(config, work, capfd):
    (work / "config.json").write_text('{"model_type": "bert", "vocab_size": 10}')
    fails_cleanly(call_main(main, ["--config", config, "model.checkpoint=", f"model.hf_config={work / 'config.json'}"],
                            capfd), work / "config.json", "bert")
