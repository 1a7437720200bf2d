"""Multi-host runs: starting `jax.distributed`, and global batches built from each process's rows.

Every process runs the same program. After `initialize`, `jax.devices()` lists the devices of all
processes, a mesh spans them (perft_jax/sharding.py), and jitted steps run as one SPMD program. Data:
every process builds the same global batch of token ids (cheap), keeps only the rows its own devices
hold, and `global_batch` assembles the global `jax.Array` with `jax.make_array_from_process_local_data`,
so no process ever transfers another's rows to its devices.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from perft_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """The `mesh.distributed` config section.

    Either `coordinator_address` with `num_processes` and `process_id` (explicit, e.g. per-host command
    lines), or `auto: true`: JAX detects the cluster (Cloud TPU pods, SLURM, Open MPI, Kubernetes) and reads
    `JAX_COORDINATOR_ADDRESS` from the environment. Neither: a single-process run.
    """

    coordinator_address: str = ""  # host:port of process 0
    num_processes: int = 0  # with coordinator_address: how many processes the run has
    process_id: int = -1  # with coordinator_address: this process's rank, 0 .. num_processes - 1
    auto: bool = False  # let JAX detect the cluster (Cloud TPU, SLURM, Open MPI, Kubernetes)
    initialization_timeout: int = 300  # seconds to wait for every process to join

    def enabled(self) -> bool:
        return bool(self.coordinator_address) or self.auto

    def validate_config(self, prefix: str = "mesh.distributed") -> DistributedConfig:
        if self.coordinator_address and self.auto:
            raise UserError(f"{prefix}.auto: set either {prefix}.coordinator_address or auto, not both")
        if self.coordinator_address:
            if ":" not in self.coordinator_address:
                raise UserError(f"{prefix}.coordinator_address: expected host:port, got {self.coordinator_address!r}")
            if self.num_processes < 1:
                raise UserError(f"{prefix}.num_processes: expected a positive integer with coordinator_address, "
                                f"got {self.num_processes!r}")
            if not 0 <= self.process_id < self.num_processes:
                raise UserError(f"{prefix}.process_id: expected an integer in [0, {self.num_processes}), "
                                f"got {self.process_id!r}")
        if self.initialization_timeout < 1:
            raise UserError(f"{prefix}.initialization_timeout: expected a positive integer, "
                            f"got {self.initialization_timeout!r}")
        return self


def initialize(cfg: DistributedConfig) -> bool:
    """Start `jax.distributed` as `cfg` says (once; before any computation). Returns whether it is running."""
    if jax.distributed.is_initialized():
        return True
    if not cfg.enabled():
        return False
    cfg.validate_config()
    try:
        if cfg.auto:
            jax.distributed.initialize(initialization_timeout=cfg.initialization_timeout)
        else:
            jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id,
                                       initialization_timeout=cfg.initialization_timeout)
    except (ValueError, RuntimeError) as e:
        key = "auto" if cfg.auto else "coordinator_address"
        raise UserError(f"mesh.distributed.{key}: jax.distributed.initialize failed ({e})") from None
    return True


def process_rows(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...], batch_dim: int = 0) -> slice:
    """The contiguous range of global batch rows that this process's devices hold under `sharding`.

    Usually `[p * B / P, (p + 1) * B / P)`; derived from the sharding itself, so it is right for any mesh
    layout (a batch replicated across processes gives every process all rows).
    """
    size = global_shape[batch_dim]
    ranges = sorted({index[batch_dim].indices(size)[:2] if index else (0, size)
                     for index in sharding.addressable_devices_indices_map(global_shape).values()})
    start, stop = ranges[0][0], ranges[0][0]
    for first, last in ranges:  # devices holding the same rows (replicas) give the same range once
        if first > stop:
            raise UserError(f"mesh: this process's devices hold batch rows {ranges} with gaps between them; "
                            "keep `data` the outermost mesh axis so that each host holds one block of rows")
        stop = max(stop, last)
    return slice(start, stop)


def global_batch(batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding,
                 batch_dim: int = 0) -> dict[str, jax.Array]:
    """Global arrays from a global host batch ([B, T] or [A, B, T]), transferring only this process's rows.

    In a single-process run this is a sharded `device_put`; with several processes each one passes only
    its rows to `jax.make_array_from_process_local_data`.
    """
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        rows = process_rows(sharding, value.shape, batch_dim)
        local = value[(slice(None),) * batch_dim + (rows,)]
        out[key] = jax.make_array_from_process_local_data(sharding, local, value.shape)
    return out


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process; every process gets the same answer (a collective: all processes
    must call it at the same point of the program). With one process, `flag` itself.

    The training loop asks this once per step about its local preemption signal, so a SIGTERM that reaches one
    host makes every host save the same step and stop. (`multihost_utils.reached_preemption_sync_point` relies
    on the coordination service's own SIGTERM notifier, which the loop's Python SIGTERM/SIGINT handler would
    replace, and it never sees SIGINT.)
    """
    if jax.process_count() == 1:
        return bool(flag)
    flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
    return bool(np.any(flags))


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as a host array on every process (gathered across processes when it spans several)."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def is_main_process() -> bool:
    """Process 0 writes logs, metrics, progress bars and exported files; the others only compute."""
    return jax.process_index() == 0
