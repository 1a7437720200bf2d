"""Dropless grouped matmuls on CPU-friendly fixed shapes: rows sorted by group, padded to blocks.

Top-k routing gives n = T*K (token, choice) pairs, each belonging to one of G groups (experts or adapter
experts). `BlockLayout` sorts the pairs by group and pads every group to a multiple of `block` rows, so
the rows form `num_blocks` blocks that each belong to exactly one group. A grouped matmul is then a
loop over the blocks that hold pairs, each block [b, D] times its group's matrix [D, F], read in place.

Why not the alternatives: computing every group on every row (dense gates) costs G/K times the useful
FLOPs, which is what makes step time grow with the number of adapter experts; `lax.ragged_dot` has no
efficient CPU lowering; capacity buffers drop pairs. Here shapes are static, with
num_blocks * block <= n + (G - 1) * block rows whatever the routing, and nothing is dropped.

Why a loop and not one batched einsum over [NB, D, F] gathered weights: on CPU, XLA's gather of the
weights (one [D, F] matrix per block) cost as much as the matmul itself (42 of 90 ms for T*K = 8192
pairs, 16 groups of [512, 512], b = 128), and the batched form also ran the trailing blocks that hold
no pairs. The loop reads each matrix where it lies and stops at the last used block: 50 -> 39 ms.
"""
from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp


def _cdiv(a, b):
    return -(-a // b)


def default_block(num_pairs: int, num_groups: int) -> int:
    """Rows per block: about a quarter of a group's even share (padding <= 1/4 of the rows on average),
    a power of two in [8, 256] so blocks stay matmul-sized."""
    share = max(1, num_pairs // (4 * num_groups))
    return int(min(256, max(8, 1 << (share.bit_length() - 1))))


@flax.struct.dataclass
class BlockLayout:
    """Where each pair sits in the padded, group-sorted row order.

    pair_row [n]: the padded row of pair i; row_pair [NB*b]: the pair feeding each padded row, n if padding;
    group_end_block [G]: one past each group's last block, so blocks [0, group_end_block[g]) hold the pairs of
    groups 0..g and the blocks after the last are empty.
    """

    pair_row: jax.Array
    row_pair: jax.Array
    group_end_block: jax.Array
    block: int = flax.struct.field(pytree_node=False)

    @property
    def num_rows(self) -> int:
        return self.row_pair.shape[0]


def block_layout(group_ids: jax.Array, num_groups: int, block: int | None = None) -> BlockLayout:
    """group_ids [n] int -> BlockLayout. Pairs keep their order within a group (stable sort)."""
    n = group_ids.shape[0]
    block = default_block(n, num_groups) if block is None else block
    # sum_g ceil(c_g / b) <= ceil(n / b) + G - 1: a static bound on the blocks any routing needs.
    num_blocks = _cdiv(n, block) + num_groups - 1
    group_ids = group_ids.astype(jnp.int32)
    counts = jnp.bincount(group_ids, length=num_groups)
    blocks_per_group = _cdiv(counts, block)
    block_end = jnp.cumsum(blocks_per_group)
    order = jnp.argsort(group_ids, stable=True)
    sorted_groups = group_ids[order]
    rank = jnp.arange(n) - (jnp.cumsum(counts) - counts)[sorted_groups]
    padded = (block_end - blocks_per_group)[sorted_groups] * block + rank
    pair_row = jnp.zeros(n, jnp.int32).at[order].set(padded.astype(jnp.int32))
    row_pair = jnp.full(num_blocks * block, n, jnp.int32).at[padded].set(order.astype(jnp.int32))
    return BlockLayout(pair_row=pair_row, row_pair=row_pair, group_end_block=block_end.astype(jnp.int32),
                       block=block)


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
    """x[index] with index == len(x) reading a zero row."""
    return jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])[index]


# The two row moves below are each other's transpose (pairs <-> padded rows is a bijection plus padding),
# so each one's gradient is the other move: a gather again, never the scatter-add XLA would derive,
# which runs serially on CPU.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rows_to_blocks(x, layout, pairs_per_row):
    n = layout.pair_row.shape[0]
    return _take(x, jnp.where(layout.row_pair < n, layout.row_pair // pairs_per_row, x.shape[0]))


def _rows_to_blocks_fwd(x, layout, pairs_per_row):
    return _rows_to_blocks(x, layout, pairs_per_row), layout


def _rows_to_blocks_bwd(pairs_per_row, layout, grad):
    per_pair = grad[layout.pair_row]  # [n, D]: each pair's row; a token's K pairs are adjacent
    return per_pair.reshape(-1, pairs_per_row, per_pair.shape[-1]).sum(axis=1), None


_rows_to_blocks.defvjp(_rows_to_blocks_fwd, _rows_to_blocks_bwd)


@jax.custom_vjp
def _blocks_to_pairs(rows, layout):
    return rows[layout.pair_row]


def _blocks_to_pairs_fwd(rows, layout):
    return rows[layout.pair_row], layout


def _blocks_to_pairs_bwd(layout, grad):
    return _take(grad, layout.row_pair), None  # padding rows get zero gradient


_blocks_to_pairs.defvjp(_blocks_to_pairs_fwd, _blocks_to_pairs_bwd)


def gather_rows(x: jax.Array, layout: BlockLayout, pairs_per_row: int = 1) -> jax.Array:
    """x [n / pairs_per_row, D] -> [NB, b, D] in padded order, zeros in padding rows.

    Pair p reads row p // pairs_per_row: with token-major top-k pairs (pairs_per_row = K) x is the token
    matrix itself, and no [n, D] copy of the tokens is made.
    """
    return _rows_to_blocks(x, layout, pairs_per_row).reshape(-1, layout.block, x.shape[-1])


def gather_pair_values(values: jax.Array, layout: BlockLayout) -> jax.Array:
    """values [n] (one per pair, e.g. gate weights) -> [NB, b] in padded order, zeros in padding rows."""
    return gather_rows(values[:, None], layout)[..., 0]


def scatter_rows(blocks: jax.Array, layout: BlockLayout) -> jax.Array:
    """[NB, b, F] in padded order -> [n, F], one row per pair (the inverse of `gather_rows`)."""
    return _blocks_to_pairs(blocks.reshape(layout.num_rows, -1), layout)


def _zeros_varying_like(shape, dtype, *operands) -> jax.Array:
    """Zeros that vary over the same manual mesh axes as `operands`. Inside `shard_map` (expert parallelism,
    models/moe/ep.py), a loop's carry must start with the axes its body's result varies over."""
    axes = frozenset().union(*(jax.typeof(a).manual_axis_type.varying for a in operands))
    zeros = jnp.zeros(shape, dtype)
    return jax.lax.pcast(zeros, tuple(sorted(axes)), to="varying") if axes else zeros


def _contract(a, b, a_dim: int, b_dim: int):
    """a and b contracted over one dimension each, accumulated in float32 (no transposed copy of either)."""
    return jax.lax.dot_general(a, b, (((a_dim,), (b_dim,)), ((), ())), preferred_element_type=jnp.float32)


def _group_spans(group_end_block):
    """(first, end) block of each group [G]: the blocks of group g are [first[g], end[g]) (sorted order)."""
    return jnp.concatenate([jnp.zeros(1, group_end_block.dtype), group_end_block[:-1]]), group_end_block


def _block_products(blocks, weights, group_end_block, transpose: bool):
    """out[i] = blocks[i] @ W[g] (W^T with `transpose`) for each block i of each group g < G; zeros after.

    A loop over the groups, each reading its matrix once, around a loop over that group's blocks: slicing one
    [D, F] matrix out of the stack is a copy on CPU, so slicing it per group rather than per block did the same
    work in 7-12 % less time (one bench-small MoE layer, forward + backward, float32).

    The weights travel through the loop behind an optimization barrier. XLA:CPU computes a bfloat16
    dynamic-slice in float32 (it converts the operand first), and since the weights are loop-invariant it
    hoisted that conversion out of the loop: a float32 copy of the whole [G, D, F] stack per call, kept from
    the forward to the backward (for OLMoE-1B-7B, 3 GiB per layer over its 1.5 GiB of bfloat16 experts, issue
    11). Behind the barrier the conversion stays in the loop, fused into the slice of the one matrix it
    reads; the loop also ran 3.3x faster (0.22 s against 0.72 s for 64 matrices of 2048 x 2048, bf16).
    """
    width = weights.shape[1] if transpose else weights.shape[2]
    first, end = _group_spans(group_end_block)

    def group(g, carry):
        out, weights = carry
        weights = jax.lax.optimization_barrier(weights)
        matrix = weights[g]

        def block(i, out):
            product = _contract(blocks[i], matrix, 1, 1 if transpose else 0)
            return jax.lax.dynamic_update_index_in_dim(out, product.astype(out.dtype), i, 0)

        return jax.lax.fori_loop(first[g], end[g], block, out), weights

    out = _zeros_varying_like(blocks.shape[:2] + (width,), blocks.dtype, blocks, weights, group_end_block)
    return jax.lax.fori_loop(0, weights.shape[0], group, (out, weights))[0]


def _weight_gradient(blocks, grads, group_end_block, shape, dtype):
    """dW[g] = sum over the blocks i of group g: blocks[i]^T @ grads[i], accumulated in float32 per group."""
    first, end = _group_spans(group_end_block)

    def group(g, dw):
        zeros = _zeros_varying_like(shape[1:], jnp.float32, blocks, grads, group_end_block)
        total = jax.lax.fori_loop(first[g], end[g], lambda i, acc: acc + _contract(blocks[i], grads[i], 0, 0), zeros)
        return jax.lax.dynamic_update_index_in_dim(dw, total, g, 0)

    dw = jax.lax.fori_loop(0, shape[0], group, _zeros_varying_like(shape, jnp.float32, blocks, grads, group_end_block))
    return dw.astype(dtype)


# Differentiated by hand: the loops' trip counts are data-dependent, which reverse mode cannot go through.
# dx and dW are separate loops, so that the dW loop is dead code when the weights are frozen (the base): JAX
# drops it before lowering. (Not symbolic zeros: see layers.matmul for why.)
@jax.custom_vjp
def _grouped_matmul(blocks, weights, group_end_block):
    return _block_products(blocks, weights, group_end_block, transpose=False)


def _grouped_matmul_fwd(blocks, weights, group_end_block):
    return _grouped_matmul(blocks, weights, group_end_block), (blocks, weights, group_end_block)


def _grouped_matmul_bwd(residuals, grad):
    blocks, weights, group_end_block = residuals
    dx = _block_products(grad, weights, group_end_block, transpose=True)
    return dx, _weight_gradient(blocks, grad, group_end_block, weights.shape, weights.dtype), None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def grouped_matmul(blocks: jax.Array, weights: jax.Array, layout: BlockLayout) -> jax.Array:
    """blocks [NB, b, D] x group weights [G, D, F] -> [NB, b, F]: each block by its own group's matrix.

    Only blocks of groups < G run; the rest (the empty blocks at the end, and the blocks of a caller's
    "nowhere" group G, whose rows it weights by zero) come out as zeros.
    """
    return _grouped_matmul(blocks, weights, layout.group_end_block[:weights.shape[0]])


def grouped_ffn(x: jax.Array, weights: jax.Array, indices: jax.Array, first: jax.Array, second: jax.Array,
                hidden, num_groups: int | None = None) -> jax.Array:
    """sum_k w_tk * second_g(hidden(x_t, first_g)) with g = indices[t, k]: the routed two-matrix pipeline that
    the base experts (SwiGLU) and the routed adapter banks (LoRA, parallel adapter) share.

    x [T, D], weights / indices [T, K] (token-major pairs), first [G, D, F], second [G, F', D] -> [T, D].
    `hidden(rows, project)` maps gathered rows [NB, b, D] to [NB, b, F'], `project` applying the first matrix
    (so an adapter can put dropout before it). The routing weight multiplies the hidden rows, before the second
    matmul. `num_groups` > G adds groups that run nothing (a caller's "nowhere" group for pairs it must skip).
    """
    t, k = indices.shape
    layout = block_layout(indices.reshape(-1), first.shape[0] if num_groups is None else num_groups)
    rows = gather_rows(x, layout, pairs_per_row=k)  # [NB, b, D]; no [T*K, D] copy of the tokens
    h = hidden(rows, lambda v: grouped_matmul(v, first, layout))
    h = h * gather_pair_values(weights.reshape(-1).astype(h.dtype), layout)[..., None]
    out = scatter_rows(grouped_matmul(h, second, layout), layout)  # [T*K, D]
    return out.reshape(t, k, -1).sum(axis=1)


def swiglu(h: jax.Array) -> jax.Array:
    """The experts' activation on fused [..., 2I] gate/up rows (gate in the first I columns)."""
    gate, up = jnp.split(h, 2, axis=-1)
    return jax.nn.silu(gate) * up


def dispatch_of(ffn):
    """A dropless experts dispatch (models/moe/experts.py `DISPATCH` signature) from a routed pipeline with
    `grouped_ffn`'s contract: SwiGLU experts, and the pairs `valid` excludes (other devices' experts under
    expert parallelism) sent to a "nowhere" group E with weight zero. `grouped`, `kernel` and `auto` are this."""

    def dispatch(x, weights, indices, gate_up, down, valid=None, *, capacity_factor: float = 0.0,
                 cap: int | None = None):
        num_experts = gate_up.shape[0]
        if valid is not None:
            indices = jnp.where(valid, indices, num_experts)
            weights = jnp.where(valid, weights, 0)
        y = ffn(x, weights, indices, gate_up, down, lambda rows, project: swiglu(project(rows)),
                num_experts + (valid is not None))
        return y, jnp.zeros((), jnp.int32)

    dispatch.__name__ = dispatch.__qualname__ = f"dispatch_of({getattr(ffn, '__name__', 'ffn')})"
    return dispatch
