"""The frozen base-model router: top-k of a float32 softmax over the experts.

Matches HF `OlmoeTopKRouter` / `MixtralTopKRouter`: logits in the compute dtype, softmax in float32,
top-k of the probabilities, renormalised over the k only when `norm_topk_prob` (OLMoE-1B-7B: no;
Mixtral: always), then cast to the compute dtype before they weight expert outputs.
"""
from __future__ import annotations

import jax
from flax import nnx

from perft_jax.models.config import ModelConfig
from perft_jax.models.layers import matmul, normal_init
from perft_jax.models.moe.routing import topk_routing


class TopKRouter(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        # Stored (in, out) = (D, E): the HF `gate.weight` (E, D) transposed.
        self.kernel = nnx.Param(normal_init(rngs, (cfg.hidden_size, cfg.num_experts), 0.02, cfg.jnp_param_dtype),
                                axes=("embed", "exp_router"))
        self.k = cfg.num_experts_per_tok
        self.renormalize = cfg.norm_topk_prob
        self.dtype = cfg.jnp_dtype

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [T, D] -> (router_logits [T, E], weights [T, K] compute dtype, indices [T, K] int32)."""
        logits = matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        weights, indices, _ = topk_routing(logits, self.k, self.renormalize)
        return logits, weights.astype(self.dtype), indices
