"""Fixtures of the PyTorch-runtime tests: tiny random HF OLMoE / Mixtral models and their perft_jax conversions.

The whole folder needs torch (perft_jax.pytorch imports it at its top): without torch it is not collected.
"""
from __future__ import annotations

import importlib.util
import pathlib

import pytest
from tiny_models import build_hf_model, save_hf_model

from perft_jax import load_model
from perft_jax.convert.hf_to_jax import convert_hf_to_jax

collect_ignore_glob = [] if importlib.util.find_spec("torch") else ["test_*.py"]

ARCHS = ("olmoe", "mixtral")


@pytest.fixture(scope="session")
def tiny_bases(tmp_path_factory):
    """arch -> (HF float32 model in eval mode, its converted perft_jax checkpoint, that checkpoint restored),
    built once per session; callers copy the models before changing them (`copy.deepcopy`, `nnx.clone`)."""
    cache: dict[str, tuple[object, pathlib.Path, object]] = {}

    def get(arch: str):
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"torch_{arch}")
            hf = build_hf_model(arch, seed=3)
            convert_hf_to_jax(save_hf_model(hf, root / "hf"), root / "ckpt", show_progress=False)
            cache[arch] = (hf, root / "ckpt", load_model(root / "ckpt"))
        return cache[arch]

    return get
