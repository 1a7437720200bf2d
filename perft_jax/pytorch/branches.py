"""The PERFT compositions beside a transformers sparse-MoE block (spec/PERFT.md §3), one rule per variant.

A branch adds its adapter modules to the block under the reference code's names (`shared_adapter`,
`shared_routing_adapter_gate` + `shared_routing_adapter`; PERFT-E's per-expert adapters as
`embedded_routing_adapter`, since transformers 5 fuses the experts into one module) and computes

    delta [T, H] = branch.delta(block, x [T, H], base_weights [T, k], base_indices [T, k])

from the block input and the frozen router's decision, which the block adds to its output (perft_jax's
perft/branches.py, which these follow operation for operation). The block's forward is left as transformers wrote
it: a forward hook on its router remembers the decision the base experts used (`remember_routing`), and one on
the block (`Branch.__call__`) adds the delta. A branch is a frozen dataclass holding settings only; it finds its
modules on the block it is called with, so a deep copy of the model stays self-contained.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from perft_jax.perft.config import PerftConfig
from perft_jax.pytorch.modules import adapter_bank, adapter_router
from perft_jax.pytorch.routing import dynmole_gates, topk_routing

# Where the router's forward hook leaves (logits, weights, indices) for the block's hook to take.
_ROUTING = "_perft_base_routing"


def remember_routing(gate: nn.Module, args, output) -> None:
    """Forward hook of the block's frozen router: keep its decision for the block's hook (which pops it)."""
    gate.__dict__[_ROUTING] = output


def gated_sum(units: nn.ModuleList, x: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
    """Every adapter on every token: sum_j gates[:, j] A_j(x) (gates None: all weighted 1)."""
    return sum(unit(x, None if gates is None else gates[:, j]) for j, unit in enumerate(units))


def routed_sum(units: nn.ModuleList, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Only the chosen adapters, in HF's expert-loop style: sum_k weights[t, k] A_{indices[t, k]}(x_t)."""
    out = torch.zeros_like(x)
    for j, unit in enumerate(units):
        token, slot = torch.where(indices == j)
        out.index_add_(0, token, unit(x[token], weights[token, slot]))
    return out


@dataclasses.dataclass(frozen=True)
class Branch:
    """A variant's rule: which modules it adds to a block (`modules`) and how they compute (`delta`)."""

    cfg: PerftConfig
    renormalize: bool  # the base block renormalises its top-k weights (OLMoE: norm_topk_prob; Mixtral: always)
    # The block's attribute holding the adapter experts (a ModuleList).
    units: ClassVar[str]

    def modules(self, hidden: int, num_experts: int, generator: torch.Generator, device) -> dict[str, nn.Module]:
        raise NotImplementedError

    def delta(self, block: nn.Module, x, base_weights, base_indices) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, block: nn.Module, args, kwargs, output: torch.Tensor) -> torch.Tensor:
        """Forward hook of the block (`with_kwargs=True`): output [B, T, H] + the delta of its input."""
        x = args[0] if args else kwargs["hidden_states"]  # the block input: post-attention-norm (PERFT.md §8.1)
        _, weights, indices = block.gate.__dict__.pop(_ROUTING)
        flat = x.reshape(-1, x.shape[-1])
        # Base weights in the compute dtype, as perft_jax's router returns them (HF Mixtral keeps float32).
        delta = self.delta(block, flat, weights.to(flat.dtype), indices)
        return output + delta.view_as(output).to(output.dtype)


class SharedBranch(Branch):
    """PERFT-S (M = 1) and PERFT-D: always-on adapters, summed without weights."""

    units = "shared_adapter"

    def modules(self, hidden, num_experts, generator, device):
        num = 1 if self.cfg.variant == "perft_s" else self.cfg.num_adapters
        return {self.units: adapter_bank(num, hidden, self.cfg, generator, device)}

    def delta(self, block, x, base_weights, base_indices):
        return gated_sum(getattr(block, self.units), x, None)


class RoutedBranch(Branch):
    """PERFT-R: M adapters behind their own router, top-K (renormalised iff the base renormalises) or DynMoLE."""

    units = "shared_routing_adapter"
    router: ClassVar[str] = "shared_routing_adapter_gate"

    def modules(self, hidden, num_experts, generator, device):
        return {self.router: adapter_router(hidden, self.cfg, generator, device),
                self.units: adapter_bank(self.cfg.num_adapters, hidden, self.cfg, generator, device)}

    def delta(self, block, x, base_weights, base_indices):
        cfg, units = self.cfg, getattr(block, self.units)
        logits = getattr(block, self.router)(x)  # [T, M] in the compute dtype
        if cfg.router == "dynmole":
            return gated_sum(units, x, dynmole_gates(logits, cfg.dynmole))
        weights, indices = topk_routing(logits, cfg.top_k, self.renormalize)
        if cfg.adapter_gate_weights == "base_router_rank":
            # Reference OLMoE quirk (PERFT.md §3): the s-th chosen adapter gets the s-th largest base weight.
            weights = base_weights[:, : cfg.top_k]
        return routed_sum(units, x, weights, indices)


class EmbeddedBranch(Branch):
    """PERFT-E: adapter i inside base expert i, weighted by the frozen router's g_i: sum_{i in topk} g_i A_i(x)."""

    units = "embedded_routing_adapter"

    def modules(self, hidden, num_experts, generator, device):
        return {self.units: adapter_bank(num_experts, hidden, self.cfg, generator, device)}

    def delta(self, block, x, base_weights, base_indices):
        return routed_sum(getattr(block, self.units), x, base_weights, base_indices)


BRANCHES: dict[str, type[Branch]] = {"perft_s": SharedBranch, "perft_d": SharedBranch, "perft_r": RoutedBranch,
                                     "perft_e": EmbeddedBranch}
