"""Stacked SwiGLU experts and the ways of dispatching tokens to them, one table of backends (`DISPATCH`).

Weights are stored experts-axis first: `gate_up` [E, D, 2I] (gate in the first I columns, up in the
last I — HF's fused `gate_up_proj` transposed) and `down` [E, I, D]. One fused gate/up matmul
instead of two halves the number of expert matmuls.

Backends (`ModelConfig.moe_backend`: a key of `DISPATCH`), all computing y_t = sum_k w_tk * E_{i_tk}(x_t), all
with one signature `(x, weights, indices, gate_up, down, valid=None, *, capacity_factor, cap=None)`:
- `dense`: every expert on every token, combined with a [T, E] weight matrix. The reference: simple,
  exact, and E/K times the FLOPs of the sparse forms.
- `capacity`: each (token, choice) pair gets a slot in a per-expert buffer [E, C, D] with
  C = ceil(T*K/E * capacity_factor); one batched einsum runs all experts; pairs past an expert's
  capacity are dropped (counted in `dropped`). Needs a capacity factor that fits the routing to be exact.
- `grouped`: pairs sorted by expert into fixed-size blocks (models/moe/grouped.py), a loop of [b, D] x [D, F]
  matmuls over the blocks in use; dropless, under one block of padding per expert. Fastest on CPU.
- `ragged`: pairs sorted by expert and run through `jax.lax.ragged_dot` (grouped matmul); dropless.
- `kernel`: pairs sorted by expert through real grouped-matmul kernels (models/moe/kernels.py: Pallas
  megablox on TPU, Pallas Mosaic-GPU on Hopper, XLA's ragged_dot otherwise), with a VJP that never builds
  the frozen base's weight gradient; dropless.
- `auto` (the default): `grouped` on CPU, `kernel` on GPU and TPU, chosen when the program is lowered.

Routed PERFT adapters (PERFT-R, PERFT-E) are groups too: on one device they run through the base's routed
pipeline (`ROUTED_FFN[routed_pipeline(moe_backend)]`, the two-matrix form of `grouped` / `kernel` / `auto`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from perft_jax.models.config import ModelConfig
from perft_jax.models.layers import matmul, normal_init
from perft_jax.models.moe import grouped, kernels


def dense_dispatch(x, weights, indices, gate_up, down, valid=None, *, capacity_factor: float = 0.0,
                   cap: int | None = None):
    """x [T, D], weights/indices [T, K] -> (y [T, D], dropped int32 scalar).

    `valid` [T, K] bool (all backends): only these pairs are computed; expert parallelism (models/moe/ep.py)
    passes the pairs whose expert this device holds, with the others' indices clipped into range.
    `capacity_factor` / `cap` size the capacity backend's buffers; the dropless backends take and ignore them.
    """
    num_experts = gate_up.shape[0]
    if valid is not None:
        weights = jnp.where(valid, weights, 0)
    # Batched over the experts (x broadcast to each), through the base matmul: no float32 copy of the weights.
    h = grouped.swiglu(matmul(jnp.broadcast_to(x, (num_experts,) + x.shape), gate_up))  # [E, T, I]
    y_all = matmul(h, down)  # [E, T, D]
    combine = jnp.zeros((x.shape[0], num_experts), weights.dtype)
    combine = combine.at[jnp.arange(x.shape[0])[:, None], indices].add(weights)  # [T, E]
    return jnp.einsum("etd,te->td", y_all, combine), jnp.zeros((), jnp.int32)


def capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    return max(1, math.ceil(num_tokens * k / num_experts * capacity_factor))


def capacity_dispatch(x, weights, indices, gate_up, down, valid=None, *, capacity_factor: float,
                      cap: int | None = None):
    """Capacity-buffer dispatch; see module docstring. Returns (y [T, D], dropped pairs).

    `cap` overrides the per-expert capacity (expert parallelism sizes it for all experts, not the local ones).
    """
    t, k = indices.shape
    num_experts = gate_up.shape[0]
    cap = capacity(t, k, num_experts, capacity_factor) if cap is None else cap
    valid = jnp.ones((t, k), bool) if valid is None else valid
    # Slot order is choice-major (all first choices, then all second ones ...), so that when an expert
    # overflows it is the tokens' lower-ranked choices that are dropped first (GShard).
    flat_expert = indices.T.reshape(-1)  # [K*T]
    flat_valid = valid.T.reshape(-1)
    onehot = jax.nn.one_hot(flat_expert, num_experts, dtype=jnp.int32) * flat_valid[:, None]  # [K*T, E]
    position = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)  # slot within its expert
    keep = flat_valid & (position < cap)
    slot = jnp.where(keep, flat_expert * cap + position, num_experts * cap)  # overflow -> sentinel slot
    token = jnp.tile(jnp.arange(t), k)  # [K*T]
    buffer = jnp.zeros((num_experts * cap + 1, x.shape[-1]), x.dtype).at[slot].set(x[token])
    buffer = buffer[:-1].reshape(num_experts, cap, -1)  # [E, C, D]
    h = grouped.swiglu(matmul(buffer, gate_up))
    out = matmul(h, down).reshape(num_experts * cap, -1)
    out = jnp.concatenate([out, jnp.zeros((1, out.shape[-1]), out.dtype)])  # sentinel row reads zeros
    per_pair = out[slot].reshape(k, t, -1)  # [K, T, D]
    y = jnp.einsum("ktd,tk->td", per_pair, weights)
    return y, jnp.sum(flat_valid & ~keep).astype(jnp.int32)


# Sorted fixed-size blocks, one matmul per block (models/moe/grouped.py). Dropless.
grouped_dispatch = grouped.dispatch_of(grouped.grouped_ffn)


def ragged_dispatch(x, weights, indices, gate_up, down, valid=None, *, capacity_factor: float = 0.0,
                    cap: int | None = None):
    """Sort pairs by expert, grouped matmul with `lax.ragged_dot`, unsort. Dropless."""
    t, k = indices.shape
    num_experts = gate_up.shape[0]
    flat_expert = indices.reshape(-1)  # [T*K], token-major
    if valid is not None:  # invalid pairs sort last, past every group, and their rows are zeroed below
        flat_expert = jnp.where(valid.reshape(-1), flat_expert, num_experts)
        weights = jnp.where(valid, weights, 0)
    order = jnp.argsort(flat_expert, stable=True)
    group_sizes = jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32)  # drops id E
    xs = x[order // k]  # [T*K, D] grouped by expert
    h = grouped.swiglu(jax.lax.ragged_dot(xs, gate_up, group_sizes))
    out_sorted = jax.lax.ragged_dot(h, down, group_sizes)  # [T*K, D]
    if valid is not None:  # ragged_dot leaves rows past the last group unspecified on some platforms
        out_sorted = jnp.where((jnp.arange(t * k) < jnp.sum(group_sizes))[:, None], out_sorted, 0)
    per_pair = jnp.zeros_like(out_sorted).at[order].set(out_sorted).reshape(t, k, -1)
    return jnp.einsum("tkd,tk->td", per_pair, weights), jnp.zeros((), jnp.int32)


kernel_dispatch = kernels.make_kernel_dispatch("auto")

# What `auto` runs on each platform, for the message a run prints at its start (`describe_backend`).
AUTO_CHOICE = {"cpu": "grouped (a loop of fixed-size blocks; XLA:CPU has no fast grouped matmul)",
               "gpu": "kernel: Pallas Mosaic-GPU ragged dot (Hopper; bf16, 64-aligned widths), else XLA ragged_dot",
               "tpu": "kernel: Pallas megablox grouped matmul (gmm / tgmm)"}


def auto_ffn(x, weights, indices, first, second, hidden, num_groups=None):
    """`grouped.grouped_ffn` on CPU, `kernels.routed_ffn` elsewhere: the routed pipeline of `auto`, chosen when
    lowering as `auto_dispatch` chooses (a routed adapter bank's `hidden` must then not advance nnx RNG state:
    the branches are traced inside `lax.platform_dependent`)."""

    def branch(ffn):
        return lambda *a: ffn(*a, hidden, num_groups).astype(x.dtype)

    return jax.lax.platform_dependent(x, weights, indices, first, second, cpu=branch(grouped.grouped_ffn),
                                      default=branch(kernels.routed_ffn))


# The backend for the platform the program is lowered for: `grouped` on CPU, the grouped-matmul kernels elsewhere.
auto_dispatch = grouped.dispatch_of(auto_ffn)

# Backend name -> dispatch. `models.config.MOE_BACKENDS` and the config's `Literal` list these names
# (tests/models/moe/test_dispatch.py holds them equal).
DISPATCH = {"auto": auto_dispatch, "dense": dense_dispatch, "capacity": capacity_dispatch,
            "grouped": grouped_dispatch, "ragged": ragged_dispatch, "kernel": kernel_dispatch}


# Pipeline name -> the routed two-matrix pipeline (`grouped.grouped_ffn`'s contract) the routed adapter banks run
# on one device, so that they follow the base experts' backend (perft/adapters.py `AdapterBank.routed`).
ROUTED_FFN = {"auto": auto_ffn, "grouped": grouped.grouped_ffn, "kernel": kernels.routed_ffn}


def routed_pipeline(moe_backend: str) -> str:
    """The `ROUTED_FFN` key for routed adapters beside base experts on `moe_backend` (one device).

    `grouped` / `kernel` / `auto`: the base's own pipeline (PERFT-E's adapters then sort exactly as the experts
    do, and XLA merges the two sorts). `dense`, `capacity`, `ragged` have no adapter form worth having (dense
    gates cost M / K, capacity drops pairs, ragged_dot is what `kernel` runs through XLA anyway): `auto`, which
    is today's `grouped` on CPU and the kernels where the grouped block loop would be a serial loop of small
    matmuls.
    """
    return moe_backend if moe_backend in ROUTED_FFN else "auto"


def describe_backend(cfg: ModelConfig, platform: str) -> str:
    """E.g. `auto -> grouped (...) on cpu`: printed at the start of a run."""
    if cfg.moe_backend != "auto":
        return f"{cfg.moe_backend} (set explicitly)"
    return f"auto -> {AUTO_CHOICE.get(platform, 'kernel: XLA ragged_dot')} on {platform}"


class Experts(nnx.Module):
    """E SwiGLU experts, stacked; `__call__` runs `dispatch`, a function with the `DISPATCH` signature.

    `dispatch` defaults to the configured backend, `DISPATCH[cfg.moe_backend]`; on a device mesh the model is
    built with expert parallelism wrapping that backend instead (models/moe/ep.py `expert_dispatch`).
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dispatch=None):
        e, d, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.gate_up = nnx.Param(normal_init(rngs, (e, d, 2 * i), 0.02, cfg.jnp_param_dtype),
                                 axes=("exp", "embed_moe", "mlp_moe"))
        self.down = nnx.Param(normal_init(rngs, (e, i, d), 0.02, cfg.jnp_param_dtype),
                              axes=("exp", "mlp_moe", "embed_moe"))
        self.dispatch = DISPATCH[cfg.moe_backend] if dispatch is None else dispatch
        self.capacity_factor = cfg.capacity_factor
        self.dtype = cfg.jnp_dtype

    def __call__(self, x: jax.Array, weights: jax.Array, indices: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [T, D], weights [T, K], indices [T, K] -> (y [T, D], number of dropped (token, expert) pairs)."""
        x = x.astype(self.dtype)
        gate_up, down = self.gate_up[...].astype(self.dtype), self.down[...].astype(self.dtype)
        return self.dispatch(x, weights.astype(self.dtype), indices, gate_up, down,
                             capacity_factor=self.capacity_factor)
