"""The optimizer of a PERFT run: AdamW (perft_jax/optim.py) over the adapters only.

`nnx.Optimizer(model, tx, wrt=AdapterParam)` keeps optimizer state for adapter parameters alone, and
the train step differentiates only the adapter state (`nnx.DiffState(0, AdapterParam)`), so no
base-sized gradient or moment ever exists. (`optax.masked` alone would not freeze anything: it passes
the raw gradient through for masked-out leaves — spec/ENGINEERING.md §4.)
"""
from __future__ import annotations

from flax import nnx

from perft_jax.optim import OptimConfig, make_transform
from perft_jax.perft.adapters import AdapterParam
from perft_jax.perft.attach import placed_like_base


def make_optimizer(model: nnx.Module, cfg: OptimConfig) -> nnx.Optimizer:
    """AdamW state for `AdapterParam` leaves only; the base model has neither state nor updates."""
    optimizer = nnx.Optimizer(model, make_transform(cfg), wrt=AdapterParam)
    # Committed where the adapters live, so the first update does not change the step's inputs (moments split
    # like their adapters under mesh.shard_adapters: they carry the adapters' logical axes).
    nnx.update(optimizer, placed_like_base(model, nnx.state(optimizer)))
    return optimizer
