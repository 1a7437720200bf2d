"""PERFT adapter experts as PyTorch modules (spec/PERFT.md §2), under the reference code's module names.

A `LoRA` unit holds `lora_A` (r, H) and `lora_B` (H, r); a `ParallelAdapter` unit `adapter_w1` (D_B, H) and
`adapter_w2` (H, D_B); each sits in an `AdapterExpert` as `.unit`, so a bank's state-dict names read as the
reference's (`shared_adapter.0.unit.lora_A.weight`). The weights stay float32 under a bfloat16 base and are cast to
the input's dtype (the model's compute dtype) at each call, as perft_jax computes them (perft/adapters.py).

Semantics, as perft_jax's `AdapterBank`: LoRA x -> B (A dropout(x) * alpha / r); parallel adapter
x -> W2 act(dropout(W1 x)). An optional per-token gate [T] scales the bottleneck activations before the second
matrix (where perft_jax applies routing weights). Dropout follows the module's train / eval mode.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from perft_jax.perft.config import PerftConfig

# As HF's ACT2FN and perft_jax's ACTIVATIONS: "gelu" is the exact (erf) form.
ACTIVATIONS = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu, "identity": lambda x: x}


class CastLinear(nn.Linear):
    """A bias-free float32 `nn.Linear` computed in its input's dtype (adapter matrices, adapter routers)."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def _init(weight: torch.Tensor, std: float, generator: torch.Generator) -> None:
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=generator) * std)


def _init_pair(first: CastLinear, second: CastLinear, cfg: PerftConfig, generator: torch.Generator) -> None:
    """Reference init (PERFT `utils.py`): first ~ randn * sqrt(2 / out), out = r or D_B; second ~ randn * 1e-6,
    or exact zeros with `init: zero`."""
    _init(first.weight, math.sqrt(2.0 / first.out_features), generator)
    _init(second.weight, 0.0 if cfg.init == "zero" else 1e-6, generator)


def _gated(h: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return h if gate is None else h * gate.to(h.dtype)[:, None]


class LoRA(nn.Module):
    """x [T, H] -> B (A dropout(x) * alpha / r) [T, H] (reference `LoRA`)."""

    def __init__(self, hidden: int, cfg: PerftConfig, generator: torch.Generator, device=None):
        super().__init__()
        self.lora_A = CastLinear(hidden, cfg.bottleneck, device)
        self.lora_B = CastLinear(cfg.bottleneck, hidden, device)
        self.dropout = nn.Dropout(cfg.dropout)
        self.scale = cfg.lora_alpha / cfg.bottleneck
        _init_pair(self.lora_A, self.lora_B, cfg, generator)

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        return self.lora_B(_gated(self.lora_A(self.dropout(x)) * self.scale, gate))


class ParallelAdapter(nn.Module):
    """x [T, H] -> W2 act(dropout(W1 x)) [T, H] (reference `Parallel_Adapter`: dropout after W1)."""

    def __init__(self, hidden: int, cfg: PerftConfig, generator: torch.Generator, device=None):
        super().__init__()
        self.adapter_w1 = CastLinear(hidden, cfg.bottleneck, device)
        self.adapter_w2 = CastLinear(cfg.bottleneck, hidden, device)
        self.dropout = nn.Dropout(cfg.dropout)
        self.act = ACTIVATIONS[cfg.activation]
        _init_pair(self.adapter_w1, self.adapter_w2, cfg, generator)

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        return self.adapter_w2(_gated(self.act(self.dropout(self.adapter_w1(x))), gate))


FORMS = {"lora": LoRA, "parallel_adapter": ParallelAdapter}


class AdapterExpert(nn.Module):
    """One adapter expert; the reference wraps its function as `.unit`, kept for the state-dict names."""

    def __init__(self, hidden: int, cfg: PerftConfig, generator: torch.Generator, device=None):
        super().__init__()
        self.unit = FORMS[cfg.adapter](hidden, cfg, generator, device)

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        return self.unit(x, gate)


def adapter_bank(num: int, hidden: int, cfg: PerftConfig, generator: torch.Generator, device=None) -> nn.ModuleList:
    """M adapter experts of `cfg`'s form."""
    return nn.ModuleList(AdapterExpert(hidden, cfg, generator, device) for _ in range(num))


def adapter_router(hidden: int, cfg: PerftConfig, generator: torch.Generator, device=None) -> CastLinear:
    """PERFT-R's own bias-free router W̃_g (M, H), initialised N(0, router_init_std^2) (HF `initializer_range`)."""
    router = CastLinear(hidden, cfg.num_adapters, device)
    _init(router.weight, cfg.router_init_std, generator)
    return router
