"""Expert parallelism under `jax.shard_map`: the ring of experts, and ragged all-to-all (spec/ENGINEERING.md §5).

The stacked expert weights [E, ...] are split over the mesh axis `expert` (each device holds E / n
experts) and the tokens over the batch axes (`activation_batch`, by default data x fsdp x expert).

Ring of experts (`mesh.expert_dispatch: ring`; MaxText `use_ring_of_experts`), per device:

    1. all-gather the tokens (and their top-k routing) over `expert`: every device of an expert group sees
       the group's tokens; the gather happens before the k-fold pair replication, which suits large top-k;
    2. keep the (token, choice) pairs routed to this device's experts and run them with the model's own
       backend (dense / capacity / ragged) on the local experts;
    3. `psum_scatter` the partial outputs over `expert`: each device gets the sum over all experts for its
       own tokens back.

It runs on CPU test meshes. Weights that are also split over `fsdp` / `tensor` are gathered on entry, as
FSDP does right before use.

Ragged all-to-all (`mesh.expert_dispatch: ragged_a2a`; MaxText's dropless EP), per device:

    1. sort this device's (token, choice) pairs by expert; count the pairs per expert and all-gather the
       counts over `expert`, so every device knows what every other one sends and receives;
    2. `jax.lax.ragged_all_to_all` sends each run of pairs to the device holding its experts;
    3. run the received rows on the local experts with the model's backend;
    4. a second `ragged_all_to_all` returns the rows to their senders, which unsort and combine them.

Only the pairs move (no token gather), at the price of a receive buffer sized for the worst case (all of
the group's pairs on one device). XLA:CPU does not implement ragged-all-to-all (jax #34755), so this form
is refused on CPU; the tests run it on simulated CPU devices with the exchange emulated by `all_to_all`
(`emulated_ragged_all_to_all`, the documented semantics) and check that the real op lowers for GPU/TPU.

Capacity under either dispatch is per expert group: C = ceil(T_g * K / E * capacity_factor) for the T_g
tokens of the group, so which pairs overflow depends on how the batch is split (as in MaxText).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from perft_jax.errors import UserError
from perft_jax.models.config import ModelConfig
from perft_jax.models.moe.experts import DISPATCH, capacity
from perft_jax.sharding import LogicalSharding

EXPERT_AXIS = "expert"


def _spec_entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _expert_shard_map(mesh: jax.sharding.Mesh, token_axes: tuple[str, ...], expert_axes: tuple[str, ...], local,
                      check_vma: bool, x, weights, indices, gate_up, down):
    """The prologue and epilogue both dispatches share: pad the tokens to equal shards, run
    `local(x, weights, indices, gate_up, down) -> (y, dropped)` per device under `shard_map` (tokens split over
    `token_axes`, experts over `expert_axes`), drop the padding. Returns (y [T, D], dropped)."""
    t = x.shape[0]
    x, weights, indices = _pad_tokens(x, weights, indices, _num_shards(mesh, token_axes))
    tokens, experts = P(_spec_entry(token_axes)), P(_spec_entry(expert_axes))
    y, dropped = jax.shard_map(local, mesh=mesh, in_specs=(tokens, tokens, tokens, experts, experts),
                               out_specs=(tokens, P()), check_vma=check_vma)(x, weights, indices, gate_up, down)
    return y[:t], dropped


@dataclasses.dataclass(frozen=True)
class RingOfExperts:
    """A dispatch (the `DISPATCH` signature) running `local`, a single-program dispatch, on each device's experts.

    Static and hashable: it becomes part of the `Experts` module's graph definition.

    Attributes:
        mesh: the device mesh.
        token_axes: mesh axes the flattened tokens [T, D] are split over (size-1 axes left out).
        expert_axes: mesh axes the expert dimension is split over: () or ("expert",).
        local: the model's backend (`local_backend`), run on the local experts.
        check_vma: `shard_map`'s type check of which values vary over which mesh axes (see `local_backend`).
    """

    mesh: jax.sharding.Mesh
    token_axes: tuple[str, ...]
    expert_axes: tuple[str, ...]
    local: Callable
    check_vma: bool = True

    def __call__(self, x, weights, indices, gate_up, down, valid=None, *, capacity_factor: float,
                 cap: int | None = None):
        """x [T, D], weights/indices [T, K], gate_up [E, D, 2I], down [E, I, D] -> (y [T, D], dropped)."""
        num_experts = gate_up.shape[0]

        def local(x, weights, indices, gate_up, down):
            gathered = EXPERT_AXIS in self.token_axes
            if gathered:  # step 1: the expert group's tokens, in the order of the devices along `expert`
                x, weights, indices = (jax.lax.all_gather(a, EXPERT_AXIS, axis=0, tiled=True)
                                       for a in (x, weights, indices))
            local_e = gate_up.shape[0]
            offset = jax.lax.axis_index(EXPERT_AXIS) * local_e if self.expert_axes else 0
            shifted = indices - offset
            valid = (shifted >= 0) & (shifted < local_e)  # step 2: pairs routed to experts held here
            # Capacity sized for all E experts over the gathered tokens, as the single-program backend sizes it.
            cap = capacity(x.shape[0], indices.shape[1], num_experts, capacity_factor)
            y, dropped = self.local(x, weights, jnp.where(valid, shifted, 0), gate_up, down, valid,
                                    capacity_factor=capacity_factor, cap=cap)
            if gathered:  # step 3: sum over the group's experts, each device keeping its own rows
                y = jax.lax.psum_scatter(y, EXPERT_AXIS, scatter_dimension=0, tiled=True)
            elif self.expert_axes:  # tokens replicated over `expert`: every device needs the full sum
                y = jax.lax.psum(y, EXPERT_AXIS)
            count_axes = tuple(dict.fromkeys(self.token_axes + self.expert_axes))
            return y, jax.lax.psum(dropped, count_axes) if count_axes else dropped

        return _expert_shard_map(self.mesh, self.token_axes, self.expert_axes, local, self.check_vma, x, weights,
                                 indices, gate_up,
                                 down)


def _num_shards(mesh: jax.sharding.Mesh, axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _pad_tokens(x, weights, indices, n: int):
    """Pad T up to a multiple of the n token shards (shard_map needs equal shards); padded rows carry zero
    weights and the index -1 (no expert's), so they are never dispatched."""
    pad = -x.shape[0] % n
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
        indices = jnp.pad(indices, ((0, pad), (0, 0)), constant_values=-1)
    return x, weights, indices


def _exclusive_cumsum(x, axis: int = -1):
    return jnp.cumsum(x, axis=axis) - x


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name: str):
    """`jax.lax.ragged_all_to_all` built from `all_to_all`, for backends without it; one slice per device
    (offsets and sizes of length n, the axis size), which is how the dispatch below calls it.

    Exactly the op's documented semantics: slice `operand[input_offsets[j]:+send_sizes[j]]` goes to device j,
    which writes it into its `output` at the offset this device gives in `output_offsets[j]`; `recv_sizes[i]`
    rows arrive from device i; other rows of `output` are kept. Every slice travels in a buffer of
    `operand`'s full length, so this moves n times more data than the real op: a test stand-in on CPU.
    """
    rows = jnp.arange(operand.shape[0])
    source = input_offsets[:, None] + rows[None, :]  # [n, P]: row r of the slice for device j
    sent = rows[None, :] < send_sizes[:, None]
    send = jnp.where(sent[..., None], operand[jnp.clip(source, 0, operand.shape[0] - 1)], 0)  # [n, P, D]
    received = jax.lax.all_to_all(send, axis_name, 0, 0, tiled=True)  # [n, P, D]: slice from device i
    offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # where device i's slice goes
    target = jnp.where(rows[None, :] < recv_sizes[:, None], offsets[:, None] + rows[None, :], output.shape[0])
    return output.at[target.reshape(-1)].set(received.reshape(-1, operand.shape[-1]), mode="drop")


@dataclasses.dataclass(frozen=True)
class RaggedAllToAll:
    """A dispatch (the `DISPATCH` signature): pairs travel to their experts' devices and back, and `local` (the
    model's backend) runs them there. Static and hashable, like `RingOfExperts`.

    Attributes:
        mesh: the device mesh.
        token_axes: mesh axes the flattened tokens [T, D] are split over; must include `expert`.
        local: the model's backend (`local_backend`), run on the received pairs.
        check_vma: as for `RingOfExperts`.
        emulate: exchange with `emulated_ragged_all_to_all` instead of `jax.lax.ragged_all_to_all` (CPU tests).
    """

    mesh: jax.sharding.Mesh
    token_axes: tuple[str, ...]
    local: Callable
    check_vma: bool = True
    emulate: bool = False

    def __call__(self, x, weights, indices, gate_up, down, valid=None, *, capacity_factor: float,
                 cap: int | None = None):
        """x [T, D], weights/indices [T, K], gate_up [E, D, 2I], down [E, I, D] -> (y [T, D], dropped)."""
        num_experts = gate_up.shape[0]
        n = self.mesh.shape[EXPERT_AXIS]
        exchange = emulated_ragged_all_to_all if self.emulate else jax.lax.ragged_all_to_all

        def local(x, weights, indices, gate_up, down):
            t_local, k = indices.shape
            local_e = gate_up.shape[0]
            # Step 1: pairs sorted by expert; padded pairs (index -1) become expert E and sort last, unsent.
            flat = jnp.where(indices < 0, num_experts, indices).reshape(-1)  # [P], P = t*K, token-major
            order = jnp.argsort(flat, stable=True)
            sorted_x = x[order // k]  # [P, D]
            counts = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # [E]; drops id E
            all_counts = jax.lax.all_gather(counts, EXPERT_AXIS)  # [n (source), E]
            to_device = all_counts.reshape(n, n, local_e).sum(-1)  # [source, destination] pairs
            me = jax.lax.axis_index(EXPERT_AXIS)
            send_sizes = to_device[me]
            input_offsets = _exclusive_cumsum(send_sizes)  # this device's runs, one per destination
            output_offsets = _exclusive_cumsum(to_device, axis=0)[me]  # after earlier sources' runs there
            recv_sizes = to_device[:, me]
            # Step 2: at most all n*P pairs of the group land here (dropless).
            buffer = n * t_local * k
            received = exchange(sorted_x, jnp.zeros((buffer, x.shape[1]), x.dtype), input_offsets, send_sizes,
                                output_offsets, recv_sizes, axis_name=EXPERT_AXIS)
            # Step 3: rows arrive source-major, each source's run sorted by expert: label them, run the experts.
            mine = jax.lax.dynamic_slice_in_dim(all_counts, me * local_e, local_e, axis=1)  # [source, local e]
            row_expert = jnp.repeat(jnp.tile(jnp.arange(local_e, dtype=jnp.int32), n), mine.reshape(-1),
                                    total_repeat_length=buffer)
            valid = (jnp.arange(buffer) < jnp.sum(mine))[:, None]
            cap = capacity(t_local * n, k, num_experts, capacity_factor)  # per expert group, as the ring
            out, dropped = self.local(received, jnp.ones((buffer, 1), x.dtype), row_expert[:, None], gate_up, down,
                                      valid, capacity_factor=capacity_factor, cap=cap)
            # Step 4: each run back to its sender, at the offset it was sent from.
            back = exchange(out, jnp.zeros_like(sorted_x), _exclusive_cumsum(recv_sizes), recv_sizes,
                            _exclusive_cumsum(to_device, axis=1)[:, me], send_sizes, axis_name=EXPERT_AXIS)
            per_pair = jnp.zeros_like(back).at[order].set(back).reshape(t_local, k, -1)
            y = jnp.einsum("tkd,tk->td", per_pair, weights)
            count_axes = tuple(dict.fromkeys(self.token_axes + (EXPERT_AXIS,)))
            return y, jax.lax.psum(dropped, count_axes)

        return _expert_shard_map(self.mesh, self.token_axes, (EXPERT_AXIS,), local, self.check_vma, x, weights,
                                 indices, gate_up,
                                 down)


def _dispatch_axes(sharding: LogicalSharding, num_experts: int, what: str) -> tuple[tuple, tuple]:
    """(token axes, expert axes) of a mesh and rules, size-1 axes left out; one-line errors when E does not split."""
    mesh = sharding.mesh
    token_axes = tuple(a for a in sharding.mesh_axes("activation_batch") if mesh.shape[a] > 1)
    expert_axes = tuple(a for a in sharding.mesh_axes("exp") if mesh.shape[a] > 1)
    if expert_axes not in ((), (EXPERT_AXIS,)):
        raise UserError(f"logical_axis_rules.exp: the {what} dispatch splits experts over mesh axis "
                        f"{EXPERT_AXIS!r} only, got {list(expert_axes)}")
    if expert_axes and num_experts % mesh.shape[EXPERT_AXIS]:
        raise UserError(f"mesh.expert: {mesh.shape[EXPERT_AXIS]} does not divide the model's {num_experts} experts")
    return token_axes, expert_axes


def local_backend(sharding: LogicalSharding, cfg: ModelConfig) -> tuple[Callable, bool]:
    """The backend each device runs under `shard_map`, and whether `shard_map` may check value variance.

    `auto` is resolved here, by the mesh's platform (grouped on CPU, kernel elsewhere), not by
    `lax.platform_dependent`: that traces every platform's branch, and the Pallas kernels cannot be traced inside a
    variance-checked `shard_map` (jax 0.10.2's `pallas_call` builds its outputs without manual-axis types). For
    the same reason the `kernel` backend runs with `check_vma=False`; the cotangents of values replicated over an
    axis are then summed by `shard_map`'s own transpose, not by the custom VJPs (layers._like)."""
    backend = cfg.moe_backend
    if backend == "auto":
        backend = "grouped" if sharding.mesh.devices.flat[0].platform == "cpu" else "kernel"
    return DISPATCH[backend], backend != "kernel"


def ring_of_experts(sharding: LogicalSharding, cfg: ModelConfig) -> RingOfExperts:
    """The ring for a mesh and rules around the model's backend; a one-line error when E does not split."""
    token_axes, expert_axes = _dispatch_axes(sharding, cfg.num_experts, "ring")
    return RingOfExperts(sharding.mesh, token_axes, expert_axes, *local_backend(sharding, cfg))


def ragged_all_to_all(sharding: LogicalSharding, cfg: ModelConfig,
                      emulate: bool = False) -> RaggedAllToAll | RingOfExperts:
    """The ragged all-to-all dispatch; with experts not split (expert axis of size 1) nothing has to travel,
    and the ring (then a plain local call) is returned. One-line errors on CPU and for unusable rules."""
    token_axes, expert_axes = _dispatch_axes(sharding, cfg.num_experts, "ragged_a2a")
    local, check_vma = local_backend(sharding, cfg)
    if not expert_axes:
        return RingOfExperts(sharding.mesh, token_axes, expert_axes, local, check_vma)
    if EXPERT_AXIS not in token_axes:
        raise UserError("mesh.expert_dispatch: ragged_a2a needs the batch split over 'expert' too "
                        "(logical_axis_rules.activation_batch must include expert); use ring otherwise")
    platform = sharding.mesh.devices.flat[0].platform
    if platform == "cpu" and not emulate:
        raise UserError("mesh.expert_dispatch: ragged_a2a needs a GPU or TPU (XLA:CPU does not implement "
                        "ragged-all-to-all, jax #34755); use ring on CPU")
    return RaggedAllToAll(sharding.mesh, token_axes, local, check_vma, emulate)


def gspmd(sharding: LogicalSharding, cfg: ModelConfig) -> Callable:
    """The model's backend as a single program, partitioned by XLA from the weights' and tokens' shardings."""
    return DISPATCH[cfg.moe_backend]


# `mesh.expert_dispatch` -> a factory (sharding, model config) -> the dispatch `Experts` is built with.
EXPERT_DISPATCH = {"ring": ring_of_experts, "ragged_a2a": ragged_all_to_all, "gspmd": gspmd}


def expert_dispatch(sharding: LogicalSharding, mode: str | Callable, cfg: ModelConfig) -> Callable:
    """The experts' dispatch on a mesh: `mode` names an `EXPERT_DISPATCH` entry, or is such a factory itself
    (e.g. `functools.partial(ragged_all_to_all, emulate=True)` in tests)."""
    if callable(mode):
        return mode(sharding, cfg)
    if mode not in EXPERT_DISPATCH:
        raise UserError(f"mesh.expert_dispatch: expected one of {', '.join(map(repr, EXPERT_DISPATCH))}, got {mode!r}")
    return EXPERT_DISPATCH[mode](sharding, cfg)
