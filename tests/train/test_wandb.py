"""The optional W&B logger (`train.wandb`), offline: what the run files hold, resume into one run, a missing package.

A training run logging to W&B is tested with the demo (tests/test_demo.py).
"""
from __future__ import annotations

import sys

import pytest

from perft_jax.errors import UserError
from perft_jax.train.metrics import MetricsWriter
from perft_jax.wandb_logger import RUN_ID_FILE, WandbConfig
from tests.log_readers import offline_wandb, wandb_history

OFFLINE = WandbConfig(mode="offline", project="perft-jax-tests", tags=("test",))


@pytest.fixture(autouse=True)
def _offline(tmp_path):
    with offline_wandb(tmp_path / "wandb_dir"):
        yield


def _rows(run_dir, split):
    """(step, {name: value}) of one split's rows in the run's W&B history."""
    rows = [row for row in wandb_history(run_dir / "wandb") if f"{split}/step" in row]
    return [(row[f"{split}/step"], {k.split("/", 1)[1]: v for k, v in row.items()
                                    if k.startswith(f"{split}/") and k != f"{split}/step"}) for row in rows]


def test_offline_run_files_hold_every_logged_scalar_at_its_split_step(tmp_path):
    with MetricsWriter(tmp_path / "run", tensorboard=False, wandb=OFFLINE, config={"seed": 3}) as writer:
        writer.write(10, {"lm": 2.5, "tokens_per_s": 100}, split="train")
        writer.write(20, {"lm": 2.0, "nan_metric": float("nan")}, split="train")
        writer.write(20, {"lm": 2.25}, split="val")
    assert _rows(tmp_path / "run", "train") == [(10, {"lm": 2.5, "tokens_per_s": 100}), (20, {"lm": 2.0})]
    assert _rows(tmp_path / "run", "val") == [(20, {"lm": 2.25})]


def test_a_second_writer_continues_the_same_run_even_at_an_earlier_step(tmp_path):
    run_dir = tmp_path / "run"
    with MetricsWriter(run_dir, tensorboard=False, wandb=OFFLINE) as writer:
        writer.write(50, {"lm": 1.0}, split="train")
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    with MetricsWriter(run_dir, tensorboard=False, wandb=OFFLINE) as writer:  # e.g. mode=eval after training
        writer.write(30, {"macro_average": 0.75}, split="eval")
    assert (run_dir / RUN_ID_FILE).read_text().strip() == run_id
    runs = list((run_dir / "wandb").glob("offline-run-*"))  # offline-run-<time>-<id>[-<n> within one second]
    assert len(runs) == 2 and all(f"-{run_id}" in p.name for p in runs), runs
    assert _rows(run_dir, "eval") == [(30, {"macro_average": 0.75})]  # not dropped below train's step 50


def test_without_the_package_it_is_one_line_saying_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(UserError, match=r"^train.wandb.mode=offline: the wandb package is not installed; "
                                        r"pip install 'perft-jax\[wandb\]'"):
        MetricsWriter(tmp_path / "run", tensorboard=False, wandb=OFFLINE)
    assert MetricsWriter(tmp_path / "off", tensorboard=False, wandb=WandbConfig()).write(1, {"lm": 1.0}) is None


def test_a_project_is_needed_to_log():
    from perft_jax.config import load_config

    with pytest.raises(UserError, match=r"^train.wandb.project: expected a W&B project name"):
        load_config(None, ["model.hf_config=x.json", "train.wandb.mode=offline", "train.wandb.project="])
