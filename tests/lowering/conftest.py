"""Lowering tests: cuDNN attention traced without JAX's CUDA plugin (benchmarks/flops.py `pretend_cudnn`)."""
from __future__ import annotations

import pytest

from benchmarks.flops import pretend_cudnn


@pytest.fixture
def cudnn_version():
    with pretend_cudnn():
        yield
