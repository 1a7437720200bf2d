"""The sparse MoE block: frozen router + stacked experts.

It returns its router logits (for load-balancing losses and router statistics) and the number of
(token, expert) pairs a capacity backend dropped, beside the output.
"""
from __future__ import annotations

import jax
from flax import nnx

from perft_jax.models.config import ModelConfig
from perft_jax.moe.experts import Experts
from perft_jax.moe.router import TopKRouter


class SparseMoeBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.router = TopKRouter(cfg, rngs)
        self.experts = Experts(cfg, rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, D] -> (y [B, T, D], router_logits [B, T, E], dropped pairs)."""
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        router_logits, weights, indices = self.router(flat)
        y, dropped = self.experts(flat, weights, indices)
        return y.reshape(b, t, d), router_logits.reshape(b, t, -1), dropped
