"""The sparse MoE block: frozen router + stacked experts, plus an optional adapter branch (PERFT).

It returns its router logits (for load-balancing losses and router statistics) and the number of
(token, expert) pairs a capacity backend dropped, beside the output. When an adapter branch is attached
(`block.adapters`, see perft_jax/perft/attach.py) it sees the block input and the frozen router's choice,
and its output is added to the experts' (spec/PERFT.md §3).
"""
from __future__ import annotations

import flax.struct
import jax
from flax import nnx

from perft_jax.models.config import ModelConfig
from perft_jax.models.moe.experts import Experts
from perft_jax.models.moe.router import TopKRouter


@flax.struct.dataclass
class MoeAux:
    router_logits: jax.Array  # [B, T, E] the frozen router's logits
    dropped: jax.Array  # int32 scalar: (token, expert) pairs a capacity backend dropped
    adapter_router_logits: jax.Array | None = None  # [B, T, M] a routed PERFT branch's router logits


class SparseMoeBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dispatch=None):
        self.router = TopKRouter(cfg, rngs)
        self.experts = Experts(cfg, rngs, dispatch)
        self.adapters = nnx.data(None)  # a PERFT branch: (x, weights, indices) -> (delta, adapter router logits)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, MoeAux]:
        """x [B, T, D] -> (y [B, T, D], MoeAux)."""
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        router_logits, weights, indices = self.router(flat)
        y, dropped = self.experts(flat, weights, indices)
        adapter_logits = None
        if self.adapters is not None:
            delta, adapter_logits = self.adapters(flat, weights, indices)
            y = y + delta.astype(y.dtype)
            if adapter_logits is not None:
                adapter_logits = adapter_logits.reshape(b, t, -1)
        aux = MoeAux(router_logits=router_logits.reshape(b, t, -1), dropped=dropped,
                     adapter_router_logits=adapter_logits)
        return y.reshape(b, t, d), aux
