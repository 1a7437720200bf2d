"""The PERFT variants, one object each (spec/PERFT.md §3): how it attaches, names its tensors, counts itself.

`VARIANTS[cfg.variant]` is the only place that knows what a variant is. Attaching (perft/attach.py), the
reference config keys and tensor names (perft/adapter_configs.py, perft/adapter_names.py), the parameter
accounting (perft/efficiency.py), the params CLI and the adapter-router losses (perft/losses.py) all look the
variant up here instead of asking `cfg.variant == ...` or `isinstance(branch, ...)`.

Each variant knows:
- `attach(layer, model_cfg, cfg, rngs, param_dtype, routed_dispatch)`: add its modules to one decoder layer;
- `fields`: the `PerftConfig` fields that shape its computation, beyond the adapter form's (`form_fields`):
  two configs with equal `computation(cfg)` build the same adapters;
- `reference_keys(cfg)` / `from_reference(raw)`: its flags in the reference code's `adapter_config.json`
  (`peft_format`: written as a HF PEFT LoRA directory instead);
- `tensor_name(moe, layer, weight, j)`: the reference name of adapter j's `weight` in layer `layer`;
- `shape(model_cfg, cfg)` and `activated_per_layer(model_cfg, cfg)`: a one-line description and the trainable
  parameters a token passes through in one layer (PERFT.md §5);
- `router_losses(logits, cfg, mask)`: the adapter router's auxiliary loss terms (routed variants only).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
from flax import nnx

from perft_jax.models.config import ModelConfig
from perft_jax.models.moe.routing import load_balancing_loss
from perft_jax.perft.adapters import LoRA
from perft_jax.perft.branches import EmbeddedAdapters, RoutedAdapters, SharedAdapters
from perft_jax.perft.config import PerftConfig
from perft_jax.perft.dynmole import dynmole_aux_loss

# The reference code's per-variant config keys, all off: each variant switches on its own.
_REFERENCE_OFF = {"shared_adapter": False, "shared_adapter_num": 0, "shared_routing_adapter": False,
                  "shared_routing_adapter_num_experts": 0, "shared_routing_adapter_num_experts_per_tok": 0,
                  "embedded_routing_adapter": False}


def form_fields(cfg: PerftConfig) -> tuple[str, ...]:
    """The config fields of the adapter form (LoRA: rank, alpha, dropout; parallel adapter: width, activation)."""
    if cfg.adapter == "lora":
        return ("adapter", "bottleneck", "lora_alpha", "dropout")
    return ("adapter", "bottleneck", "activation", "dropout")


def _adapter_params(model_cfg: ModelConfig, cfg: PerftConfig) -> int:
    """One adapter expert: [D, R] + [R, D] (LoRA A, B or the parallel adapter's W1, W2)."""
    return 2 * model_cfg.hidden_size * cfg.bottleneck


def _width(cfg: PerftConfig) -> str:
    return f"{cfg.adapter} {'r' if cfg.adapter == 'lora' else 'D_B'}={cfg.bottleneck}"


@dataclasses.dataclass(frozen=True)
class Variant:
    """A variant that adds nothing (`none`); the base of the others."""

    name: ClassVar[str] = "none"
    fields: ClassVar[tuple[str, ...]] = ()
    # Written as a pure HF PEFT LoRA directory (peft.PeftModel reads it) instead of the reference PERFT format.
    peft_format: ClassVar[bool] = False

    def attach(self, layer: nnx.Module, model_cfg: ModelConfig, cfg: PerftConfig, rngs: nnx.Rngs, param_dtype,
               routed_dispatch: str) -> None:
        """Add this variant's adapters to one decoder layer (in place)."""

    def computation(self, cfg: PerftConfig) -> dict[str, Any]:
        """Everything in `cfg` that shapes this variant's adapters (training-only settings left out)."""
        names = ("variant", *(form_fields(cfg) if self.name != "none" else ()), *self.fields)
        return {name: getattr(cfg, name) for name in names}

    def reference_keys(self, cfg: PerftConfig) -> dict[str, Any]:
        return dict(_REFERENCE_OFF)

    def from_reference(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        """This variant's PerftConfig fields if the reference flags in `raw` select it, else None."""
        return None

    def tensor_name(self, moe: str, layer: int, weight: str, j: int) -> str:
        raise NotImplementedError(f"{self.name} has no adapter tensors")

    def shape(self, model_cfg: ModelConfig, cfg: PerftConfig) -> str:
        return "base model only"

    def activated_per_layer(self, model_cfg: ModelConfig, cfg: PerftConfig) -> int:
        return 0

    def router_losses(self, logits: jax.Array, cfg: PerftConfig, mask) -> tuple[dict[str, jax.Array], jax.Array]:
        """(logged terms, their weighted sum for the total loss) of the adapter router; none by default."""
        return {}, 0.0


class _Shared(Variant):
    """Always-on adapters beside the block (the reference's `shared_adapter`), summed without weights."""

    def num(self, cfg: PerftConfig) -> int:
        raise NotImplementedError

    def attach(self, layer, model_cfg, cfg, rngs, param_dtype, routed_dispatch):
        layer.moe.adapters = SharedAdapters(self.num(cfg), model_cfg.hidden_size, cfg, rngs, param_dtype,
                                            model_cfg.jnp_dtype)

    def reference_keys(self, cfg):
        return {**_REFERENCE_OFF, "shared_adapter": True, "shared_adapter_num": self.num(cfg)}

    def tensor_name(self, moe, layer, weight, j):
        return f"model.layers.{layer}.{moe}.shared_adapter.{j}.unit.{weight}.weight"

    def activated_per_layer(self, model_cfg, cfg):
        return self.num(cfg) * _adapter_params(model_cfg, cfg)


class PerftS(_Shared):
    """PERFT-S: one always-on adapter."""

    name = "perft_s"

    def num(self, cfg):
        return 1

    def from_reference(self, raw):
        return {"variant": self.name} if raw.get("shared_adapter") and raw.get("shared_adapter_num") == 1 else None

    def shape(self, model_cfg, cfg):
        return f"{_width(cfg)}, M=1"


class PerftD(_Shared):
    """PERFT-D: M always-on adapters."""

    name = "perft_d"
    fields = ("num_adapters",)

    def num(self, cfg):
        return cfg.num_adapters

    def from_reference(self, raw):
        if raw.get("shared_adapter") and raw.get("shared_adapter_num") != 1:
            return {"variant": self.name, "num_adapters": raw.get("shared_adapter_num")}
        return None

    def shape(self, model_cfg, cfg):
        return f"{_width(cfg)}, M={cfg.num_adapters} (all active)"


class PerftR(Variant):
    """PERFT-R: M adapters behind their own top-K or DynMoLE router."""

    name = "perft_r"
    fields = ("num_adapters", "top_k", "router", "adapter_gate_weights", "dynmole")

    def attach(self, layer, model_cfg, cfg, rngs, param_dtype, routed_dispatch):
        layer.moe.adapters = RoutedAdapters(model_cfg.hidden_size, cfg, model_cfg.norm_topk_prob, rngs, param_dtype,
                                            model_cfg.jnp_dtype, routed_dispatch)

    def reference_keys(self, cfg):
        return {**_REFERENCE_OFF, "shared_routing_adapter": True,
                "shared_routing_adapter_num_experts": cfg.num_adapters,
                "shared_routing_adapter_num_experts_per_tok": cfg.top_k}

    def from_reference(self, raw):
        if not raw.get("shared_routing_adapter"):
            return None
        data = {"variant": self.name, "num_adapters": raw.get("shared_routing_adapter_num_experts"),
                "top_k": raw.get("shared_routing_adapter_num_experts_per_tok")}
        if "shared_routing_adapter_router_aux_loss_coef" in raw:
            data["router_aux_loss_coef"] = raw["shared_routing_adapter_router_aux_loss_coef"]
        return data

    def tensor_name(self, moe, layer, weight, j):
        return f"model.layers.{layer}.{moe}.shared_routing_adapter.{j}.unit.{weight}.weight"

    def shape(self, model_cfg, cfg):
        return f"{_width(cfg)}, M={cfg.num_adapters}, K={cfg.top_k} ({cfg.router} router)"

    def activated_per_layer(self, model_cfg, cfg):
        """K adapters plus the router [D, M] (for DynMoLE, K is the floor; broadcasts activate more)."""
        return cfg.top_k * _adapter_params(model_cfg, cfg) + model_cfg.hidden_size * cfg.num_adapters

    def router_losses(self, logits, cfg, mask):
        if cfg.router == "dynmole":
            dyn = dynmole_aux_loss(logits, cfg.dynmole, mask)  # coefficients beta and alpha are inside
            return {"adapter_router_entropy": dyn.entropy_loss, "adapter_router_aux": dyn.load_balance_loss}, dyn.total
        aux = load_balancing_loss(logits, cfg.num_adapters, cfg.top_k, mask)
        return {"adapter_router_aux": aux}, cfg.router_aux_loss_coef * aux


class PerftE(Variant):
    """PERFT-E: one adapter inside each base expert, weighted by the frozen base router."""

    name = "perft_e"

    def attach(self, layer, model_cfg, cfg, rngs, param_dtype, routed_dispatch):
        layer.moe.adapters = EmbeddedAdapters(model_cfg.num_experts, model_cfg.hidden_size, cfg, rngs, param_dtype,
                                              model_cfg.jnp_dtype, routed_dispatch)

    def reference_keys(self, cfg):
        return {**_REFERENCE_OFF, "embedded_routing_adapter": True}

    def from_reference(self, raw):
        return {"variant": self.name} if raw.get("embedded_routing_adapter") else None

    def tensor_name(self, moe, layer, weight, j):
        return f"model.layers.{layer}.{moe}.experts.{j}.embedded_routing_adapter.unit.{weight}.weight"

    def shape(self, model_cfg, cfg):
        return f"{_width(cfg)}, M=N={model_cfg.num_experts}, base top-{model_cfg.num_experts_per_tok}"

    def activated_per_layer(self, model_cfg, cfg):
        return model_cfg.num_experts_per_tok * _adapter_params(model_cfg, cfg)


class QvLoRA(Variant):
    """The baseline: HF-PEFT LoRA on attention q_proj / v_proj (every token passes through it)."""

    name = "qv_lora"
    peft_format = True

    def attach(self, layer, model_cfg, cfg, rngs, param_dtype, routed_dispatch):
        d, hd, dtype = model_cfg.hidden_size, model_cfg.head_dim, model_cfg.jnp_dtype
        layer.attn.q_lora = LoRA(d, model_cfg.num_heads * hd, cfg, rngs, ("embed", "q_heads"), param_dtype, dtype)
        layer.attn.v_lora = LoRA(d, model_cfg.num_kv_heads * hd, cfg, rngs, ("embed", "kv_heads"), param_dtype,
                                 dtype)

    def shape(self, model_cfg, cfg):
        return f"LoRA on q_proj, v_proj: r={cfg.bottleneck}, alpha={cfg.lora_alpha:g}"

    def activated_per_layer(self, model_cfg, cfg):
        width = (model_cfg.num_heads + model_cfg.num_kv_heads) * model_cfg.head_dim
        return cfg.bottleneck * (2 * model_cfg.hidden_size + width)


# In the order the reference code's flags are read: shared adapters win over routed ones (PERFT.md §3).
VARIANTS: dict[str, Variant] = {v.name: v for v in (Variant(), PerftS(), PerftD(), PerftR(), PerftE(), QvLoRA())}
