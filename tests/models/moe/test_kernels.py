"""Grouped matmul kernels (models/moe/kernels.py): every implementation that runs on CPU against a per-group loop,
forward and gradients; the dispatch against `dense_dispatch`; and what the frozen base's backward lowers to.

What runs here: `xla`; `megablox` in Pallas interpret mode; `mosaic_gpu`'s forward kernel in JAX's GPU
interpret mode (its backward, rhs read transposed, is not interpretable in jax 0.10.2: strict xfail below).
What lowers without a device (jax.export): megablox for TPU (`tpu_custom_call`), forward and backward;
the Hopper kernel for CUDA (`mosaic_gpu_v2`), forward and d lhs; d rhs for CUDA falls back to XLA's
`chlo.ragged_dot`, because the transposed Hopper kernel reads jax.devices()[0].core_count while tracing.
"""
from __future__ import annotations

import contextlib
import functools
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from perft_jax.models.moe import experts, grouped, kernels
from perft_jax.models.moe.experts import dense_dispatch
from tests.testing_utils import lowered_ops_shaped

# (group sizes, K, N): empty groups first / middle / last, rows past the last group, widths that are no
# multiple of any tile, and widths over the 128-wide megablox tiles with remainders.
CASES = [
    ([0, 13, 0, 7, 20, 0], 24, 20),  # 40 rows in groups, M = 50
    ([37], 8, 12),
    ([5, 0, 0, 33], 136, 130),
]
CPU_IMPLS = [("xla", False), ("megablox", True)]
MGPU_KERNEL = "mpmd_map["  # how a Mosaic-GPU `plgpu.kernel` call shows in a jaxpr (jax 0.10.2)
BF16_RTOL = 2.0 ** -8  # one bfloat16 rounding of the result (inputs are bf16-exact, accumulation float32)


def _bf16_exact(a: np.ndarray) -> np.ndarray:
    return a.astype(ml_dtypes.bfloat16).astype(np.float32)


def _problem(sizes, k, n, seed=0, extra_rows=10):
    rng = np.random.default_rng(seed)
    m = sum(sizes) + extra_rows
    lhs, rhs = rng.normal(size=(m, k)), rng.normal(size=(len(sizes), k, n)) / np.sqrt(k)
    cotangent = rng.normal(size=(m, n))
    return (_bf16_exact(a) for a in (lhs, rhs, cotangent))


def loop_gmm(lhs, rhs, sizes):
    """Group g's rows times rhs[g], one group at a time; rows past the groups zero."""
    out, start = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32), 0
    for g, size in enumerate(sizes):
        out = out.at[start:start + size].set(lhs[start:start + size] @ rhs[g])
        start += size
    return out


def _loss(fn, cotangent):
    return lambda lhs, rhs: jnp.sum(fn(lhs, rhs).astype(jnp.float32) * cotangent)


def _check(impl, interpret, sizes, k, n, dtype, rtol, atol):
    lhs, rhs, cotangent = _problem(sizes, k, n)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    run = lambda a, b: kernels.gmm(a, b, group_sizes, impl=impl, interpret=interpret)  # noqa: E731
    out = jax.jit(run)(jnp.asarray(lhs, dtype), jnp.asarray(rhs, dtype))
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), loop_gmm(lhs, rhs, sizes), rtol=rtol, atol=atol)
    assert not np.asarray(out[sum(sizes):]).any()  # rows past the last group: zeros, not garbage

    grads = jax.jit(jax.grad(_loss(run, cotangent), argnums=(0, 1)))(jnp.asarray(lhs, dtype), jnp.asarray(rhs, dtype))
    ref = jax.grad(_loss(lambda a, b: loop_gmm(a, b, sizes), cotangent), argnums=(0, 1))(lhs, rhs)
    for got, want in zip(grads, ref):
        assert got.dtype == dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=rtol, atol=atol)
    assert not np.asarray(grads[0][sum(sizes):]).any()


@pytest.mark.parametrize("impl,interpret", CPU_IMPLS)
@pytest.mark.parametrize("sizes,k,n", CASES)
def test_gmm_float32_equals_loop(impl, interpret, sizes, k, n):
    _check(impl, interpret, sizes, k, n, jnp.float32, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl,interpret", CPU_IMPLS)
@pytest.mark.parametrize("sizes,k,n", CASES[:2])
def test_gmm_bfloat16_equals_loop(impl, interpret, sizes, k, n):
    _check(impl, interpret, sizes, k, n, jnp.bfloat16, rtol=BF16_RTOL, atol=1e-5)


def test_auto_runs_xla_on_cpu():
    lhs, rhs, _ = _problem(*CASES[0])
    sizes = jnp.asarray(CASES[0][0], jnp.int32)
    np.testing.assert_array_equal(kernels.gmm(lhs, rhs, sizes), kernels.gmm(lhs, rhs, sizes, impl="xla"))


def test_mosaic_gpu_falls_back_to_xla_where_its_kernel_does_not_apply():
    """float32 (wgmma would compute tf32) and widths off its tiles go through XLA: exact here, no kernel."""
    lhs, rhs, _ = _problem(*CASES[0])
    sizes = jnp.asarray(CASES[0][0], jnp.int32)
    out = kernels.gmm(lhs, rhs, sizes, impl="mosaic_gpu")
    np.testing.assert_allclose(out, loop_gmm(lhs, rhs, CASES[0][0]), rtol=1e-5, atol=1e-5)
    jaxpr = str(jax.make_jaxpr(lambda a, b: kernels.gmm(a, b, sizes, impl="mosaic_gpu"))(lhs, rhs))
    assert MGPU_KERNEL not in jaxpr and "ragged_dot_general" in jaxpr


@contextlib.contextmanager
def _gpu_interpret():
    """JAX's GPU interpret mode (private in jax 0.10.2); after a failed kernel its state must be reset."""
    params = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params")
    state = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call")
    try:
        with params.force_gpu_interpret_mode():
            yield
    except Exception:
        state.reset_gpu_interpret_mode_state()
        raise


def test_mosaic_gpu_forward_kernel_in_interpret_mode():
    sizes, k, n = [0, 50, 0, 90], 64, 128  # M = 150: padded to the 64-row tile inside
    lhs, rhs, _ = _problem(sizes, k, n)
    lhs, rhs = jnp.asarray(lhs, jnp.bfloat16), jnp.asarray(rhs, jnp.bfloat16)
    run = lambda a, b: kernels.gmm(a, b, jnp.asarray(sizes, jnp.int32), impl="mosaic_gpu")  # noqa: E731
    assert MGPU_KERNEL in str(jax.make_jaxpr(run)(lhs, rhs))
    with _gpu_interpret():
        out = run(lhs, rhs)
    want = loop_gmm(np.asarray(lhs, np.float32), np.asarray(rhs, np.float32), sizes)
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=BF16_RTOL, atol=1e-5)
    assert not np.asarray(out[sum(sizes):], np.float32).any()


@pytest.mark.xfail(strict=True, raises=jax.errors.JaxRuntimeError,
                   reason="jax 0.10.2 GPU interpreter: wgmma on a transposed SMEM ref, "
                          "AttributeError: 'TransposeTransform' object has no attribute 'indices'")
def test_mosaic_gpu_input_gradient_in_interpret_mode():
    sizes, k, n = [0, 50, 0, 90], 64, 128
    lhs, rhs, cotangent = _problem(sizes, k, n)
    run = lambda a, b: kernels.gmm(a, b, jnp.asarray(sizes, jnp.int32), impl="mosaic_gpu")  # noqa: E731
    with _gpu_interpret():
        grad = jax.grad(_loss(run, cotangent))(jnp.asarray(lhs, jnp.bfloat16), jnp.asarray(rhs, jnp.bfloat16))
    want = jax.grad(_loss(lambda a, b: loop_gmm(a, b, sizes), cotangent))(lhs, rhs)
    np.testing.assert_allclose(np.asarray(grad, np.float32), want, rtol=BF16_RTOL, atol=1e-5)


# ---- dispatch ----------------------------------------------------------------------------------------------

T, D, I, E, K = 40, 16, 8, 6, 2


def _routing(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = _bf16_exact(rng.normal(size=(T, D)))
    weights = _bf16_exact(rng.random(size=(T, K)))
    indices = np.minimum(rng.geometric(0.35, size=(T, K)) - 1, E - 2).astype(np.int32)  # skewed, expert 5 empty
    gate_up = _bf16_exact(rng.normal(size=(E, D, 2 * I)) / np.sqrt(D))
    down = _bf16_exact(rng.normal(size=(E, I, D)) / np.sqrt(I))
    valid = rng.random(size=(T, K)) < 0.7
    cast = lambda *arrays: [jnp.asarray(a, dtype) for a in arrays]  # noqa: E731
    return cast(x, weights), indices, cast(gate_up, down), valid


@pytest.mark.parametrize("impl,interpret", CPU_IMPLS)
@pytest.mark.parametrize("with_valid", [False, True])
def test_dispatch_equals_dense_with_gradients(impl, interpret, with_valid):
    (x, weights), indices, (gate_up, down), valid = _routing()
    valid = jnp.asarray(valid) if with_valid else None
    dispatch = kernels.make_kernel_dispatch(impl, interpret)

    def loss(fn):
        return lambda *a: jnp.sum(jnp.sin(fn(a[0], a[1], indices, a[2], a[3], valid, capacity_factor=1.0)[0]))

    y, dropped = jax.jit(lambda *a: dispatch(*a, capacity_factor=1.0))(x, weights, indices, gate_up, down, valid)
    want, _ = dense_dispatch(x, weights, indices, gate_up, down, valid)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    assert int(dropped) == 0
    grads = jax.jit(jax.grad(loss(dispatch), argnums=(0, 1, 2, 3)))(x, weights, gate_up, down)
    ref = jax.grad(loss(dense_dispatch), argnums=(0, 1, 2, 3))(x, weights, gate_up, down)
    for got, want in zip(grads, ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl,interpret", CPU_IMPLS)
def test_dispatch_bfloat16_equals_dense(impl, interpret):
    (x, weights), indices, (gate_up, down), valid = _routing(dtype=jnp.bfloat16)
    valid = jnp.asarray(valid)
    y, _ = kernels.make_kernel_dispatch(impl, interpret)(x, weights, indices, gate_up, down, valid, capacity_factor=1.0)
    want, _ = dense_dispatch(x, weights, indices, gate_up, down, valid)
    assert y.dtype == jnp.bfloat16
    # Both round hidden activations and output to bf16, the routing weight applied at different places: here
    # 1 ulp apart (0.0078 at |y| ~ 1.5), as grouped_dispatch is.
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("impl,interpret", CPU_IMPLS)
def test_routed_ffn_equals_grouped_ffn_with_a_nowhere_group(impl, interpret):
    """The shared routed-pipeline contract (grouped.grouped_ffn): pairs of group G (a caller's "nowhere" group,
    num_groups = G + 1) compute nothing; forward and gradients of everything, the weights included."""
    (x, weights), indices, (gate_up, down), valid = _routing()
    indices = jnp.where(jnp.asarray(valid), indices, E)

    def loss(ffn):
        hidden = lambda rows, project: jnp.tanh(project(rows))  # noqa: E731
        return lambda *a: jnp.sum(jnp.sin(ffn(a[0], a[1], indices, a[2][..., :I], a[3], hidden, E + 1)))

    ffn = functools.partial(kernels.routed_ffn, impl=impl, interpret=interpret)
    value, grads = jax.jit(jax.value_and_grad(loss(ffn), argnums=(0, 1, 2, 3)))(x, weights, gate_up, down)
    want, ref = jax.value_and_grad(loss(grouped.grouped_ffn), argnums=(0, 1, 2, 3))(x, weights, gate_up, down)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    for got, want in zip(grads, ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---- the frozen base's backward ----------------------------------------------------------------------------

# Not megablox in interpret mode: its emulation copies every operand into a buffer of the operand's shape, which
# says nothing of the TPU program; there the kernel count does (test_weight_gradient_lowering_per_platform).
@pytest.mark.parametrize("impl,interpret", [("xla", False), ("auto", False)])
def test_weight_gradient_only_when_weights_are_differentiated(impl, interpret):
    lhs, rhs, cotangent = _problem(*CASES[0])
    sizes = jnp.asarray(CASES[0][0], jnp.int32)
    loss = _loss(lambda a, b: kernels.gmm(a, b, sizes, impl=impl, interpret=interpret), cotangent)
    frozen, trained = jax.grad(loss, argnums=0), jax.grad(loss, argnums=(0, 1))
    assert lowered_ops_shaped(frozen, (lhs, rhs), rhs.shape) == 0  # nothing weight-sized for a frozen rhs
    assert lowered_ops_shaped(trained, (lhs, rhs), rhs.shape) > 0


def test_frozen_experts_dispatch_has_no_expert_sized_gradient():
    (x, weights), indices, (gate_up, down), _ = _routing()
    dispatch = kernels.make_kernel_dispatch("xla")

    def loss(x, weights, gate_up, down):
        return jnp.sum(dispatch(x, weights, indices, gate_up, down, capacity_factor=1.0)[0] ** 2)

    args = (x, weights, gate_up, down)
    frozen, trained = jax.grad(loss, argnums=(0, 1)), jax.grad(loss, argnums=(0, 2, 3))
    assert lowered_ops_shaped(frozen, args, gate_up.shape) == lowered_ops_shaped(frozen, args, down.shape) == 0
    assert lowered_ops_shaped(trained, args, gate_up.shape) > 0 and lowered_ops_shaped(trained, args, down.shape) > 0


def _exported(fn, platform, *args) -> str:
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    return jax.export.export(jax.jit(fn), platforms=[platform])(*specs).mlir_module()


def _custom_calls(text: str) -> dict[str, int]:
    calls = re.findall(r"stablehlo\.custom_call @([\w$.]+)", text)
    return {name: calls.count(name) for name in set(calls)} | {"chlo.ragged_dot": text.count('"chlo.ragged_dot"')}


# Kernel-sized problem: widths on the Hopper kernel's tiles, bf16.
M, KD, N, G = 256, 128, 256, 4
_ARGS = (jnp.zeros((M, KD), jnp.bfloat16), jnp.zeros((G, KD, N), jnp.bfloat16), jnp.zeros((G,), jnp.int32))


def _gmm_loss(lhs, rhs, sizes):
    return jnp.sum(kernels.gmm(lhs, rhs, sizes).astype(jnp.float32) ** 2)


@pytest.mark.parametrize("platform,kernel", [("tpu", "tpu_custom_call"), ("cuda", "mosaic_gpu_v2")])
def test_auto_lowers_to_the_platform_kernel(platform, kernel):
    """Forward: one kernel. Backward with the weights frozen: two (forward, d lhs), no XLA ragged dot."""
    forward = _custom_calls(_exported(lambda a, b, s: kernels.gmm(a, b, s), platform, *_ARGS))
    assert forward.get(kernel) == 1 and forward["chlo.ragged_dot"] == 0
    frozen = _custom_calls(_exported(jax.grad(_gmm_loss, argnums=0), platform, *_ARGS))
    assert frozen.get(kernel) == 2 and frozen["chlo.ragged_dot"] == 0


def test_weight_gradient_lowering_per_platform():
    """TPU: a third kernel (tgmm). CUDA from a CPU host: d rhs through XLA's ragged dot (see below)."""
    tpu = _custom_calls(_exported(jax.grad(_gmm_loss, argnums=(0, 1)), "tpu", *_ARGS))
    assert tpu.get("tpu_custom_call") == 3 and tpu["chlo.ragged_dot"] == 0
    cuda = _custom_calls(_exported(jax.grad(_gmm_loss, argnums=(0, 1)), "cuda", *_ARGS))
    assert cuda.get("mosaic_gpu_v2") == 2 and cuda["chlo.ragged_dot"] == 1


@pytest.mark.skipif(jax.devices()[0].platform == "gpu", reason="documents the CPU-host limitation")
def test_transposed_hopper_kernel_needs_a_gpu_to_trace():
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

    def tgmm(lhs, grad, sizes):
        return transposed_ragged_dot_mgpu.transposed_ragged_dot(
            lhs, grad, group_sizes=sizes, block_m=64, block_n=128, block_k=64, max_concurrent_steps=4,
            grid_block_n=1)

    with pytest.raises(AttributeError):  # jax.devices()[0].core_count, read while tracing
        _exported(tgmm, "cuda", jnp.zeros((M, KD), jnp.bfloat16), jnp.zeros((M, N), jnp.bfloat16), _ARGS[2])


@pytest.mark.parametrize("platform,kernel", [("tpu", "tpu_custom_call"), ("cuda", "mosaic_gpu_v2")])
def test_dispatch_lowers_to_kernels_frozen_experts(platform, kernel):
    """The base experts' forward + backward, weights frozen: 2 forward and 2 d-input kernels, nothing else."""
    t, k, d, i, e = 64, 2, 128, 128, 4
    args = (jnp.zeros((t, d), jnp.bfloat16), jnp.zeros((t, k), jnp.bfloat16), jnp.zeros((t, k), jnp.int32),
            jnp.zeros((e, d, 2 * i), jnp.bfloat16), jnp.zeros((e, i, d), jnp.bfloat16))
    dispatch = kernels.make_kernel_dispatch("auto")

    def loss(x, weights, indices, gate_up, down):
        return jnp.sum(dispatch(x, weights, indices, gate_up, down, capacity_factor=1.0)[0].astype(jnp.float32))

    calls = _custom_calls(_exported(jax.value_and_grad(loss, argnums=(0, 1)), platform, *args))
    assert calls.get(kernel) == 4 and calls["chlo.ragged_dot"] == 0


def test_routed_adapters_on_auto_run_the_platform_kernels():
    """A routed adapter bank's pipeline under `auto` (experts.auto_ffn), adapters trained: on TPU all six gmm
    (2 forward, 2 d input, 2 d weight) are megablox kernels; on CPU it is the grouped block loop (no ragged dot).
    On CUDA a bottleneck under 64 is no Hopper tile, so all six go through XLA's ragged dot."""
    t, k, d, r, m = 64, 2, 128, 16, 4
    args = (jnp.zeros((t, d), jnp.bfloat16), jnp.zeros((t, k), jnp.bfloat16), jnp.zeros((t, k), jnp.int32),
            jnp.zeros((m, d, r), jnp.bfloat16), jnp.zeros((m, r, d), jnp.bfloat16))

    def loss(x, weights, indices, first, second):
        y = experts.auto_ffn(x, weights, indices, first, second, lambda rows, project: jnp.tanh(project(rows)))
        return jnp.sum(y.astype(jnp.float32))

    step = jax.value_and_grad(loss, argnums=(0, 3, 4))
    tpu = _custom_calls(_exported(step, "tpu", *args))
    assert tpu.get("tpu_custom_call") == 6 and tpu["chlo.ragged_dot"] == 0
    assert _custom_calls(_exported(step, "cuda", *args))["chlo.ragged_dot"] == 6
    cpu = _exported(step, "cpu", *args)
    assert _custom_calls(cpu)["chlo.ragged_dot"] == 0 and "stablehlo.while" in cpu


def test_replicated_weights_get_the_gradient_summed_over_shards():
    """Under shard_map (check_vma), d rhs of a replicated rhs (an adapter) is summed over the axes lhs varies
    over; a size-1 mesh suffices to exercise the manual-axis typing."""
    lhs, rhs, cotangent = _problem(*CASES[0])
    sizes = jnp.asarray(CASES[0][0], jnp.int32)
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    loss = _loss(lambda a, b: kernels.gmm(a, b, sizes, impl="xla"), cotangent)
    grad = jax.jit(jax.shard_map(jax.grad(loss, argnums=(0, 1)), mesh=mesh, in_specs=(jax.P("data"), jax.P()),
                                 out_specs=(jax.P("data"), jax.P())))(lhs, rhs)
    ref = jax.grad(_loss(lambda a, b: loop_gmm(a, b, CASES[0][0]), cotangent), argnums=(0, 1))(lhs, rhs)
    for got, want in zip(grad, ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_input_gradient_only_when_the_input_is_differentiated():
    """The other direction: d lhs of an input that is not differentiated is not in the lowered program either."""
    lhs, rhs, cotangent = _problem(*CASES[0])
    sizes = jnp.asarray(CASES[0][0], jnp.int32)
    loss = _loss(lambda a, b: kernels.gmm(a, b, sizes, impl="xla"), cotangent)
    only_rhs, both = jax.grad(loss, argnums=1), jax.grad(loss, argnums=(0, 1))
    assert lowered_ops_shaped(only_rhs, (lhs, rhs), lhs.shape) < lowered_ops_shaped(both, (lhs, rhs), lhs.shape)
