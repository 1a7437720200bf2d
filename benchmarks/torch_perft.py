"""PERFT-R for Hugging Face PyTorch OLMoE: the reference side of the train-step benchmark.

Written from spec/PERFT.md §2-§4 (and perft_jax/perft/branches.py `RoutedAdapters` for the semantics), in the
style of HF's own expert loop, which is how the reference PERFT code computes its routed adapters:

    logits = W̃_g x (no bias) -> softmax in float32 over M -> top-K -> renormalise iff norm_topk_prob
    -> cast to the compute dtype -> y' = moe(x) + sum_{j in topK} g_j W2_j silu(W1_j x)

`attach_perft_r` wraps every `OlmoeSparseMoeBlock.forward`; the modules sit under the reference code's names
(`mlp.shared_routing_adapter_gate`, `mlp.shared_routing_adapter.{j}.unit.adapter_w{1,2}`, PERFT.md §6), so an
adapter file written by perft_jax's `save_adapters` loads with `load_state_dict(strict=False)`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func


class ParallelAdapter(nn.Module):
    """x -> W2 silu(W1 x) (reference `Parallel_Adapter`, dropout 0). Weights stay float32 under a bf16 base
    and are cast to the compute dtype, as perft_jax does."""

    def __init__(self, hidden: int, bottleneck: int):
        super().__init__()
        self.adapter_w1 = nn.Linear(hidden, bottleneck, bias=False)
        self.adapter_w2 = nn.Linear(bottleneck, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(F.linear(x, self.adapter_w1.weight.to(x.dtype)))
        return F.linear(h, self.adapter_w2.weight.to(x.dtype))


class AdapterExpert(nn.Module):
    """The reference wraps each adapter as `.unit`; kept for the state-dict names."""

    def __init__(self, hidden: int, bottleneck: int):
        super().__init__()
        self.unit = ParallelAdapter(hidden, bottleneck)


class RoutedAdapters:
    """The PERFT-R branch of one MoE block: `forward(x [B, T, H]) -> delta [B, T, H]`.

    A plain object, not a submodule: its gate and experts are registered on the MoE block under the
    reference names, and this object only holds references to them.
    """

    def __init__(self, gate: nn.Linear, experts: nn.ModuleList, top_k: int, renormalize: bool, sink: list):
        self.gate, self.experts, self.top_k, self.renormalize, self.sink = gate, experts, top_k, renormalize, sink

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [N, H]
        logits = F.linear(flat, self.gate.weight.to(flat.dtype))  # [N, M]
        self.sink.append(logits)  # for the adapter router's load-balancing loss
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)  # [N, K]
        if self.renormalize:  # PERFT.md §3: exactly when the base block renormalises (OLMoE: norm_topk_prob)
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(flat.dtype)
        out = torch.zeros_like(flat)
        for j, expert in enumerate(self.experts):  # HF expert-loop style: adapter j sees its routed tokens only
            token, slot = torch.where(indices == j)
            if token.numel():
                out.index_add_(0, token, expert.unit(flat[token]) * weights[token, slot, None])
        return out.view_as(x)


def attach_perft_r(model, num_adapters: int, top_k: int, bottleneck: int, seed: int = 0) -> list:
    """Freeze `model` (an OlmoeForCausalLM) and add a PERFT-R branch to every MoE block, in place.

    Returns the list the branches append their router logits to during a forward (clear it before each).
    Adapters are float32 whatever the base dtype. Their initial values are irrelevant here: the benchmark
    loads the same weights as the perft-jax side.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    hidden = model.config.hidden_size
    sink: list = []
    for layer in model.model.layers:
        block = layer.mlp
        block.shared_routing_adapter_gate = nn.Linear(hidden, num_adapters, bias=False)
        block.shared_routing_adapter = nn.ModuleList(AdapterExpert(hidden, bottleneck) for _ in range(num_adapters))
        branch = RoutedAdapters(block.shared_routing_adapter_gate, block.shared_routing_adapter, top_k,
                                model.config.norm_topk_prob, sink)
        block.forward = _wrapped(block.forward, branch)
    return sink


def _wrapped(moe_forward, branch):
    def forward(hidden_states, *args, **kwargs):
        out = moe_forward(hidden_states, *args, **kwargs)
        delta = branch(hidden_states)  # the adapter input is the MoE block's input (PERFT.md §8.1)
        if isinstance(out, tuple):  # some transformers versions return (hidden, router_logits)
            return (out[0] + delta, *out[1:])
        return out + delta
    return forward


def adapter_parameters(model) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def training_loss(model, sink: list, batch: dict[str, torch.Tensor], num_adapters: int, top_k: int,
                  adapter_aux_coef: float) -> dict[str, torch.Tensor]:
    """LM loss + base-router aux (HF, coef from the config) + adapter-router aux, as perft_jax's `training_losses`."""
    sink.clear()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                output_router_logits=True)
    adapter_aux = load_balancing_loss_func(tuple(sink), num_adapters, top_k, batch["attention_mask"])
    total = out.loss + adapter_aux_coef * adapter_aux  # out.loss already holds LM + coef * base aux
    return {"total": total, "base_router_aux": out.aux_loss, "adapter_router_aux": adapter_aux,
            "logits": out.logits}


def grads_in_jax_layout(model) -> dict[str, np.ndarray]:
    """Adapter gradients keyed `layers.L.{router,adapter_w1,adapter_w2}`, in perft_jax's stacked (in, out)
    layout: router [H, M], adapter_w1 [M, H, R], adapter_w2 [M, R, H]."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        block = layer.mlp
        out[f"layers.{i}.router"] = block.shared_routing_adapter_gate.weight.grad.T.numpy()
        for name in ("adapter_w1", "adapter_w2"):
            out[f"layers.{i}.{name}"] = np.stack(
                [getattr(e.unit, name).weight.grad.T.numpy() for e in block.shared_routing_adapter])
    return out
