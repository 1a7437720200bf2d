"""Mixtral (mistralai/Mixtral-8x7B): HF config and tensor naming.

Differences from OLMoE, as `ModelConfig` fields: grouped-query attention without q/k norm, top-2
weights always renormalised, and an optional `sliding_window`. The per-expert HF layout names the
SwiGLU matrices w1 (gate), w3 (up), w2 (down) under `block_sparse_moe`.
Source: transformers/models/mixtral/modeling_mixtral.py.
"""
from __future__ import annotations

from typing import Any

from perft_jax.models.architecture import Architecture, require, rope_theta_of
from perft_jax.models.config import ModelConfig


def _config_from_hf(hf: Any, source: str = "config.json") -> ModelConfig:
    require(hf.hidden_act == "silu", source, f"hidden_act {hf.hidden_act!r} is not supported (only 'silu')")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return ModelConfig(
        model_type="mixtral",
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        head_dim=head_dim,
        num_experts=hf.num_local_experts,
        num_experts_per_tok=hf.num_experts_per_tok,
        norm_topk_prob=True,  # MixtralTopKRouter always renormalises
        qk_norm=False,
        rms_norm_eps=float(hf.rms_norm_eps),
        rope_theta=rope_theta_of(hf, source),
        clip_qkv=None,
        sliding_window=hf.sliding_window,
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        router_aux_loss_coef=float(hf.router_aux_loss_coef),
        max_position_embeddings=hf.max_position_embeddings,
        pad_token_id=hf.pad_token_id,
        bos_token_id=hf.bos_token_id,
        eos_token_id=hf.eos_token_id,
    )


def _config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(
        model_type="mixtral",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"},
        sliding_window=cfg.sliding_window,
        tie_word_embeddings=cfg.tie_word_embeddings,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        hidden_act="silu",
    )


MIXTRAL = Architecture(
    model_type="mixtral",
    hf_class_name="MixtralForCausalLM",
    moe_prefix="block_sparse_moe",
    expert_proj_names=("w1", "w3", "w2"),
    config_from_hf=_config_from_hf,
    config_to_hf=_config_to_hf,
)
