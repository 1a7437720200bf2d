"""Fixtures of the fault battery: the demo's tiny converted base (built once per session) and run configs on it."""
from __future__ import annotations

import pathlib
import tempfile

import pytest
import yaml

from perft_jax import demo
from perft_jax.config_parsing import to_dict


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> dict[str, pathlib.Path]:
    """The demo's assets (perft_jax/demo.py): a converted tiny OLMoE base with its tokenizer ("base"), the HF folder
    it came from ("hf"), a training file ("train") and an evaluation folder ("eval_dir"), plus their "root"."""
    root = tmp_path_factory.mktemp("tiny_base")
    return {"root": root, **demo.prepare_assets(root)}


@pytest.fixture
def work(tmp_path, monkeypatch) -> pathlib.Path:
    """This test's folder, also the process's temporary folder (so a temporary file left behind shows in it)."""
    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    return tmp_path


@pytest.fixture
def run_config(tiny_base, work):
    """`write(*overrides)`: a YAML run config of the demo's job on the tiny base, with its run directory at
    `<work>/out/run` (not created); the path of the file."""

    def write(*overrides: str) -> pathlib.Path:
        cfg = demo.demo_config(tiny_base["root"], tiny_base, [
            f"train.output_dir={work / 'out' / 'run'}", "train.progress_bar=false", "train.tensorboard=false",
            "train.max_steps=2", "data.val_set_size=0", *overrides])
        path = work / "run.yaml"
        path.write_text(yaml.safe_dump(to_dict(cfg)))
        return path

    return write
