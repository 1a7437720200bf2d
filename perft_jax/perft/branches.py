"""The PERFT compositions: how adapter experts sit beside a frozen MoE block (spec/PERFT.md §3).

Each branch is called by the MoE block with the block input and the frozen router's decision:

    delta, adapter_router_logits = branch(x [T, D], base_weights [T, k], base_indices [T, k])

and the block adds `delta` to its output. `adapter_router_logits` [T, M] is None for unrouted branches;
the training losses read it for the adapter router's auxiliary loss.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from perft_jax.models.moe.routing import topk_routing
from perft_jax.perft.adapters import AdapterBank, AdapterParam
from perft_jax.perft.config import PerftConfig
from perft_jax.perft.dynmole import dynmole_routing


class SharedAdapters(nnx.Module):
    """PERFT-S (M = 1) and PERFT-D: always-on adapters, outputs summed without weights."""

    def __init__(self, num: int, width: int, cfg: PerftConfig, rngs: nnx.Rngs, param_dtype, dtype):
        self.bank = AdapterBank(num, width, cfg, rngs, param_dtype, dtype)

    def __call__(self, x, base_weights, base_indices):
        return self.bank(x), None


class EmbeddedAdapters(nnx.Module):
    """PERFT-E: adapter i lives inside base expert i, so it is weighted by the frozen router's g_i.

    `dispatch`: how the routed bank runs (`AdapterBank.routed`: a routed pipeline's name, or "dense").
    """

    def __init__(self, num_experts: int, width: int, cfg: PerftConfig, rngs: nnx.Rngs, param_dtype, dtype,
                 dispatch: str = "grouped"):
        self.bank = AdapterBank(num_experts, width, cfg, rngs, param_dtype, dtype)
        self.dispatch = dispatch

    def __call__(self, x, base_weights, base_indices):
        # sum_{i in topk} g_i (E_i(x) + A_i(x)) = MoE(x) + sum_i g_i A_i(x). The base's own (weights, indices)
        # through the base's pipeline: the same sorted layout, which XLA computes once for both (its CSE merges
        # the two identical sorts; tests/perft/test_branches.py pins the count), so no layout is passed around.
        return self.bank.routed(x, base_weights, base_indices, self.dispatch), None


class RoutedAdapters(nnx.Module):
    """PERFT-R: M adapters behind their own bias-free router (top-K or DynMoLE); the settings are read from the
    one PerftConfig the bank holds (`self.bank.cfg`)."""

    def __init__(self, width: int, cfg: PerftConfig, base_renormalize: bool, rngs: nnx.Rngs, param_dtype, dtype,
                 dispatch: str = "grouped"):
        init = jax.random.normal(rngs.params(), (width, cfg.num_adapters), jnp.float32) * cfg.router_init_std
        self.router = AdapterParam(init.astype(param_dtype), axes=("embed", "adapters"))
        self.bank = AdapterBank(cfg.num_adapters, width, cfg, rngs, param_dtype, dtype)
        # PERFT.md §3: renormalise the K weights exactly when the base block does (OLMoE iff norm_topk_prob).
        self.renormalize = base_renormalize
        self.dispatch = dispatch
        self.dtype = dtype

    def __call__(self, x, base_weights, base_indices):
        cfg = self.bank.cfg
        logits = jnp.dot(x.astype(self.dtype), self.router[...].astype(self.dtype))  # [T, M]
        if cfg.router == "dynmole":
            # A token may select any number of adapters (broadcast: all M), so the bank runs densely.
            gates = dynmole_routing(logits, cfg.dynmole).weights  # unnormalised, zeros off the selection
            return self.bank(x, gates), logits
        weights, indices, _ = topk_routing(logits, cfg.top_k, self.renormalize)
        if cfg.adapter_gate_weights == "base_router_rank":
            # Reference OLMoE quirk: the s-th chosen adapter gets the s-th largest base weight.
            weights = base_weights[:, : cfg.top_k].astype(jnp.float32)
        return self.bank.routed(x, weights, indices, self.dispatch), logits
