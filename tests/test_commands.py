"""The installed commands and `python -m perft_jax`: one table, every command's --help, files users have."""
from __future__ import annotations

import importlib.util
import pathlib
import re
import runpy
import subprocess
import sys
import tomllib

import pytest

from perft_jax import cli, params
from perft_jax.config import Config
from perft_jax.config_help import config_keys
from tests.testing_utils import CONFIGS, REPO_ROOT

# Spellings of the project's own spec and data notes, which users of the package do not have.
UNSHIPPED = ("shared/", "spec/", "PERFT.md", "DYNMOLE.md", "README §")


def _help(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_the_dispatch_table_is_pyprojects_console_scripts():
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {f"perft-{name}": target for name, (target, _) in cli.COMMANDS.items()}


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_has_help_through_python_m_perft_jax(capsys, name):
    module = cli.COMMANDS[name][0].split(":")[0]
    if importlib.util.find_spec(module) is None:  # perft_jax.generate_cli lands with the generation work
        pytest.skip(f"{module} is not written yet")
    out = _help(capsys, cli.main, [name, "--help"])
    assert out.startswith("usage: ") and "--help" in out


def test_python_m_perft_jax_lists_the_commands(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["perft_jax", "--help"])
    out = _help(capsys, lambda _: runpy.run_module("perft_jax", run_name="__main__"), None)
    for name in cli.COMMANDS:
        assert re.search(rf"^  {name} .*\(perft-{name}\)$", out, re.M), out


# In process, runpy re-runs the already imported perft_jax.cli as __main__ (what `python -m` does in a fresh one).
@pytest.mark.filterwarnings("ignore:'perft_jax.cli' found in sys.modules:RuntimeWarning")
def test_python_m_perft_jax_cli_is_the_same_dispatcher(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cli", "--help"])
    out = _help(capsys, lambda _: runpy.run_module("perft_jax.cli", run_name="__main__"), None)
    assert "COMMAND" in out and "perft-train" in out


@pytest.mark.parametrize("argv", [[], ["bogus"]])
def test_a_missing_or_unknown_command_is_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_eval_help_lists_every_config_key_and_how_to_write_values(capsys):
    out = _help(capsys, cli.eval_main, ["--help"])
    assert out.startswith("usage: perft-eval ")
    for key, tp, _, doc in config_keys(Config):
        assert f"  {key} " in out and tp in out
    assert "data.train_files=data/train.json" in out and "eval.adapters=" in out


def test_eval_refuses_a_training_mode(capsys):
    assert cli.eval_main(["mode=train"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: mode=train: perft-eval evaluates (mode=eval); train with perft-train"


def test_params_help_is_complete_and_points_only_at_shipped_files(capsys):
    out = _help(capsys, params.main, ["--help"])
    assert out.startswith("usage: perft-params ")
    for flag in ("--config", "--all-variants", "--plan", "--devices"):
        assert flag in out
    for key in ("model.checkpoint", "model.hf_config", "perft.variant", "perft.dynmole.top_p", "mesh.expert",
                "data.batch_size", "data.cutoff_len"):
        assert f"  {key} " in out
    assert "  optim.learning_rate " not in out  # not read by perft-params; perft-train --help lists it
    assert not any(ref in out for ref in UNSHIPPED), out


def test_params_report_points_only_at_shipped_files(capsys):
    for argv in ([], ["--all-variants"]):
        assert params.main(["--config", str(CONFIGS / "perft" / "olmoe-1b-7b-perft-r.yaml"), *argv]) == 0
        out = capsys.readouterr().out
        assert "activated" in out and not any(ref in out for ref in UNSHIPPED), out


def test_shipped_configs_and_train_py_name_only_files_users_have():
    for path in CONFIGS.rglob("*.yaml"):
        text = path.read_text()
        assert not any(ref in text for ref in UNSHIPPED), path
    named = re.findall(r"configs/\S+\.yaml", (REPO_ROOT / "train.py").read_text())
    assert named and all((REPO_ROOT / name).is_file() for name in named), named


def test_the_installed_perft_train_lists_its_config_keys():
    script = pathlib.Path(sys.executable).parent / "perft-train"  # pip puts console scripts beside the interpreter
    assert script.is_file(), "perft-train is not installed: pip install -e . installs the console scripts"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: perft-train ") and "  train.wandb.mode " in proc.stdout
