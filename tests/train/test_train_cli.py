"""`train.py` as users run it: exact resume after kill -9, SIGTERM, divergence, and one-line input errors."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from perft_jax import demo
from perft_jax.config_parsing import to_dict
from perft_jax.train.loop import run_training

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS = 10


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return root, demo.prepare_assets(root)


def _config_file(assets, run_dir: pathlib.Path, *overrides: str) -> pathlib.Path:
    root, paths = assets
    cfg = demo.demo_config(root, paths, [f"train.output_dir={run_dir}", f"train.max_steps={STEPS}",
                                         "train.eval_every_steps=5", "train.progress_bar=false",
                                         "train.tensorboard=false", "checkpoint.every_steps=1",
                                         "perft.dropout=0.1", *overrides])
    data = to_dict(cfg)
    data.pop("eval")
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _train(config: pathlib.Path, *extra: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config", str(config), *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _wait_for_checkpoint(run_dir: pathlib.Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(p.name) for p in (run_dir / "checkpoints").glob("[0-9]*") if p.name.isdigit()]
        if steps and max(steps) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended early: {proc.communicate()}")
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint {step} within {timeout}s")


def _adapters(run_dir: pathlib.Path) -> dict:
    return load_file(str(run_dir / "adapters" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    config = _config_file(assets, run_dir)
    from perft_jax.config import load_config

    run_training(load_config(config))
    return _adapters(run_dir)


def test_kill_9_and_restart_ends_bit_identical(assets, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    config = _config_file(assets, run_dir)
    proc = _train(config)
    _wait_for_checkpoint(run_dir, 4, proc)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up or save
    proc.wait()
    again = _train(config)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert "resumed from step" in out
    got = _adapters(run_dir)
    assert sorted(got) == sorted(uninterrupted)
    for key in got:
        np.testing.assert_array_equal(got[key], uninterrupted[key], err_msg=key)


def test_sigterm_saves_a_checkpoint_and_exits_0(assets, tmp_path):
    run_dir = tmp_path / "run"
    proc = _train(_config_file(assets, run_dir, "checkpoint.every_steps=1000"))
    deadline = time.time() + 240
    while not (run_dir / "metrics.jsonl").exists() and time.time() < deadline:  # training has started
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    if "stopped by signal" in out:  # the signal arrived during training (not after it ended)
        step = int(out.split("stopped by signal at step ")[1].split(";")[0])
        assert (run_dir / "checkpoints" / str(step)).is_dir()


def test_diverging_loss_stops_with_the_last_good_checkpoint(assets, tmp_path):
    run_dir = tmp_path / "run"
    proc = _train(_config_file(assets, run_dir, "optim.learning_rate=1e30", "optim.warmup_steps=0",
                               "optim.grad_clip_norm=0"))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, (out[-2000:], err[-2000:])
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: loss became") and "last good checkpoint" in line
    good = [int(p.name) for p in (run_dir / "checkpoints").glob("[0-9]*")]
    assert good and max(good) < STEPS  # stopped early; what was saved before is still there


@pytest.mark.parametrize("override, message", [
    ("perft.top_k=9", "perft.top_k: expected an integer in [1, num_adapters=4], got 9"),
    ("train.epoch=2", "train.epoch: unknown key"),
    ("data.cutoff_len=0", "data.cutoff_len: expected a positive integer, got 0"),
])
def test_bad_config_is_one_line_and_exit_2(assets, tmp_path, override, message):
    proc = _train(_config_file(assets, tmp_path / "run"), override)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 2
    assert err.strip().count("\n") == 0 and message in err, err


def test_malformed_row_names_file_and_row(assets, tmp_path):
    rows = json.loads(pathlib.Path(assets[1]["train"]).read_text())[:50]
    rows[7]["output"] = 42
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rows))
    proc = _train(_config_file(assets, tmp_path / "run"), f"data.train_files=[{bad}]")
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, err[-2000:]
    line = err.strip().splitlines()[-1]  # above it: the data loaders' progress bars
    assert line.startswith("error: ") and "bad.json: row 7: 'output' must be a string" in line, line
