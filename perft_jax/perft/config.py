"""The `perft` config section: which PERFT variant, which adapter form, how it is routed.

Variants (spec/PERFT.md §3): `none`; `perft_s` (one always-on adapter); `perft_d` (M always-on adapters,
summed); `perft_r` (M adapters behind their own top-K or DynMoLE router); `perft_e` (one adapter per base
expert, weighted by the frozen base router); `qv_lora` (the baseline: LoRA on attention q_proj / v_proj).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from perft_jax.errors import UserError
from perft_jax.perft.dynmole import DynMoLEConfig

Variant = Literal["none", "perft_s", "perft_d", "perft_r", "perft_e", "qv_lora"]


@dataclasses.dataclass(frozen=True)
class PerftConfig:
    """Attributes:
    variant: the PERFT family member: `perft_s` (one always-on adapter), `perft_d` (M always-on adapters),
        `perft_r` (M routed adapters, top-K per token), `perft_e` (one adapter per base expert, weighted by the
        base router), `qv_lora` (the baseline: LoRA on attention q/v) or `none`.
    adapter: adapter-expert form: `lora` (x -> B A dropout(x) * alpha / r) or `parallel_adapter`
        (x -> W2 act(dropout(W1 x))).
    bottleneck: LoRA rank r, or the parallel adapter's width D_B (the paper's "bottleneck size").
    lora_alpha: LoRA scaling numerator (scale = alpha / r); also used by `qv_lora`.
    dropout: adapter dropout (LoRA: on the input; parallel adapter: after W1, before the activation).
    activation: the parallel adapter's activation.
    num_adapters: M, for `perft_d` and `perft_r` (`perft_s` has 1; `perft_e` one per base expert).
    top_k: K of M adapters per token for `perft_r`; with `router: dynmole` it is the keep-top-k floor.
    router: `perft_r` gating: `topk` (softmax, top-K, renormalised iff the base model renormalises) or
        `dynmole` (DynMoLE's Tsallis-entropy hybrid routing, arXiv 2504.00661; settings under `perft.dynmole`).
    adapter_gate_weights: what weights the routed adapters: `adapter_router` (the paper) or
        `base_router_rank` (the reference OLMoE code: the s-th selected adapter is weighted by the s-th
        largest base routing weight; needs top_k <= the base top-k).
    router_aux_loss_coef: coefficient of the PERFT-R router's load-balancing loss (`topk` router).
    base_router_aux_loss: add the frozen base routers' load-balancing loss (coefficient from the model
        config), which still trains adapters of earlier layers through the hidden states.
    init: `near_zero` (second matrix ~ N(0, 1e-12), the reference) or `zero` (exactly the base model).
    router_init_std: initial std of the adapter router weights (HF `initializer_range`).
    dynmole: DynMoLE settings for `router: dynmole`.
    """

    variant: Variant = "perft_r"
    adapter: Literal["lora", "parallel_adapter"] = "parallel_adapter"
    bottleneck: int = 8
    lora_alpha: float = 16.0
    dropout: float = 0.0
    activation: Literal["silu", "relu", "gelu", "identity"] = "silu"
    num_adapters: int = 4
    top_k: int = 2
    router: Literal["topk", "dynmole"] = "topk"
    adapter_gate_weights: Literal["adapter_router", "base_router_rank"] = "adapter_router"
    router_aux_loss_coef: float = 0.01
    base_router_aux_loss: bool = True
    init: Literal["near_zero", "zero"] = "near_zero"
    router_init_std: float = 0.02
    dynmole: DynMoLEConfig = DynMoLEConfig()

    def validate_config(self, prefix: str = "perft") -> "PerftConfig":
        def fail(key: str, expected: str) -> None:
            raise UserError(f"{prefix}.{key}: expected {expected}, got {getattr(self, key)!r}")

        if self.bottleneck <= 0:
            fail("bottleneck", "a positive integer (LoRA rank r / adapter width D_B)")
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", "a probability in [0, 1)")
        if self.lora_alpha <= 0:
            fail("lora_alpha", "a positive number")
        if self.router_aux_loss_coef < 0:
            fail("router_aux_loss_coef", "a number >= 0")
        if self.router_init_std < 0:
            fail("router_init_std", "a number >= 0")
        if self.variant in ("perft_d", "perft_r") and self.num_adapters <= 0:
            fail("num_adapters", "a positive integer")
        if self.variant == "perft_r":
            if not 1 <= self.top_k <= self.num_adapters:
                fail("top_k", f"an integer in [1, num_adapters={self.num_adapters}]")
            if self.router == "dynmole":
                self.dynmole.validate(self.num_adapters, prefix=f"{prefix}.dynmole")
                if self.dynmole.keep_top_k != self.top_k:
                    raise UserError(f"{prefix}.dynmole.keep_top_k: must equal {prefix}.top_k={self.top_k} "
                                    f"(PERFT-R's K is DynMoLE's keep-top-k floor), got {self.dynmole.keep_top_k}")
                if self.adapter_gate_weights != "adapter_router":
                    fail("adapter_gate_weights", "'adapter_router' with router: dynmole")
        return self

    def check_model(self, num_experts: int, num_experts_per_tok: int, prefix: str = "perft") -> None:
        """Checks that need the base model's shape."""
        if (self.variant == "perft_r" and self.adapter_gate_weights == "base_router_rank"
                and self.top_k > num_experts_per_tok):
            raise UserError(f"{prefix}.top_k: expected at most the base top-k={num_experts_per_tok} with "
                            f"adapter_gate_weights=base_router_rank, got {self.top_k}")
