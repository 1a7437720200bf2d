"""Every ```python block of README.md runs, as a user would run it after the demo.

The blocks use the demo's files (what `python train.py` leaves under runs/demo/): `runs/demo/base` (a converted
base with its tokenizer), `runs/demo/base_hf` (the HF directory it was converted from) and
`runs/demo/run/best_adapters` (adapters of the demo's PERFT config). They are prepared once, quickly (adapters
saved untrained, not 500 training steps), and each block runs in a fresh working directory holding a copy, so
a block's own outputs (`hf_export`, `my_adapters`, ...) never meet another's.
"""
from __future__ import annotations

import re
import shutil

import pytest

from perft_jax import demo, save_adapters
from perft_jax.build import build_model
from tests.testing_utils import REPO_ROOT

README = REPO_ROOT / "README.md"


def python_blocks() -> list[tuple[int, str]]:
    """(first line number, source) of each ```python block."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, re.M | re.S)]


BLOCKS = python_blocks()


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    """A folder holding runs/demo/{base, base_hf, run/best_adapters}."""
    root = tmp_path_factory.mktemp("readme")
    demo_dir = root / "runs" / "demo"
    paths = demo.prepare_assets(demo_dir)
    cfg = demo.demo_config(demo_dir, paths, [])
    save_adapters(build_model(cfg.model, cfg.perft, seed=cfg.train.seed), demo_dir / "run" / "best_adapters")
    return root


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 1


@pytest.mark.parametrize("line, source", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs(demo_files, tmp_path, monkeypatch, line, source):
    shutil.copytree(demo_files / "runs", tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    exec(compile(source, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
