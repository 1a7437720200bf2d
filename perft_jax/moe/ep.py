"""Expert parallelism: the ring-of-experts dispatch under `jax.shard_map` (spec/ENGINEERING.md §5).

The stacked expert weights [E, ...] are split over the mesh axis `expert` (each device holds E / n
experts) and the tokens over the batch axes (`activation_batch`, by default data x fsdp x expert). Per
device, inside `shard_map`:

    1. all-gather the tokens (and their top-k routing) over `expert`: every device of an expert group sees
       the group's tokens; the gather happens before the k-fold pair replication, which suits large top-k;
    2. keep the (token, choice) pairs routed to this device's experts and run them with the model's own
       backend (dense / capacity / ragged) on the local experts;
    3. `psum_scatter` the partial outputs over `expert`: each device gets the sum over all experts for its
       own tokens back.

It runs on CPU test meshes (ragged all-to-all does not: XLA:CPU lacks it, jax #34755). Weights that are
also split over `fsdp` / `tensor` are gathered on entry, as FSDP does right before use.

Capacity under this dispatch is per expert group: C = ceil(T_g * K / E * capacity_factor) for the T_g
tokens the group gathered, so which pairs overflow depends on how the batch is split (as in MaxText).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from perft_jax.errors import UserError
from perft_jax.moe.experts import Experts, capacity, capacity_dispatch, dense_dispatch, ragged_dispatch
from perft_jax.sharding import LogicalSharding

EXPERT_AXIS = "expert"


def _spec_entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


@dataclasses.dataclass(frozen=True)
class RingOfExperts:
    """A static, hashable dispatch for `Experts.parallel` (it becomes part of the module's graph definition).

    Attributes:
        mesh: the device mesh.
        token_axes: mesh axes the flattened tokens [T, D] are split over (size-1 axes left out).
        expert_axes: mesh axes the expert dimension is split over: () or ("expert",).
    """

    mesh: jax.sharding.Mesh
    token_axes: tuple[str, ...]
    expert_axes: tuple[str, ...]

    @property
    def num_token_shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.token_axes)

    def __call__(self, x, weights, indices, gate_up, down, backend: str, capacity_factor: float):
        """x [T, D], weights/indices [T, K], gate_up [E, D, 2I], down [E, I, D] -> (y [T, D], dropped)."""
        t = x.shape[0]
        n = self.num_token_shards
        pad = -t % n  # shard_map needs equal shards; padded rows carry zero weights and are cut off again
        if pad:
            x = jnp.pad(x, ((0, pad), (0, 0)))
            weights = jnp.pad(weights, ((0, pad), (0, 0)))
            indices = jnp.pad(indices, ((0, pad), (0, 0)), constant_values=-1)  # no expert's: never dispatched
        tokens = P(_spec_entry(self.token_axes))
        experts = P(_spec_entry(self.expert_axes))
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
            shifted = jnp.where(valid, shifted, 0)
            if backend == "dense":
                y, dropped = dense_dispatch(x, weights, shifted, gate_up, down, valid)
            elif backend == "capacity":
                # Sized for all E experts over the gathered tokens, as the single-program backend sizes it.
                cap = capacity(x.shape[0], indices.shape[1], num_experts, capacity_factor)
                y, dropped = capacity_dispatch(x, weights, shifted, gate_up, down, capacity_factor, valid, cap)
            else:
                y, dropped = ragged_dispatch(x, weights, shifted, gate_up, down, valid)
            if gathered:  # step 3: sum over the group's experts, each device keeping its own rows
                y = jax.lax.psum_scatter(y, EXPERT_AXIS, scatter_dimension=0, tiled=True)
            elif self.expert_axes:  # tokens replicated over `expert`: every device needs the full sum
                y = jax.lax.psum(y, EXPERT_AXIS)
            count_axes = tuple(dict.fromkeys(self.token_axes + self.expert_axes))
            return y, jax.lax.psum(dropped, count_axes) if count_axes else dropped

        y, dropped = jax.shard_map(local, mesh=self.mesh, in_specs=(tokens, tokens, tokens, experts, experts),
                                   out_specs=(tokens, P()), check_vma=True)(x, weights, indices, gate_up, down)
        return (y[:t] if pad else y), dropped


def ring_of_experts(sharding: LogicalSharding, num_experts: int) -> RingOfExperts:
    """The dispatch for a mesh and rules; a one-line error when E does not split over `expert`."""
    mesh = sharding.mesh
    token_axes = tuple(a for a in sharding.mesh_axes("activation_batch") if mesh.shape[a] > 1)
    expert_axes = tuple(a for a in sharding.mesh_axes("exp") if mesh.shape[a] > 1)
    if expert_axes not in ((), (EXPERT_AXIS,)):
        raise UserError(f"logical_axis_rules.exp: the ring dispatch splits experts over mesh axis {EXPERT_AXIS!r} "
                        f"only, got {list(expert_axes)}")
    if expert_axes and num_experts % mesh.shape[EXPERT_AXIS]:
        raise UserError(f"mesh.expert: {mesh.shape[EXPERT_AXIS]} does not divide the model's {num_experts} experts")
    return RingOfExperts(mesh, token_axes, expert_axes)


def configure_expert_dispatch(model: nnx.Module, sharding: LogicalSharding, mode: str) -> nnx.Module:
    """`mode` "ring": the shard_map dispatch above; "gspmd": the model's backend, partitioned by XLA."""
    if mode == "ring":
        return enable_expert_parallelism(model, sharding)
    if mode == "gspmd":
        return disable_expert_parallelism(model)
    raise UserError(f"mesh.expert_dispatch: expected one of 'ring', 'gspmd', got {mode!r}")


def enable_expert_parallelism(model: nnx.Module, sharding: LogicalSharding) -> nnx.Module:
    """Make every `Experts` module of `model` dispatch with the ring of experts over `sharding`'s mesh."""
    for _, module in nnx.iter_graph(model):
        if isinstance(module, Experts):
            module.parallel = ring_of_experts(sharding, module.gate_up.shape[0])
    return model


def disable_expert_parallelism(model: nnx.Module) -> nnx.Module:
    for _, module in nnx.iter_graph(model):
        if isinstance(module, Experts):
            module.parallel = None
    return model
