"""Mixtral (mistralai/Mixtral-8x7B): HF config and tensor naming.

Differences from OLMoE, as `ModelConfig` fields: grouped-query attention without q/k norm, top-2
weights always renormalised, and an optional `sliding_window`. The per-expert HF layout names the
SwiGLU matrices w1 (gate), w3 (up), w2 (down) under `block_sparse_moe`.
Source: transformers/models/mixtral/modeling_mixtral.py.
"""
from __future__ import annotations

from typing import Any

from perft_jax.models.architecture import Architecture, shared_fields_from_hf, shared_fields_to_hf
from perft_jax.models.config import ModelConfig


def _config_from_hf(hf: Any, source: str = "config.json") -> ModelConfig:
    return ModelConfig(
        model_type="mixtral",
        **shared_fields_from_hf(hf, source),
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        num_experts=hf.num_local_experts,
        norm_topk_prob=True,  # MixtralTopKRouter always renormalises
        qk_norm=False,
        sliding_window=hf.sliding_window,
    )


def _config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(**shared_fields_to_hf(cfg), head_dim=cfg.head_dim, num_local_experts=cfg.num_experts,
                sliding_window=cfg.sliding_window)


MIXTRAL = Architecture(
    model_type="mixtral",
    hf_class_name="MixtralForCausalLM",
    moe_prefix="block_sparse_moe",
    expert_proj_names=("w1", "w3", "w2"),
    config_from_hf=_config_from_hf,
    config_to_hf=_config_to_hf,
)
