"""Grouped matmul kernels for GPU/TPU (`gmm`), one custom VJP over all of them, and the routed pipeline built on
it (`routed_ffn`: the `kernel` backend's experts and routed adapter banks).

`gmm(lhs [M, K], rhs [G, K, N], group_sizes [G])`: rows of lhs are sorted by group, group g's rows times
rhs[g]; rows past sum(group_sizes) come out as zeros. Implementations, by name (`IMPLS`):
- `xla`: `jax.lax.ragged_dot` / `ragged_dot_general`; runs everywhere (XLA decides how; on CPU slowly,
  spec/ENGINEERING.md §5, and the CPU backend is models/moe/grouped.py anyway).
- `megablox`: JAX's Pallas TPU kernels (`jax.experimental.pallas.ops.tpu.megablox` gmm / tgmm), the ones
  MaxText runs. On CPU they run in Pallas interpret mode (`interpret=True`), which the tests use.
- `mosaic_gpu`: JAX's Pallas Mosaic-GPU kernels for Hopper (`pallas.ops.gpu.ragged_dot_mgpu`, wgmma + TMA;
  `transposed_ragged_dot_mgpu` for the weight gradient). Only where they apply (16-bit operands of one dtype,
  tile-divisible widths, below); anything else goes through `xla`. f32 is excluded on purpose: wgmma reads
  f32 operands as tf32, which is not an f32 matmul.
- `auto`: `lax.platform_dependent`, decided when lowering for a platform (so `jax.export` for another
  platform picks that platform's kernel): cuda -> mosaic_gpu, tpu -> megablox, anything else -> xla.

Not tokamax (`tokamax.ragged_dot`, evaluated at 0.0.12): the GPU machines have no tokamax, it pulls qwix /
jaxtyping, and its kernels check the default device when traced, so nothing of it can be lowered or tested
without a GPU ("NotImplementedError: Not supported on cpu." from every implementation but xla, even under
`jax.export(platforms=["cuda"])`). Its Hopper kernel is the same wgmma design as JAX's own, so nothing shows
it to be better. Revisit with measurements on a GPU.

Gradients (`_gmm_vjp`): d lhs = gmm(cotangent, rhs transposed) (every kernel reads rhs transposed in place),
d rhs = per-group lhs^T @ cotangent (tgmm). For a frozen rhs (the base experts, a non-differentiated input) d rhs
is dead code that JAX's dead-code elimination removes before lowering: the lowered program never holds an
expert-weight gradient (tests/models/moe/test_kernels.py and test_dispatch.py read the lowered StableHLO).
Symbolic zeros would make that hold by construction, but jax 0.10.2 under `nnx.remat` reuses a custom-VJP
forward traced for other perturbed inputs and fails (see layers.matmul).
Accumulation is float32 in every kernel; outputs are in lhs's dtype (d rhs in rhs's), as in layers.matmul.
The kernels' APIs used here are unchanged in jax main (0.11.1.dev, checked August 2026).
"""
from __future__ import annotations

import functools
import importlib
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from perft_jax.models.moe import grouped

# The package `megablox` re-exports its custom-VJP `gmm` under the name of the kernel module, so the module
# (with the raw gmm and tgmm kernels, used here under our own VJP) is only reachable through importlib.
_megablox = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _pad_rows(x: jax.Array, multiple: int) -> jax.Array:
    """Zero rows appended up to a multiple: both Pallas kernels tile M exactly (the padding is past every group)."""
    extra = _round_up(x.shape[0], multiple) - x.shape[0]
    return jnp.pad(x, ((0, extra), (0, 0))) if extra else x


class GmmImpl(NamedTuple):
    """One implementation: two kernels; rows past sum(group_sizes) of `gmm`'s result may be garbage.

    gmm(lhs [M, K], rhs, group_sizes, transpose_rhs, interpret) -> [M, N] in lhs's dtype, rhs [G, K, N]
      ([G, N, K] with transpose_rhs).
    tgmm(lhs [M, K], grad [M, N], group_sizes, out_dtype, interpret) -> [G, K, N]: per-group lhs^T @ grad.
    """

    gmm: Callable
    tgmm: Callable


# ---- xla ----------------------------------------------------------------------------------------------------

def _ragged_dims(lhs_contract: int, rhs_contract: int, rhs_group: tuple[int, ...]):
    return jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((lhs_contract,), (rhs_contract,)), ((), ())),
        lhs_ragged_dimensions=(0,), rhs_group_dimensions=rhs_group)


def _xla_gmm(lhs, rhs, group_sizes, transpose_rhs, interpret):
    del interpret
    dims = _ragged_dims(1, 2 if transpose_rhs else 1, (0,))
    out = jax.lax.ragged_dot_general(lhs, rhs, group_sizes, dims, preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)


def _xla_tgmm(lhs, grad, group_sizes, out_dtype, interpret):
    del interpret
    # Ragged contracting dimension (the rows): one [K, N] result per group.
    out = jax.lax.ragged_dot_general(lhs, grad, group_sizes, _ragged_dims(0, 0, ()),
                                     preferred_element_type=jnp.float32)
    return out.astype(out_dtype)


XLA = GmmImpl(_xla_gmm, _xla_tgmm)


# ---- megablox (TPU) -----------------------------------------------------------------------------------------

def _megablox_tiles(m: int, k: int, n: int) -> tuple[int, int, int]:
    """MaxText's default tiles clamped to the problem (as MaxText clamps them). M is padded to the row tile,
    which is a multiple of 16 (bf16 sublane packing); K and N may be ragged (the kernels mask the edge tiles).
    Not tuned: MaxText tunes these per model (wi_tile_* / wo_tile_* in its configs)."""
    return min(128, _round_up(m, 16)), min(128, k), min(128, n)


def _megablox_gmm(lhs, rhs, group_sizes, transpose_rhs, interpret):
    m = lhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tiles = _megablox_tiles(m, lhs.shape[1], n)
    out = _megablox.gmm(_pad_rows(lhs, tiles[0]), rhs, group_sizes, lhs.dtype, tiles,
                        transpose_rhs=transpose_rhs, interpret=interpret)
    return out[:m]


def _megablox_tgmm(lhs, grad, group_sizes, out_dtype, interpret):
    tiles = _megablox_tiles(lhs.shape[0], lhs.shape[1], grad.shape[1])
    lhs, grad = _pad_rows(lhs, tiles[0]), _pad_rows(grad, tiles[0])
    # tgmm takes lhs as [K, M]; it transposes back inside, and XLA folds the two transposes.
    return _megablox.tgmm(lhs.T, grad, group_sizes, out_dtype, tiles, interpret=interpret)


MEGABLOX = GmmImpl(_megablox_gmm, _megablox_tgmm)


# ---- mosaic_gpu (Hopper) ------------------------------------------------------------------------------------

# Tiles for JAX's Hopper kernels. Not measured (no GPU where this was written): wgmma needs block_m a multiple
# of 64 and block_n a multiple of 8 up to 256; block_k = 64 bf16 is one 128-byte swizzle row. SMEM: 4 stages of
# (64x64 + 64x128) bf16 + a 64x128 output tile = 112 KiB of the H100/H200's 227 KiB.
_MGPU = dict(block_m=64, block_k=64, max_concurrent_steps=4, grid_block_n=1)


def _mgpu_block_n(n: int) -> int | None:
    return next((b for b in (128, 64) if n % b == 0), None)


def _mgpu_dtypes(a: jax.Array, b: jax.Array) -> bool:
    """The kernels demand one dtype for both operands; f32 is excluded because wgmma would read it as tf32."""
    return a.dtype == b.dtype and a.dtype in (jnp.bfloat16, jnp.float16)


def _mgpu_gmm(lhs, rhs, group_sizes, transpose_rhs, interpret):
    del interpret  # gmm() allows it only for megablox
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    # The contracting width must be a multiple of block_k (the kernel raises otherwise), the output width of a
    # block_n (each output tile is stored whole).
    if not (_mgpu_dtypes(lhs, rhs) and lhs.shape[1] % _MGPU["block_k"] == 0 and _mgpu_block_n(n)):
        return _xla_gmm(lhs, rhs, group_sizes, transpose_rhs, False)
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu  # imported when used: Mosaic GPU's Python side

    # The kernel accumulates in float32 (the wgmma accumulator) and stores lhs's dtype. transpose_rhs reads
    # rhs [G, N, K] in place (a transposed SMEM view), so d lhs needs no transposed copy of the weights.
    out = ragged_dot_mgpu.ragged_dot(_pad_rows(lhs, _MGPU["block_m"]), rhs, group_sizes=group_sizes,
                                     block_n=_mgpu_block_n(n), transpose_rhs=transpose_rhs, **_MGPU)
    return out[:lhs.shape[0]]


def _mgpu_tgmm(lhs, grad, group_sizes, out_dtype, interpret):
    """Only adapters need this (the frozen base never does). The transposed kernel produces [G, K, N] in
    (block_m x block_n) tiles, so K and N must be tile multiples (PERFT bottlenecks of 8-32 are not), and it
    reads the SM count from jax.devices()[0] while tracing, so it can only be traced where device 0 is a GPU
    (from a CPU host, `jax.export(platforms=["cuda"])` raises AttributeError there). Otherwise: XLA."""
    del interpret
    k, n = lhs.shape[1], grad.shape[1]
    if not (jax.devices()[0].platform == "gpu" and _mgpu_dtypes(lhs, grad) and out_dtype == lhs.dtype
            and k % _MGPU["block_m"] == 0 and _mgpu_block_n(n)):
        return _xla_tgmm(lhs, grad, group_sizes, out_dtype, False)
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

    lhs, grad = _pad_rows(lhs, _MGPU["block_k"]), _pad_rows(grad, _MGPU["block_k"])
    return transposed_ragged_dot_mgpu.transposed_ragged_dot(
        lhs, grad, group_sizes=group_sizes, block_n=_mgpu_block_n(n), **_MGPU)


MOSAIC_GPU = GmmImpl(_mgpu_gmm, _mgpu_tgmm)

IMPLS = {"xla": XLA, "megablox": MEGABLOX, "mosaic_gpu": MOSAIC_GPU}


def _per_platform(kernel: str) -> Callable:
    """`auto`: one kernel of every implementation, chosen by `lax.platform_dependent` when lowering."""

    def call(*arrays, **static):
        branches = {name: functools.partial(getattr(IMPLS[name], kernel), **static) for name in IMPLS}
        return jax.lax.platform_dependent(*arrays, cuda=branches["mosaic_gpu"], tpu=branches["megablox"],
                                          default=branches["xla"])

    return call


AUTO = GmmImpl(_per_platform("gmm"), _per_platform("tgmm"))


# ---- the op and its VJP -------------------------------------------------------------------------------------

def _zero_tail(out: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Rows past the last group, which the kernels leave unwritten (the Pallas ones: uninitialised memory)."""
    return jnp.where((jnp.arange(out.shape[0]) < jnp.sum(group_sizes))[:, None], out, 0)


def _sum_over_extra_axes(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
    """Inside shard_map, sum a cotangent over the manual axes it varies over and its primal does not (an adapter
    replicated over `expert` gets every shard's gradient), as layers.matmul's VJP does (layers._like)."""
    extra = jax.typeof(cotangent).manual_axis_type.varying - jax.typeof(primal).manual_axis_type.varying
    return jax.lax.psum(cotangent, tuple(sorted(extra))) if extra else cotangent


@functools.lru_cache(maxsize=None)
def _gmm_vjp(impl: str, interpret: bool) -> Callable:
    kernels = AUTO if impl == "auto" else IMPLS[impl]

    @jax.custom_vjp
    def op(lhs, rhs, group_sizes):
        out = kernels.gmm(lhs, rhs, group_sizes, transpose_rhs=False, interpret=interpret)
        return _zero_tail(out, group_sizes)

    def fwd(lhs, rhs, group_sizes):
        return op(lhs, rhs, group_sizes), (lhs, rhs, group_sizes)

    def bwd(residuals, grad):
        # Both gradients are written; for a frozen rhs (the base experts) d rhs is dead code, which JAX drops
        # before lowering (tests check the lowered program). Not symbolic zeros: see layers.matmul for why.
        lhs, rhs, group_sizes = residuals
        grad = _zero_tail(grad.astype(lhs.dtype), group_sizes)  # rows past the groups have no output
        dlhs = kernels.gmm(grad, rhs, group_sizes, transpose_rhs=True, interpret=interpret)
        dlhs = _sum_over_extra_axes(_zero_tail(dlhs, group_sizes), lhs)
        drhs = kernels.tgmm(lhs, grad, group_sizes, out_dtype=rhs.dtype, interpret=interpret)
        return dlhs, _sum_over_extra_axes(drhs, rhs), None

    op.defvjp(fwd, bwd)
    return op


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, impl: str = "auto",
        interpret: bool = False) -> jax.Array:
    """lhs [M, K] (rows sorted by group) x rhs [G, K, N], group_sizes [G] int32 -> [M, N] in lhs's dtype.

    Row block g (group_sizes[g] rows, in order) is multiplied by rhs[g], accumulated in float32; rows past
    sum(group_sizes) are zeros (and get zero gradient). `impl`: a key of `IMPLS` or "auto" (module docstring).
    `interpret`: run `megablox` in Pallas interpret mode (CPU tests); for `mosaic_gpu` use JAX's GPU interpret
    mode instead (tests/models/moe/test_kernels.py).
    """
    if impl != "auto" and impl not in IMPLS:
        raise ValueError(f"unknown gmm impl {impl!r}; expected 'auto' or one of {sorted(IMPLS)}")
    if interpret and impl != "megablox":
        raise ValueError("interpret=True is for impl='megablox' only")
    return _gmm_vjp(impl, interpret)(lhs, rhs, group_sizes.astype(jnp.int32))


# ---- dispatch -----------------------------------------------------------------------------------------------

# Moving rows between token order and expert order is a permutation (plus the K-fold replication of tokens).
# Written with custom VJPs so that both directions, and both derivatives, are gathers: JAX's own derivative of
# a gather is a scatter-add, which TPUs and CPUs run serially (MaxText sorts its MoE activations the same way).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tokens_to_sorted(x, order, inverse, k):
    """x [T, D] -> [T*K, D]: sorted row i is pair order[i], i.e. token order[i] // K."""
    return x[order // k]


def _tokens_to_sorted_fwd(x, order, inverse, k):
    return _tokens_to_sorted(x, order, inverse, k), (order, inverse)


def _tokens_to_sorted_bwd(k, residuals, grad):
    order, inverse = residuals
    per_pair = grad[inverse]  # [T*K, D] in pair (token-major) order
    return per_pair.reshape(-1, k, per_pair.shape[-1]).sum(axis=1), None, None


_tokens_to_sorted.defvjp(_tokens_to_sorted_fwd, _tokens_to_sorted_bwd)


@jax.custom_vjp
def _sorted_to_pairs(rows, order, inverse):
    """[T*K, D] in expert order -> pair order (the inverse permutation)."""
    return rows[inverse]


def _sorted_to_pairs_fwd(rows, order, inverse):
    return rows[inverse], (order, inverse)


def _sorted_to_pairs_bwd(residuals, grad):
    order, _ = residuals
    return grad[order], None, None


_sorted_to_pairs.defvjp(_sorted_to_pairs_fwd, _sorted_to_pairs_bwd)


def routed_ffn(x: jax.Array, weights: jax.Array, indices: jax.Array, first: jax.Array, second: jax.Array,
               hidden, num_groups: int | None = None, *, impl: str = "auto", interpret: bool = False) -> jax.Array:
    """sum_k w_tk * second_g(hidden(x_t, first_g)) with g = indices[t, k], through `gmm`: the contract of
    models/moe/grouped.py `grouped_ffn`, which the base experts (`make_kernel_dispatch`) and the routed adapter banks
    (PERFT-R, PERFT-E on the `kernel` backend) share.

    x [T, D], weights / indices [T, K] (token-major pairs), first [G, D, F], second [G, F', D] -> [T, D] in x's
    dtype. Pairs are sorted by group (stable); `hidden(rows [T*K, D], project)` maps the sorted rows to
    [T*K, F'], `project` applying the first matrix. The routing weight multiplies the hidden rows, before the
    second matmul ([T*K, F'] multiplies, not [T*K, D]); rows go back to pair order and the K choices are summed
    in float32 and rounded once, as dense_dispatch's combine einsum does. Pairs of group >= G (a caller's
    "nowhere" group) sort past every group, where gmm gives zeros; `num_groups` is accepted for the shared
    contract and needs no extra group here.
    """
    del num_groups
    t, k = indices.shape
    flat_group = indices.reshape(-1).astype(jnp.int32)  # [T*K], token-major
    order = jnp.argsort(flat_group, stable=True).astype(jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(t * k, dtype=jnp.int32))
    group_sizes = jnp.bincount(flat_group, length=first.shape[0]).astype(jnp.int32)  # drops ids >= G
    run = functools.partial(gmm, group_sizes=group_sizes, impl=impl, interpret=interpret)
    h = hidden(_tokens_to_sorted(x, order, inverse, k), lambda v: run(v, first))  # [T*K, F']
    # The weights through the same gather as the tokens, so their gradient is a gather too.
    h = h * _tokens_to_sorted(weights.reshape(-1, 1).astype(h.dtype), order, inverse, 1)
    y = _sorted_to_pairs(run(h, second), order, inverse)  # [T*K, D]
    return jnp.sum(y.reshape(t, k, -1), axis=1, dtype=jnp.float32).astype(x.dtype)


def make_kernel_dispatch(impl: str = "auto", interpret: bool = False) -> Callable:
    """SwiGLU experts through `routed_ffn` with `impl`: a dropless dispatch for `experts.DISPATCH` (its signature;
    `valid` pairs of other devices go past every group, weighted zero; `capacity_factor` / `cap` ignored)."""
    if impl != "auto" and impl not in IMPLS:
        raise ValueError(f"unknown gmm impl {impl!r}; expected 'auto' or one of {sorted(IMPLS)}")
    return grouped.dispatch_of(functools.partial(routed_ffn, impl=impl, interpret=interpret))
