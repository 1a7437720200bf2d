"""Proof that the steps lower for GPU and TPU (issue 13 item 6), with `jax.export` on CPU (no device needed).

One device: the jitted train step of PERFT-R, PERFT-E and qv_lora on OLMoE- and Mixtral-shaped tiny configs
(head_dim 128, 128 tokens, bfloat16, so that the attention and grouped-matmul kernels apply), the validation
step and generation (greedy, beam search), exported for cuda and tpu with `moe_backend: auto`; the module must
hold the platform's kernels. On an expert-sharded (data 2, expert 4) mesh of 8 simulated CPU devices
(`export_worker.py`, one fresh interpreter): the train and validation steps with the `ring` and the real
`ragged_a2a` dispatch around the `kernel` and `ragged` backends, with XLA attention (export_worker.py says why).
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from tiny_models import tiny_model_config

from benchmarks.flops import abstract_train_step, export
from perft_jax.eval import generate as gen
from perft_jax.models.decoder import MoeForCausalLM
from perft_jax.perft.attach import attach_perft
from perft_jax.perft.config import PerftConfig
from perft_jax.train.step import eval_step_fn

WORKER = pathlib.Path(__file__).with_name("export_worker.py")
VARIANTS = {"perft_r": PerftConfig(variant="perft_r", num_adapters=4, top_k=2),
            "perft_e": PerftConfig(variant="perft_e"),
            "qv_lora": PerftConfig(variant="qv_lora")}
# The platform's attention kernel and grouped-matmul kernel (megablox is a tpu_custom_call named "kernel").
ATTENTION = {"cuda": "__cudnn$fmhaScaleBiasSoftmaxBackward", "tpu": 'kernel_name = "splash_mha_dq'}
FORWARD_ATTENTION = {"cuda": "__cudnn$fmhaScaleBiasSoftmax", "tpu": 'kernel_name = "splash_mha_fwd'}
GMM = {"cuda": "mosaic_gpu", "tpu": 'kernel_name = "kernel"'}
LENGTH = 128


def config(arch: str):
    # hidden 128, intermediate 64: the Hopper kernel's 64-wide tiles divide every expert matmul.
    return tiny_model_config(arch, head_dim=128, hidden_size=128, intermediate_size=64, num_experts=8,
                             dtype="bfloat16", param_dtype="bfloat16")


@pytest.mark.usefixtures("cudnn_version")
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", ["olmoe", "mixtral"])
def test_train_step_exports(arch, variant, platform):
    fn, args = abstract_train_step(config(arch), VARIANTS[variant], 2, LENGTH)
    exported = export(fn, platform, *args)
    text = exported.mlir_module()
    assert exported.platforms == (platform,)
    assert ATTENTION[platform] in text
    assert GMM[platform] in text  # the base experts' grouped matmul
    other = "tpu_custom_call" if platform == "cuda" else "__cudnn"
    assert other not in text


@pytest.fixture(scope="module")
def eval_model():
    cfg = config("olmoe")
    model = nnx.eval_shape(lambda: attach_perft(MoeForCausalLM(cfg, nnx.Rngs(0)), VARIANTS["perft_r"]))
    graphdef, state = nnx.split(nnx.view(model, only=nnx.Dropout, deterministic=True, raise_if_not_found=False))
    return cfg, graphdef, state


@pytest.mark.usefixtures("cudnn_version")
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_validation_step_exports(eval_model, platform):
    cfg, graphdef, state = eval_model
    tokens = {k: jax.ShapeDtypeStruct((2, LENGTH), jnp.int32) for k in ("input_ids", "labels", "attention_mask")}
    text = export(lambda s, b: eval_step_fn(graphdef, s, b, cfg, VARIANTS["perft_r"]), platform, state,
                  tokens).mlir_module()
    assert GMM[platform] in text and FORWARD_ATTENTION[platform] in text


@pytest.mark.usefixtures("cudnn_version")
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("num_beams", [1, 2])
def test_generation_exports(eval_model, platform, num_beams):
    _, graphdef, state = eval_model
    ids = jax.ShapeDtypeStruct((2, LENGTH), jnp.int32)
    scalars = (jax.ShapeDtypeStruct((), jnp.int32),) * 2
    if num_beams == 1:
        fn = lambda s, i, m, e, p: gen._greedy(graphdef, s, i, m, e, p, max_new_tokens=4)  # noqa: E731
        args = (state, ids, ids, *scalars)
    else:
        flags = (jax.ShapeDtypeStruct((), jnp.bool_),) * 2 + (jax.ShapeDtypeStruct((), jnp.float32),)
        fn = lambda s, i, m, e, p, a, b, c: gen._beam_search(graphdef, s, i, m, e, p, a, b, c,  # noqa: E731
                                                              max_new_tokens=4, num_beams=num_beams)
        args = (state, ids, ids, *scalars, *flags)
    text = export(fn, platform, *args).mlir_module()
    assert "stablehlo.while" in text and GMM[platform] in text  # the decode loop; prefill's experts on the kernel


@pytest.fixture(scope="module")
def mesh_report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("export") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], env=env, capture_output=True, text=True,
                          timeout=600)  # about 30 s
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


MESH_CASES = [f"{b} {d} {s} {p}" for b in ("kernel", "ragged") for d in ("ring", "ragged_a2a")
              for s in ("train", "eval") for p in ("cuda", "tpu")]
KERNEL = {"cuda": "mosaic_gpu", "tpu": "tpu_custom_call"}


@pytest.mark.parametrize("case", MESH_CASES)
def test_mesh_step_exports(mesh_report, case):
    got = mesh_report[case]
    assert got["ok"], got
    assert got["devices"] == 8
    marks = got["marks"]
    # The local experts' grouped matmul (the platform's kernel, or XLA's), not a dense all-experts einsum.
    assert marks[KERNEL[case.split()[-1]] if case.startswith("kernel ") else "chlo.ragged_dot"] > 0
    if " ring " in case:
        assert marks["all_gather"] > 0 and marks["reduce_scatter"] > 0 and marks["ragged_all_to_all"] == 0
    else:
        assert marks["ragged_all_to_all"] > 0
