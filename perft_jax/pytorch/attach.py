"""Attach PERFT adapters to a transformers `OlmoeForCausalLM` / `MixtralForCausalLM`, in place.

Every decoder layer's sparse-MoE block gets the variant's adapter modules (pytorch/branches.py) and two forward
hooks: its frozen router's remembers the routing, the block's adds the adapters' delta to the block output. The
block's own forward, the attention, the KV cache and `generate` stay transformers'. qv_lora goes to HF PEFT
(pytorch/qv_lora.py). The base's parameters are frozen (`requires_grad=False`); the adapters are float32
`nn.Parameter`s that train with any torch optimizer.
"""
from __future__ import annotations

import torch
from torch import nn

from perft_jax.errors import UserError
from perft_jax.models import ARCHITECTURES
from perft_jax.models.config import ModelConfig
from perft_jax.perft.config import PerftConfig
from perft_jax.perft.variants import VARIANTS
from perft_jax.pytorch import qv_lora
from perft_jax.pytorch.branches import BRANCHES, Branch, remember_routing

# The decoder layer's attribute holding the sparse-MoE block, per HF model_type (transformers 5 names Mixtral's
# `mlp`; the reference files' `block_sparse_moe` survives only in tensor names).
MOE_BLOCK = {"olmoe": "mlp", "mixtral": "mlp"}


def base_config(hf_model: nn.Module) -> ModelConfig:
    """perft_jax's description of the transformers model's base (read from `hf_model.config`)."""
    model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
    if model_type not in MOE_BLOCK:
        raise UserError(f"perft_jax.pytorch: expected a transformers model of type {' or '.join(MOE_BLOCK)} "
                        f"(OlmoeForCausalLM, MixtralForCausalLM), got {type(hf_model).__name__} "
                        f"(model_type {model_type!r})")
    return ARCHITECTURES[model_type].config_from_hf(hf_model.config, "hf_model.config")


def moe_blocks(hf_model: nn.Module) -> list[nn.Module]:
    """The sparse-MoE block of every decoder layer, in layer order."""
    return [getattr(layer, MOE_BLOCK[hf_model.config.model_type]) for layer in hf_model.model.layers]


def _attach_branch(block: nn.Module, branch: Branch, mcfg: ModelConfig, generator: torch.Generator) -> None:
    device = block.gate.weight.device
    for name, module in branch.modules(mcfg.hidden_size, mcfg.num_experts, generator, device).items():
        block.add_module(name, module.train(block.training))  # new modules follow the model's train / eval mode
    block.gate.register_forward_hook(remember_routing)
    block.register_forward_hook(branch, with_kwargs=True)


def attach_perft(hf_model: nn.Module, cfg: PerftConfig, seed: int = 0) -> nn.Module:
    """Add freshly initialised adapters described by `cfg` to `hf_model` (in place; also returned).

    Initialised as perft_jax and the reference code do (seeded by `seed`, without touching torch's global RNG):
    first matrices randn * sqrt(2 / out), second ones randn * 1e-6 (or zeros), the PERFT-R router
    N(0, router_init_std^2); qv_lora as PEFT initialises LoRA (from torch's global RNG). The new modules take
    their block's train / eval mode. `cfg` is recorded as `hf_model.perft_config`.

    Raises:
      UserError: not an OLMoE / Mixtral model, an invalid config (for this base), or adapters already attached.
    """
    mcfg = base_config(hf_model)
    cfg.validate_config()
    cfg.check_model(mcfg.num_experts, mcfg.num_experts_per_tok)
    if getattr(hf_model, "perft_config", None) is not None:
        raise UserError("perft_jax.pytorch: the model already carries PERFT adapters; start from a base model")
    if cfg.variant == "none":
        return hf_model
    hf_model.requires_grad_(False)  # only the adapters train
    if VARIANTS[cfg.variant].peft_format:  # qv_lora: a PEFT LoRA, run by PEFT
        qv_lora.attach(hf_model, cfg)
    else:
        # PERFT.md §3: PERFT-R renormalises exactly when the base block does (OLMoE iff norm_topk_prob).
        branch = BRANCHES[cfg.variant](cfg, mcfg.norm_topk_prob)
        generator = torch.Generator().manual_seed(seed)
        for block in moe_blocks(hf_model):
            _attach_branch(block, branch, mcfg, generator)
    hf_model.perft_config = cfg
    return hf_model
