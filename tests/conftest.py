"""Shared pytest fixtures and policies for the perft-jax test suite.

Numerics: float32 matmuls run at full precision so parity tolerances mean what they say
(on CPU this is already the case; on GPU/TPU the default would be TF32/bf16 passes).
"""
from __future__ import annotations

import gc
import os
import pathlib

import jax
import pytest

from benchmarks.flops import pretend_cudnn

jax.config.update("jax_default_matmul_precision", "float32")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# ../shared beside the checkout holds real data and tokenizers. Users do not have it, so tests that
# need it skip; CI sets PERFT_REQUIRE_SHARED=1 to turn that skip into a failure.
SHARED_DIR = pathlib.Path(os.environ.get("PERFT_SHARED_DIR", REPO_ROOT.parent / "shared"))


def _require_shared() -> bool:
    return os.environ.get("PERFT_REQUIRE_SHARED", "") not in ("", "0", "false")


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """After each test module, drop JAX's compiled programs. Each one kept alive holds a few memory maps of JIT
    code; a thousand tests in one process reached Linux's 65530-map limit (`vm.max_map_count`), and the next
    compilation died in a segmentation fault inside XLA."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """Path of ../shared; skips the test when absent (fails instead under PERFT_REQUIRE_SHARED=1)."""
    if not SHARED_DIR.is_dir():
        reason = f"needs the shared data folder {SHARED_DIR} (absent on user machines)"
        if _require_shared():
            pytest.fail(f"PERFT_REQUIRE_SHARED=1 but {reason}")
        pytest.skip(reason)
    return SHARED_DIR


@pytest.fixture(scope="session")
def torch_required():
    """Skip tests that compare against HF PyTorch when torch is not installed."""
    return pytest.importorskip("torch", reason="HF parity tests need torch (pip install -e '.[test]')")


@pytest.fixture
def cudnn_version():
    """cuDNN attention traced (and lowered for cuda) without JAX's CUDA plugin: benchmarks/flops.py `pretend_cudnn`
    fakes the version query the plugin would answer; with the plugin, the real version is used."""
    with pretend_cudnn():
        yield
