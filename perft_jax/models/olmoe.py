"""OLMoE (allenai/OLMoE-1B-7B): HF config and tensor naming.

Differences from Mixtral that matter numerically, all expressed as `ModelConfig` fields:
q/k RMSNorm over the full projected width before the head split (`qk_norm`), optional `clip_qkv`,
and top-k routing weights renormalised only when `norm_topk_prob` (False for OLMoE-1B-7B).
Source: transformers/models/olmoe/modeling_olmoe.py.
"""
from __future__ import annotations

from typing import Any

from perft_jax.models.architecture import Architecture, require, shared_fields_from_hf, shared_fields_to_hf
from perft_jax.models.config import ModelConfig


def _config_from_hf(hf: Any, source: str = "config.json") -> ModelConfig:
    require(not getattr(hf, "attention_bias", False), source, "attention_bias=true is not supported")
    return ModelConfig(
        model_type="olmoe",
        **shared_fields_from_hf(hf, source),
        # HF OlmoeAttention derives head_dim from the width; the config has no head_dim key.
        head_dim=hf.hidden_size // hf.num_attention_heads,
        num_experts=hf.num_experts,
        norm_topk_prob=bool(hf.norm_topk_prob),
        qk_norm=True,
        clip_qkv=None if hf.clip_qkv is None else float(hf.clip_qkv),
    )


def _config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(**shared_fields_to_hf(cfg), num_experts=cfg.num_experts, norm_topk_prob=cfg.norm_topk_prob,
                clip_qkv=cfg.clip_qkv, attention_bias=False)


OLMOE = Architecture(
    model_type="olmoe",
    hf_class_name="OlmoeForCausalLM",
    moe_prefix="mlp",
    expert_proj_names=("gate_proj", "up_proj", "down_proj"),
    config_from_hf=_config_from_hf,
    config_to_hf=_config_to_hf,
)
