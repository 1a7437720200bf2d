"""FLOP audit (issue 13 item 7): the exported bench-small train step does the useful matmul work.

benchmarks/flops.py counts matmul FLOPs in the StableHLO of the bench-small PERFT-R step exported for tpu and
cuda (bfloat16, `moe_backend: auto`) and compares them with 4 N_active + 6 N_adapter per token. Expected:
useful minus layer 0's base backward (nothing trainable sits below layer 0's MoE block, PERFT-R's adapter runs
beside it, so XLA never builds that backward: 2 N_layer0 per token less), plus the kernels' row padding (none
here: 8192 and 4096 routed rows are whole tiles). The count must hit that to
1 %, and `dense` (every expert on every token) must cost more than twice as much.
"""
from __future__ import annotations

import pytest

from benchmarks.flops import audit
from benchmarks.train_step import BENCHES, model_config


def layer0_backward_share(result) -> float:
    cfg = model_config(BENCHES["bench-small"])
    d, hd = cfg.hidden_size, cfg.head_dim
    layer = (d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + d * cfg.num_experts
             + cfg.num_experts_per_tok * 3 * d * cfg.intermediate_size)
    return 2 * layer * result["tokens"] / result["useful"]


@pytest.fixture(scope="module")
def audits() -> dict:
    return {(b, p): audit("bench-small", b, p) for p in ("cuda", "tpu") for b in ("auto", "dense")}


@pytest.mark.usefixtures("cudnn_version")
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_auto_does_the_useful_matmul_work(audits, platform):
    got = audits[("auto", platform)]
    expected = 1 - layer0_backward_share(got)  # 0.899
    assert abs(got["ratio"] - expected) < 0.01, got
    assert got["kernels"] > 0  # the grouped-matmul kernels ran the experts
    # Even if a backend expanded the adapters' ragged_dot composites (cuda: the 32-wide bottleneck is no
    # Hopper tile) into their per-group decomposition, no all-experts work would appear for the base.
    assert got["ratio_if_decomposed"] < 1.1, got
    # Attention apart: full T x S per matmul; the first layer has no backward.
    assert 0.8 * got["attention_full"] < got["attention"] < 1.0 * got["attention_full"], got


@pytest.mark.usefixtures("cudnn_version")
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_no_dense_all_experts_compute_survives(audits, platform):
    auto, dense = audits[("auto", platform)], audits[("dense", platform)]
    assert auto["ratio"] < dense["ratio"] / 2, (auto["ratio"], dense["ratio"])
    # dense runs E / K = 4 times the experts' work: 3 more times their share in the 7 of 8 (forward of 4 layers,
    # backward of 3) that run, 2.625, plus its [T, E] combine contractions.
    extra = (dense["ratio"] - auto["ratio"]) / auto["experts_share"]
    assert 2.55 < extra < 2.75, extra
